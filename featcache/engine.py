"""Stage 2: train a student against cached teacher targets with HF Accelerate.

The loop has the canonical shape of Accelerate's examples: one ``prepare``, ``accumulate`` -> ``backward`` ->
clip -> step, ``save_state``/``load_state`` + ``skip_first_batches`` to resume, ``gather_for_metrics`` to
evaluate, side effects on the main process only. It never asks which method runs: it only sees the
:class:`~featcache.methods.DistillTask` and the loss dict it returns.

The teacher is never built here unless ``--online-teacher`` asks for it (then it computes the same targets on
the same replayed views: the parity check and the speed baseline), or a method builds it itself.

Determinism: the batch order is a function of ``(seed, epoch)`` (`EpochSampler`), the views of
``(seed, epoch, sample)`` (`CachedViewDataset`), and the DataLoader draws its worker seeds from its own
generator, so the global torch RNG (restored by ``load_state``) is only used by the model and the methods
(e.g. ViTKD's random mask). A killed run resumed with ``--resume`` ends with the same weights as an
uninterrupted one.
"""
from __future__ import annotations

import dataclasses
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, set_seed
from torch.utils.data import DataLoader

from .config import TrainConfig, save_yaml
from ._engine import (MetricsLog, Meter, build_optimizer, build_scheduler, build_student, build_task,
                           export_student, resolve_methods)
from .stores.base import open_reader
from .durable import write_atomic
from .teachers import normalization  # the function only: the cached path never builds a teacher
from .views import normalize

STATE_FILE = "featcache_state.json"
KEEP_CHECKPOINTS = 2


@dataclass
class RunState:
    """What a checkpoint restores besides Accelerate's own state (model, optimizer, scheduler, RNG)."""

    epoch: int = 0
    batches_done: int = 0  # micro-batches of ``epoch`` consumed by this process
    step: int = 0  # optimizer steps
    best_top1: float | None = None
    last_eval: dict[str, float] | None = None
    train_time_s: float = 0.0
    images_seen: int = 0


@dataclass
class Run:
    """Everything the loop touches, built once by :func:`setup`."""

    cfg: TrainConfig
    out: Path
    accelerator: Accelerator
    task: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    train_loader: DataLoader
    eval_loader: DataLoader | None
    dataset: Any
    sampler: Any
    mean: list[float]
    std: list[float]
    targets_fn: Any  # None: targets come from the batch (cache); else the online teacher
    log: MetricsLog
    costs: list[str]
    student_spec: dict[str, Any]


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Train one student from one cache; write the run directory and return ``final.json``'s content."""
    cfg.validate()
    out = Path(cfg.out)
    if (out / "final.json").is_file() and cfg.resume:
        return json.loads((out / "final.json").read_text())
    _refuse_overwrite(out, cfg.resume)
    run = setup(cfg, out)
    state = restore(run) if cfg.resume else RunState()
    run.accelerator.print("\n".join(f"[featcache] {c}" for c in run.costs))
    for epoch in range(state.epoch, cfg.epochs):
        if cfg.max_steps is not None and state.step >= cfg.max_steps:
            break
        stopped = train_epoch(run, state, epoch)
        if state.batches_done >= len(run.train_loader) or stopped:
            end_epoch(run, state, epoch)
        if stopped:
            break
    return finish(run, state)


def _refuse_overwrite(out: Path, resume: bool) -> None:
    if not resume and (out / "metrics.jsonl").exists():
        raise FileExistsError(f"{str(out)!r} already holds a run; pass --resume to continue it or choose another --out")


def _check_same_run(path: Path, cfg: TrainConfig) -> None:
    """``--resume`` must continue the same run: only options that do not change the result may differ."""
    from .config import load_yaml, to_dict
    from .manifest import diff_keys

    if not path.is_file():
        return
    free = {"resume", "workers", "log_every", "data", "val", "checkpoint_every", "ce_weight"}
    old, new = load_yaml(path), to_dict(cfg)
    changed = [k for k in diff_keys(old, new) if k.split(".")[0] not in free]
    if changed:
        raise ValueError(f"--resume with different settings than the run in {str(path.parent)!r}: {changed}; "
                         "resume with the original options or train into a new --out")


