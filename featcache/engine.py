"""Stage 2: train a student against cached teacher targets with HF Accelerate.

The loop has the canonical shape of Accelerate's examples: one ``prepare``, ``accumulate`` -> ``backward`` ->
clip -> step, ``save_state``/``load_state`` + ``skip_first_batches`` to resume, ``gather_for_metrics`` to
evaluate, side effects on the main process only. It never asks which method runs: it only sees the
:class:`~featcache.methods.DistillTask` and the loss dict it returns.

What people see while it runs (the start and end summaries, the progress bar, a line every ``--log-every`` steps and
after each evaluation, ``train.log``) is :mod:`featcache.progress`; the trackers of ``--report-to`` are Accelerate's
(:mod:`featcache.trackers`). Accelerate decides what featcache has no flag for: the processes, and the mixed
precision unless ``--mixed-precision`` is given.

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
import math
import os
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, DistributedDataParallelKwargs, ProjectConfiguration, set_seed
from torch.utils.data import DataLoader

from . import locks, rundir, trackers
from .build import (build_ema, build_eval_loader, build_optimizer, build_scheduler, build_student, build_targets_fn,
                    build_task, build_train_loader, required_targets, resolve_ce_weight, resolve_decode,
                    resolve_methods, student_spec, use_stream)
from .config import TrainConfig, load_yaml, to_dict
from .errors import ConfigError, RunExistsError
from .methods.task import DistillTask
from .models import normalization
from .progress import Console, Meter, MetricsLog, end_summary, start_summary
from .stores import open_reader
from .streaming import DeviceLoader
from .views import normalize

#: Complete checkpoints kept on disk (older ones are deleted once a newer one is complete).
KEEP_CHECKPOINTS = 2


@dataclass
class RunState:
    """What a checkpoint restores besides Accelerate's own state (model, optimizer, scheduler, RNG)."""

    epoch: int = 0
    batches_done: int = 0  # micro-batches of ``epoch`` consumed by this process
    step: int = 0  # optimizer steps
    best_top1: float | None = None
    best_epoch: int | None = None
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
    targets_fn: Any  # batch -> targets: the cached ones (decoded in the workers or on the device), or the teacher's
    log: MetricsLog
    costs: list[str]
    student_spec: dict[str, Any]
    console: Console
    summary: list[str]
    data_config: dict[str, Any] = field(default_factory=dict)  # the student's timm data config
    ema: Any = None  # --model-ema: timm's ModelEmaV3 of the student


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Train one student from one cache; write the run directory and return ``final.json``'s content.

    Raises:
        LockedError: another process is writing ``cfg.out`` (its PID is named); nothing there is touched.
    """
    cfg.validate()
    out = Path(cfg.out)
    with hold_out(out):
        return _train(cfg, out)


@contextmanager
def hold_out(out: Path) -> Iterator[None]:
    """Lock ``--out`` for this run, from the main process: under a distributed launch the others write nothing
    before their first collective with it, so a refused main process stops them too (torchrun ends the group)."""
    if int(os.environ.get("RANK", "0")) != 0:
        yield
        return
    with locks.hold(out / rundir.LOCK_FILE, out, "featcache train"):
        yield


def _train(cfg: TrainConfig, out: Path) -> dict[str, Any]:
    if cfg.resume and (final := rundir.read_final(out)) is not None:
        return final
    _refuse_overwrite(out, cfg.resume)
    run = setup(cfg, out)
    with run.console:
        run.console.lines(run.summary)
        state = restore(run) if cfg.resume else RunState()
        run.console.start(total_steps(run), state.step, cfg.epochs)
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
    if not resume and (out / rundir.METRICS_FILE).exists():
        raise RunExistsError(f"{str(out)!r} already holds a run; pass --resume to continue it or choose another --out")


def check_same_run(out: Path, cfg: TrainConfig) -> None:
    """``--resume`` must continue the same run: only :data:`featcache.rundir.NEUTRAL_KEYS` may differ."""
    path = out / rundir.CONFIG_FILE
    if not path.is_file():
        return
    changed = rundir.changed_keys(load_yaml(path), to_dict(cfg))
    if changed:
        raise ConfigError(f"--resume with different settings than the run in {str(out)!r}: {changed}; "
                          "resume with the original options or train into a new --out")


def setup(cfg: TrainConfig, out: Path) -> Run:
    """Build everything (compat check first) and ``prepare`` it once."""
    accelerator = make_accelerator(cfg, out)
    set_seed(cfg.seed)
    reader = open_reader(cfg.cache)
    manifest = reader.manifest
    specs = resolve_methods(cfg, manifest)  # runs the compatibility check before anything is built
    img_size = int(manifest["img_size"])
    cfg = dataclasses.replace(cfg, img_size=img_size, ce_weight=resolve_ce_weight(cfg, specs),
                              mixed_precision=accelerator.mixed_precision)
    if cfg.resume:
        check_same_run(out, cfg)  # every process, before the main one rewrites the file
    student = build_student(cfg, manifest, specs, img_size)
    data_cfg = normalization(student)  # the student's own, as timm would use
    task = build_task(cfg, manifest, student, specs, img_size)
    needed = required_targets(manifest, specs)
    decode = resolve_decode(cfg, accelerator.device)
    stream = use_stream(cfg, reader)
    dataset, sampler, train_loader = build_train_loader(cfg, reader, needed, decode, stream,
                                                        accelerator.process_index, accelerator.num_processes)
    eval_loader = build_eval_loader(cfg, manifest, img_size, data_cfg)
    optimizer = build_optimizer(cfg, task, accelerator.num_processes)
    scheduler = build_scheduler(cfg, optimizer, len(train_loader), accelerator.num_processes)
    if stream:  # already split by rank: preparing it would split it again
        task, optimizer, eval_loader, scheduler = accelerator.prepare(task, optimizer, eval_loader, scheduler)
        train_loader = DeviceLoader(train_loader, accelerator.device)
    else:
        prepared = accelerator.prepare(task, optimizer, train_loader, eval_loader, scheduler)
        task, optimizer, train_loader, eval_loader, scheduler = prepared
    targets_fn = build_targets_fn(cfg, manifest, needed, accelerator.device, decode)
    ema = build_ema(cfg, accelerator.unwrap_model(task).student)  # after prepare: on the student's device
    _write_config(accelerator, out, cfg)
    costs = _costs(cfg, task, accelerator)
    summary = start_summary(cfg, manifest, accelerator, task, steps_per_epoch(cfg, len(train_loader)), costs)
    summary += _alone_warning(accelerator)
    if stream:
        summary.append(f"read     streamed: whole wds shards in a seeded order per epoch, split over "
                       f"{accelerator.num_processes} process(es) x {max(cfg.workers, 1)} loader worker(s)")
    return Run(cfg, out, accelerator, task, optimizer, scheduler, train_loader, eval_loader, dataset, sampler,
               data_cfg["mean"], data_cfg["std"], targets_fn, MetricsLog(out, accelerator), costs,
               student_spec(cfg, manifest, img_size), Console.for_run(out, accelerator, cfg.quiet), summary,
               data_cfg, ema)


def make_accelerator(cfg: TrainConfig, out: Path) -> Accelerator:
    """The Accelerator, with Accelerate's own settings wherever featcache has no flag of its own.

    ``accelerate launch`` (or ``accelerate config``) decides the processes, and the mixed precision unless
    ``--mixed-precision`` is given. Trackers come from ``--report-to``, TensorBoard's files go below ``tensorboard/``.
    """
    # Label-free methods leave the student head without gradients; DDP must be told some parameters may be unused.
    ddp = DistributedDataParallelKwargs(find_unused_parameters=True)
    project = ProjectConfiguration(project_dir=str(out), logging_dir=str(out / rundir.TENSORBOARD_DIR))
    # Pinned batches (the loaders pin on CUDA) copy to the device without blocking: the next batch's copy runs while
    # this step computes.
    return Accelerator(mixed_precision=cfg.mixed_precision, cpu=_launched_without_devices(),
                       gradient_accumulation_steps=cfg.grad_accum, project_config=project, kwargs_handlers=[ddp],
                       log_with=trackers.log_with(cfg.report_to),
                       dataloader_config=DataLoaderConfiguration(non_blocking=True))


def _launched_without_devices() -> bool:
    """Several processes (``accelerate launch --multi_gpu``, ``torchrun``) on a machine with no accelerator device.

    Accelerate then gives each process a world of its own unless told to use the CPU: all would train on all the
    data and write the same files. Told, they form one gloo group, as ``ACCELERATE_USE_CPU=true`` would.
    """
    device = torch.accelerator.is_available() if hasattr(torch, "accelerator") else torch.cuda.is_available()
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and not device


def _alone_warning(accelerator: Accelerator) -> list[str]:
    """``accelerate launch --num_processes N`` without ``--multi_gpu`` starts one process on a machine without GPUs
    (its simple launcher, which sets ``MASTER_PORT`` but no ``WORLD_SIZE``): say so rather than train alone."""
    launched = "ACCELERATE_MIXED_PRECISION" in os.environ and "MASTER_PORT" in os.environ
    if accelerator.num_processes > 1 or "WORLD_SIZE" in os.environ or not launched:
        return []
    return ["warning  `accelerate launch` started this one process although it was given a master port (as for "
            "--num_processes > 1): without GPUs it starts several only with --multi_gpu "
            "(`accelerate launch --multi_gpu --num_processes N ...`, or `accelerate config`: multi-GPU)"]


def _write_config(accelerator: Accelerator, out: Path, cfg: TrainConfig) -> None:
    """The resolved config (image size, CE weight, precision filled in), once every process has checked the old one;
    the trackers record it as the run's hyperparameters."""
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        rundir.write_config(out, cfg)
    hparams = trackers.hyperparameters({**to_dict(cfg), "num_processes": accelerator.num_processes})
    accelerator.init_trackers(cfg.tracker_project, config=hparams,
                              init_kwargs=trackers.init_kwargs(out.resolve().name))


def _costs(cfg: TrainConfig, task: torch.nn.Module, accelerator: Accelerator) -> list[str]:
    """One sentence per teacher compute that runs at train time (the report's "online teacher" column)."""
    methods = accelerator.unwrap_model(task).methods
    costs = [f"{name}: {c}" for name, m in methods.items() if (c := m.online_teacher_cost())] or [
        "cache-only: no teacher compute at train time"]
    if cfg.online_teacher:
        costs.append("--online-teacher: a full teacher forward runs on every batch (no cache targets are read)")
    if cfg.fresh_views:
        costs.append("--fresh-views: new views every epoch from (seed, epoch, sample) with the cache's recipe")
    return costs


def steps_per_epoch(cfg: TrainConfig, batches: int) -> int:
    """Optimizer steps in an epoch of ``batches`` micro-batches (Accelerate steps at the loader's end too)."""
    return math.ceil(batches / cfg.grad_accum)


def total_steps(run: Run) -> int:
    total = steps_per_epoch(run.cfg, len(run.train_loader)) * run.cfg.epochs
    return min(total, run.cfg.max_steps) if run.cfg.max_steps is not None else total


# ------------------------------------------------------------------------------------------------ the loop


def set_epoch(run: Run, loader: Any, epoch: int) -> None:
    """Point the sampler, the dataset and Accelerate's loader wrapper at ``epoch``."""
    run.sampler.set_epoch(epoch)
    run.dataset.set_epoch(epoch)
    loader.set_epoch(epoch)  # DataLoaderShard re-applies its own counter to the sampler at __iter__
    run.console.epoch(epoch)