def setup(cfg: TrainConfig, out: Path) -> Run:
    """Build everything (compat check first) and ``prepare`` it once."""
    # Label-free methods leave the student head without gradients; DDP must be told some parameters may be unused.
    ddp = DistributedDataParallelKwargs(find_unused_parameters=True)
    accelerator = Accelerator(mixed_precision=cfg.mixed_precision, gradient_accumulation_steps=cfg.grad_accum,
                              log_with="tensorboard", project_dir=str(out), kwargs_handlers=[ddp])
    set_seed(cfg.seed)
    reader = open_reader(cfg.cache)
    manifest = reader.manifest
    specs = resolve_methods(cfg, manifest)  # runs the compatibility check before anything is built
    img_size = int(manifest["img_size"])
    cfg = dataclasses.replace(cfg, img_size=img_size)
    if cfg.resume:
        _check_same_run(out / "config.yaml", cfg)  # every process, before the main one rewrites the file
    student = build_student(cfg, manifest, specs, img_size)
    task = build_task(cfg, manifest, student, specs, img_size)
    needed = sorted({t for _, cls, args, _ in specs for t in cls.required_targets(manifest, **args)})
    dataset, sampler, train_loader = _train_loader(cfg, reader, needed)
    eval_loader = _eval_loader(cfg, manifest, img_size)
    optimizer = build_optimizer(cfg, task, accelerator.num_processes)
    scheduler = build_scheduler(cfg, optimizer, len(train_loader), accelerator.num_processes)
    prepared = accelerator.prepare(task, optimizer, train_loader, eval_loader, scheduler)
    task, optimizer, train_loader, eval_loader, scheduler = prepared
    targets_fn = OnlineTargets(manifest, needed, accelerator.device) if cfg.online_teacher else None
    costs = _costs(task, accelerator)
    if cfg.online_teacher:
        costs.append("--online-teacher: a full teacher forward runs on every batch (no cache targets are read)")
    data_cfg = normalization(accelerator.unwrap_model(task).student)  # the student's own, as timm would use
    _write_config(accelerator, out, dataclasses.replace(cfg, ce_weight=accelerator.unwrap_model(task).ce_weight))
    spec = {"model": cfg.student, "img_size": img_size, "num_classes": int(cfg.num_classes or
            manifest["teacher"]["num_classes"]), "model_kwargs": dict(cfg.student_kwargs)}
    return Run(cfg, out, accelerator, task, optimizer, scheduler, train_loader, eval_loader, dataset, sampler,
               data_cfg["mean"], data_cfg["std"], targets_fn, MetricsLog(out, accelerator), costs, spec)


def _write_config(accelerator: Accelerator, out: Path, cfg: TrainConfig) -> None:
    """The resolved config (image size, CE weight filled in), once every process has checked the old one."""
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        save_yaml(cfg, out / "config.yaml")
    accelerator.init_trackers("tensorboard")


def _costs(task: torch.nn.Module, accelerator: Accelerator) -> list[str]:
    methods = accelerator.unwrap_model(task).methods
    return [f"{name}: {c}" for name, m in methods.items() if (c := m.online_teacher_cost())] or [
        "cache-only: no teacher compute at train time"]



def _loader_kwargs(cfg: TrainConfig) -> dict[str, Any]:
    # Worker seeds come from the loader's own generator, never from the global RNG that load_state restores.
    return {"batch_size": cfg.batch_size, "num_workers": cfg.workers, "pin_memory": torch.cuda.is_available(),
            "generator": torch.Generator().manual_seed(cfg.seed)}


def _train_loader(cfg: TrainConfig, reader: Any, needed: list[str]) -> tuple[Any, Any, DataLoader]:
    from .sources import source_from_manifest
    from .datasets import CachedViewDataset, EpochSampler
    from .views import Recipe

    manifest = reader.manifest
    source = source_from_manifest(manifest, root=cfg.data)
    dataset = CachedViewDataset(reader, source, Recipe.from_dict(manifest["views"]["recipe"]), needed,
                                view_policy=cfg.view_policy, label_shots=cfg.label_shots, seed=cfg.seed,
                                fingerprint_checks=cfg.fingerprint_checks, with_targets=not cfg.online_teacher)
    sampler = EpochSampler(len(dataset), seed=cfg.seed)
    return dataset, sampler, DataLoader(dataset, sampler=sampler, drop_last=False, **_loader_kwargs(cfg))