def train_epoch(run: Run, state: RunState, epoch: int) -> bool:
    """One (possibly partial, when resuming) epoch; returns True when ``max_steps`` is reached."""
    acc = run.accelerator
    if state.epoch != epoch:
        state.epoch, state.batches_done = epoch, 0
    loader = _skip_batches(run, state.batches_done)
    set_epoch(run, loader, epoch)
    run.task.train()
    meter, tick = Meter(), time.perf_counter()
    for batch in loader:
        parts = train_step(run, batch, meter)
        state.batches_done += 1
        meter.update(parts, len(batch["label"]) * acc.num_processes)
        if acc.sync_gradients:
            now = time.perf_counter()
            state.train_time_s, tick = state.train_time_s + now - tick, now
            state.step += 1
            after_step(run, state, meter)
            if _reached_max_steps(run, state):
                break
    if meter.count:  # the last steps of the epoch when it does not end on a multiple of log_every
        log_train(run, state, meter)
    return _reached_max_steps(run, state)


def _skip_batches(run: Run, batches: int) -> Any:
    """The train loader from batch ``batches`` of the epoch on (a resume mid-epoch)."""
    if not batches:
        return run.train_loader
    if isinstance(run.train_loader, DeviceLoader):
        return run.train_loader.skip(batches)
    return run.accelerator.skip_first_batches(run.train_loader, batches)


def train_step(run: Run, batch: Mapping[str, Any], meter: Meter) -> dict[str, torch.Tensor]:
    """One micro-batch: forward, backward, and (when the accumulation window closes) clip + optimizer step."""
    acc, task = run.accelerator, run.task
    targets = run.targets_fn(batch)
    with acc.accumulate(task):
        parts = task(normalize(batch["image"], run.mean, run.std), targets, batch["label"])
        acc.backward(parts["loss"])
        if acc.sync_gradients and run.cfg.grad_clip:
            acc.clip_grad_norm_(task.parameters(), run.cfg.grad_clip)
        meter.lr = run.optimizer.param_groups[0]["lr"]  # the rate this step used
        run.optimizer.step()
        run.scheduler.step()
        run.optimizer.zero_grad()
    return parts


def _reached_max_steps(run: Run, state: RunState) -> bool:
    return run.cfg.max_steps is not None and state.step >= run.cfg.max_steps


def after_step(run: Run, state: RunState, meter: Meter) -> None:
    """Log every ``log_every`` steps; checkpoint every ``checkpoint_every`` steps inside an epoch."""
    cfg = run.cfg
    if run.ema is not None:
        run.ema.update(run.accelerator.unwrap_model(run.task).student, step=state.step)
    state.images_seen += meter.pending_images()
    run.console.advance(state.step)
    if state.step % max(cfg.log_every, 1) == 0:
        log_train(run, state, meter)
    mid_epoch = state.batches_done < len(run.train_loader)
    if cfg.checkpoint_every and state.step % cfg.checkpoint_every == 0 and mid_epoch:
        save_checkpoint(run, state)


def log_train(run: Run, state: RunState, meter: Meter) -> None:
    record = {"kind": "train", "epoch": state.epoch, "step": state.step, **meter.flush(run.accelerator)}
    record["lr"] = meter.lr
    run.log.write(record)
    run.console.train(record)


def end_epoch(run: Run, state: RunState, epoch: int) -> None:
    """Evaluate, then checkpoint the finished epoch (so a resume starts the next one)."""
    if run.eval_loader is not None:
        metrics = evaluate(run)
        state.last_eval = metrics
        if state.best_top1 is None or metrics["top1"] > state.best_top1:
            state.best_top1, state.best_epoch = metrics["top1"], epoch
            save_best(run)
        record = {"kind": "eval", "epoch": epoch, "step": state.step, **metrics}
        run.log.write(record)
        run.console.eval(record, state.best_top1)
    state.epoch, state.batches_done = epoch + 1, 0
    save_checkpoint(run, state)


def evaluate(run: Run) -> dict[str, float]:
    """Top-1/top-5 (%) of the student (and ``ema_top1``/``ema_top5`` of its EMA) on the held-out set."""
    metrics = evaluate_model(run, run.accelerator.unwrap_model(run.task).student)
    if run.ema is not None:
        metrics.update({f"ema_{k}": v for k, v in evaluate_model(run, run.ema.module).items()})
    return metrics