def _eval_loader(cfg: TrainConfig, manifest: Any, img_size: int) -> DataLoader | None:
    if not cfg.val:
        return None
    from .sources import open_source
    from .datasets import EvalDataset

    interpolation = manifest.get("normalization", {}).get("interpolation", "bicubic")
    dataset = EvalDataset(open_source(cfg.val), img_size, manifest["data"]["classes"], interpolation=interpolation)
    return DataLoader(dataset, shuffle=False, **_loader_kwargs(cfg))


class OnlineTargets:
    """``--online-teacher``: the cache's teacher computes the targets on the replayed views of each batch.

    Targets are rounded through the cache's storage dtype (fp16/bf16), so for a cache without a lossy codec they
    equal the cached ones up to batch-composition float noise (with fp32, the teacher's exact outputs). The
    codec (``int8``, ``bitround``, ``--topk``) is not applied: against such a cache the online run sees the
    teacher's unquantised targets, so it is the reference the codec's error is measured against, not a parity run.
    """

    def __init__(self, manifest: Any, names: list[str], device: torch.device):
        from . import teachers  # imported here: the cached path must never touch the teacher

        self.teacher = teachers.teacher_from_manifest(manifest, device=device)
        blocks = sorted(int(n.split("_", 1)[1]) for n in names if n.startswith("block_"))
        self.layers = blocks or [int(manifest["teacher"]["num_blocks"]) - 1]
        self.names = names
        self.mean, self.std = manifest["normalization"]["mean"], manifest["normalization"]["std"]
        self.round_to = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(manifest["storage"]["dtype"])

    def __call__(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        out = self.teacher.targets(normalize(images, self.mean, self.std), self.layers)
        return {n: out[n].to(self.round_to).float() if self.round_to else out[n].float() for n in self.names}


def set_epoch(run: Run, loader: Any, epoch: int) -> None:
    """Point the sampler, the dataset and Accelerate's loader wrapper at ``epoch``."""
    run.sampler.set_epoch(epoch)
    run.dataset.set_epoch(epoch)
    loader.set_epoch(epoch)  # DataLoaderShard re-applies its own counter to the sampler at __iter__


def train_epoch(run: Run, state: RunState, epoch: int) -> bool:
    """One (possibly partial, when resuming) epoch; returns True when ``max_steps`` is reached."""
    acc, task = run.accelerator, run.task
    if state.epoch != epoch:
        state.epoch, state.batches_done = epoch, 0
    loader = run.train_loader
    if state.batches_done:
        loader = acc.skip_first_batches(loader, state.batches_done)
    set_epoch(run, loader, epoch)
    task.train()
    meter, tick = Meter(), time.perf_counter()
    for batch in loader:
        targets = batch.get("targets", {}) if run.targets_fn is None else run.targets_fn(batch["image"])
        with acc.accumulate(task):
            parts = task(normalize(batch["image"], run.mean, run.std), targets, batch["label"])
            acc.backward(parts["loss"])
            if acc.sync_gradients and run.cfg.grad_clip:
                acc.clip_grad_norm_(task.parameters(), run.cfg.grad_clip)
            meter.lr = run.optimizer.param_groups[0]["lr"]  # the rate this step used
            run.optimizer.step()
            run.scheduler.step()
            run.optimizer.zero_grad()
        state.batches_done += 1
        meter.update(parts, len(batch["label"]) * acc.num_processes)
        if acc.sync_gradients:
            now = time.perf_counter()
            state.train_time_s += now - tick
            tick = now
            state.step += 1
            after_step(run, state, meter)
            if run.cfg.max_steps is not None and state.step >= run.cfg.max_steps:
                break
    if meter.count:  # the last steps of the epoch when it does not end on a multiple of log_every
        log_train(run, state, meter)
    return run.cfg.max_steps is not None and state.step >= run.cfg.max_steps


def after_step(run: Run, state: RunState, meter: Meter) -> None:
    """Log every ``log_every`` steps; checkpoint every ``checkpoint_every`` steps inside an epoch."""
    cfg = run.cfg
    state.images_seen += meter.pending_images()
    if state.step % max(cfg.log_every, 1) == 0:
        log_train(run, state, meter)
    mid_epoch = state.batches_done < len(run.train_loader)
    if cfg.checkpoint_every and state.step % cfg.checkpoint_every == 0 and mid_epoch:
        save_checkpoint(run, state)


def log_train(run: Run, state: RunState, meter: Meter) -> None:
    record = {"kind": "train", "epoch": state.epoch, "step": state.step, **meter.flush(run.accelerator)}
    record["lr"] = meter.lr
    run.log.write(record)


def end_epoch(run: Run, state: RunState, epoch: int) -> None:
    """Evaluate, then checkpoint the finished epoch (so a resume starts the next one)."""
    if run.eval_loader is not None:
        metrics = evaluate(run)
        state.last_eval = metrics
        state.best_top1 = max(metrics["top1"], state.best_top1 if state.best_top1 is not None else -1.0)
        run.log.write({"kind": "eval", "epoch": epoch, "step": state.step, **metrics})
    state.epoch, state.batches_done = epoch + 1, 0
    save_checkpoint(run, state)


@torch.no_grad()
def evaluate(run: Run) -> dict[str, float]:
    """Top-1/top-5 (%) of the student on the held-out set, gathered over processes."""
    acc = run.accelerator
    model = acc.unwrap_model(run.task).student
    model.eval()
    hits1 = hits5 = total = 0
    for batch in run.eval_loader:
        with acc.autocast():
            logits = model(normalize(batch["image"], run.mean, run.std))
        top = logits.topk(min(5, logits.shape[-1]), dim=-1).indices
        top, labels = acc.gather_for_metrics((top, batch["label"]))
        hit = top == labels[:, None]
        hits1 += int(hit[:, 0].sum())
        hits5 += int(hit.any(dim=1).sum())
        total += int(labels.numel())
    run.task.train()
    return {"top1": 100.0 * hits1 / max(total, 1), "top5": 100.0 * hits5 / max(total, 1)}


# ------------------------------------------------------------------------------------------------ checkpoints


def save_checkpoint(run: Run, state: RunState) -> Path:
    """``save_state`` into ``checkpoints/step_{n}``, then our small state file (its presence = complete)."""
    path = run.out / "checkpoints" / f"step_{state.step:08d}"
    run.accelerator.save_state(str(path))
    if run.accelerator.is_main_process:
        write_atomic(path / STATE_FILE, json.dumps(dataclasses.asdict(state)).encode())
        for old in complete_checkpoints(run.out)[:-KEEP_CHECKPOINTS]:
            shutil.rmtree(old, ignore_errors=True)
    run.accelerator.wait_for_everyone()
    return path


def complete_checkpoints(out: Path) -> list[Path]:
    """Checkpoint directories whose state file was written, oldest first."""
    return sorted(p.parent for p in (out / "checkpoints").glob(f"step_*/{STATE_FILE}"))


def restore(run: Run) -> RunState:
    """``--resume``: load the latest complete checkpoint (fresh start if there is none)."""
    found = complete_checkpoints(run.out)
    if not found:
        run.accelerator.print(f"[featcache] --resume: no checkpoint in {run.out / 'checkpoints'}, starting fresh")
        return RunState()
    run.accelerator.load_state(str(found[-1]))
    state = RunState(**json.loads((found[-1] / STATE_FILE).read_text()))
    run.log.truncate(state.step)  # drop records the killed run wrote after this checkpoint
    run.accelerator.print(f"[featcache] resumed from {found[-1]} (epoch {state.epoch}, step {state.step})")
    return state


# ------------------------------------------------------------------------------------------------ outputs


def finish(run: Run, state: RunState) -> dict[str, Any]:
    """Save the exported student, the CSV metrics, and ``final.json`` last."""
    acc = run.accelerator
    acc.wait_for_everyone()
    result = {"top1": (state.last_eval or {}).get("top1"), "top5": (state.last_eval or {}).get("top5"),
              "best_top1": state.best_top1, "train_time_s": state.train_time_s,
              "images_per_s": state.images_seen / state.train_time_s if state.train_time_s else None,
              "steps": state.step, "method": run.cfg.method, "method_args": run.cfg.method_args,
              "student": run.cfg.student, "online_teacher_cost": run.costs}
    if acc.is_main_process:
        spec = export_student(acc.unwrap_model(run.task), run.out, run.student_spec, run.mean, run.std)
        result["student"] = spec["model"]  # a method may build the student (e.g. WeCoLoRA: the cut teacher)
        run.log.to_csv()
        write_atomic(run.out / "final.json", json.dumps(result, indent=1).encode())
    acc.end_training()
    return result