@torch.no_grad()
def evaluate_model(run: Run, model: torch.nn.Module) -> dict[str, float]:
    """Top-1/top-5 (%) of ``model`` on the held-out set, gathered over processes."""
    acc = run.accelerator
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
    path = rundir.checkpoint_dir(run.out, state.step)
    run.accelerator.save_state(str(path))
    if run.accelerator.is_main_process:
        if run.ema is not None:  # safetensors, not register_for_checkpointing: Accelerate unpickles custom state
            rundir.write_checkpoint_ema(path, run.ema.module.state_dict())
        rundir.write_checkpoint_state(path, dataclasses.asdict(state))
        for old in rundir.complete_checkpoints(run.out)[:-KEEP_CHECKPOINTS]:
            shutil.rmtree(old, ignore_errors=True)
    run.accelerator.wait_for_everyone()
    return path


def restore(run: Run) -> RunState:
    """``--resume``: load the latest complete checkpoint (fresh start if there is none)."""
    latest = rundir.latest_checkpoint(run.out)
    if latest is None:
        run.console.line(f"--resume: no checkpoint in {run.out / rundir.CHECKPOINTS_DIR}, starting fresh")
        run.log.truncate(0)  # and with a clean log: what the killed run logged is about to be logged again
        return RunState()
    run.accelerator.load_state(str(latest))
    if run.ema is not None:
        run.ema.module.load_state_dict(rundir.read_checkpoint_ema(latest))
    state = RunState(**rundir.read_checkpoint_state(latest))
    run.log.truncate(state.step)  # drop records the killed run wrote after this checkpoint
    run.console.line(f"resumed from {latest} (epoch {state.epoch + 1}, step {state.step})")
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
              "student": run.cfg.student, "online_teacher_cost": run.costs, "best_epoch": state.best_epoch}
    if run.ema is not None:
        result.update({k: (state.last_eval or {}).get(k) for k in ("ema_top1", "ema_top5")})
    if acc.is_main_process:
        task = acc.unwrap_model(run.task)
        spec = export_student(task, run.out, run.student_spec, run.data_config)
        result["student"] = spec["model"]  # a method may build the student (e.g. WeCoLoRA: the cut teacher)
        if run.ema is not None:
            img_size = int(spec["img_size"])
            rundir.write_timm_model(run.out / rundir.STUDENT_EMA_DIR, plain_student(task, run.ema.module),
                                    run.data_config, img_size)
        rundir.write_metrics_csv(run.out)
        rundir.write_final(run.out, result)
    run.console.end(end_summary(run.out, result))
    acc.end_training()
    return result


def export_student(task: DistillTask, out: Path, spec: dict[str, Any], data_config: dict[str, Any]
                   ) -> dict[str, Any]:
    """Save the plain timm student (:func:`plain_student`) in timm's format + ``student.json`` (see rundir).

    A method that changes the architecture (WeCoLoRA) sets ``featcache_spec`` on the model it returns
    (``{"model", "img_size", "num_classes", "model_kwargs"}``); otherwise the run's ``--student`` spec holds.
    """
    student = plain_student(task)
    spec = dict(getattr(student, "featcache_spec", None) or spec)
    return rundir.write_student(out, student, spec, data_config["mean"], data_config["std"], data_config)


def plain_student(task: DistillTask, student: torch.nn.Module | None = None) -> torch.nn.Module:
    """``student`` (default: the task's) with each method's ``export_student`` applied in turn (e.g. LoRA merged)."""
    student = task.student if student is None else student
    for method in task.methods.values():
        student = method.export_student(student)
    return student


def save_best(run: Run) -> None:
    """Export the student of the best top-1 so far to ``student_best/`` (next to the last, ``student/``)."""
    if run.accelerator.is_main_process:
        student = plain_student(run.accelerator.unwrap_model(run.task))
        rundir.write_timm_model(run.out / rundir.STUDENT_BEST_DIR, student, run.data_config, run.cfg.img_size)
