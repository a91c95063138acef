"""Building blocks of the stage-2 loop (`featcache.engine`): methods, student, optimizer, schedule, logging.

Kept apart from the loop so ``engine.py`` reads like Accelerate's examples; nothing here branches on a method.
"""
from __future__ import annotations

import csv
import json
import math
import time
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.nn as nn
from accelerate import Accelerator

from . import compat
from .config import TrainConfig
from .methods import METHODS, DistillTask, MethodContext, parse_method_spec
from .manifest import Manifest

# (name, class, keyword arguments, weight in the composite)
Spec = tuple[str, type, dict[str, Any], float]


def split_method_args(names: list[str], method_args: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Per-method keyword arguments: ``{"alpha": 1}`` for one method, ``{"vitkd": {...}, "nkd": {...}}`` for several.

    A single method also accepts the nested form (``{"vitkd": {...}}``).
    """
    args = dict(method_args or {})
    if len(names) == 1 and not (set(args) == {names[0]} and isinstance(args[names[0]], Mapping)):
        return {names[0]: args}
    unknown = sorted(set(args) - set(names))
    if unknown:
        raise ValueError(f"--method-arg keys {unknown} name no method of {'+'.join(names)}; with several methods "
                         "write name.key=value, e.g. --method-arg nkd.temperature=1.0")
    for name, value in args.items():
        if not isinstance(value, Mapping):
            raise ValueError(f"method_args[{name!r}] must be a mapping of keyword arguments, got {value!r}")
    return {n: dict(args.get(n, {})) for n in names}


def resolve_methods(cfg: TrainConfig, manifest: Manifest) -> list[Spec]:
    """Parse ``--method``, split ``method_args`` and run the compatibility check (before anything is built)."""
    parsed = parse_method_spec(cfg.method)
    names = [n for n, _ in parsed]
    if len(set(names)) != len(names):
        raise ValueError(f"--method {cfg.method!r} names a method twice; give each method once")
    per_method = split_method_args(names, cfg.method_args)
    specs = [(n, METHODS.get(n), per_method[n], w) for n, w in parsed]
    compat.check(manifest, cfg, [(n, cls, args) for n, cls, args, _ in specs])
    return specs


def build_student(cfg: TrainConfig, manifest: Manifest, specs: list[Spec], img_size: int) -> nn.Module:
    """The student a method builds (at most one may, e.g. WeCoLoRA's weight copy), else the timm ``--student``."""
    built = [(n, m) for n, cls, args, _ in specs if (m := cls.build_student(manifest, cfg.student, img_size, **args))
             is not None]
    if len(built) > 1:
        raise ValueError(f"methods {[n for n, _ in built]} each build their own student; combine at most one of them")
    if built:
        return built[0][1]
    from . import teachers

    num_classes = cfg.num_classes or int(manifest["teacher"]["num_classes"])
    return teachers.load_model(cfg.student, pretrained=cfg.pretrained, checkpoint=cfg.student_checkpoint,
                               img_size=img_size, num_classes=num_classes, init_seed=cfg.seed, **cfg.student_kwargs)


def build_task(cfg: TrainConfig, manifest: Manifest, student: nn.Module, specs: list[Spec], img_size: int
               ) -> DistillTask:
    """Instantiate every method on the student and wrap them in the one trainable module."""
    ctx = MethodContext(manifest, student, img_size)
    methods = {}
    for name, cls, args, weight in specs:
        try:
            methods[name] = (cls(ctx, **args), weight)
        except (TypeError, ValueError) as err:
            raise compat.CompatError(f"method {name} cannot run on this cache/student: {err}") from err
    ce_weight = cfg.ce_weight if cfg.ce_weight is not None else min(cls.default_ce_weight for _, cls, _, _ in specs)
    return DistillTask(student, methods, ce_weight=ce_weight, label_smoothing=cfg.label_smoothing)


def build_optimizer(cfg: TrainConfig, task: DistillTask, num_processes: int) -> torch.optim.Optimizer:
    """AdamW without weight decay on 1-D params, biases and the student's ``no_weight_decay()`` (timm style)."""
    from timm.optim import param_groups_weight_decay

    skip = getattr(task.student, "no_weight_decay", lambda: set())()
    groups = param_groups_weight_decay(task, cfg.weight_decay, no_weight_decay_list=[f"student.{n}" for n in skip])
    lr = cfg.lr
    if cfg.lr_base_batch:
        lr = cfg.lr * cfg.batch_size * cfg.grad_accum * num_processes / cfg.lr_base_batch
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(cfg.betas))


def build_scheduler(cfg: TrainConfig, optimizer: torch.optim.Optimizer, batches_per_epoch: int, num_processes: int
                    ) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-step linear warmup over ``warmup_epochs``, then cosine from ``lr`` to ``min_lr``.

    Counted in *global* optimizer steps (Accelerate steps a prepared scheduler once per process per step),
    from the loader length before ``prepare``, as in Accelerate's examples.
    """
    steps_per_epoch = math.ceil(batches_per_epoch / cfg.grad_accum)
    total = steps_per_epoch * cfg.epochs
    if cfg.max_steps is not None:
        total = min(total, cfg.max_steps * num_processes)
    warmup = int(round(cfg.warmup_epochs * steps_per_epoch))
    base_lr = optimizer.param_groups[0]["lr"]
    floor = min(cfg.min_lr / base_lr, 1.0) if base_lr > 0 else 0.0

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min((step - warmup) / max(total - warmup, 1), 1.0)
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


class Meter:
    """Sums the loss parts of the micro-batches since the last log (on device; one sync per log)."""

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.count = 0
        self.images = 0
        self._unreported_images = 0
        self.lr = 0.0
        self.window_start = time.perf_counter()

    def update(self, parts: Mapping[str, torch.Tensor], images: int) -> None:
        for key, value in parts.items():
            if value.ndim == 0:
                value = value.detach().float()
                self.sums[key] = self.sums[key] + value if key in self.sums else value
        self.count += 1
        self.images += images
        self._unreported_images += images

    def pending_images(self) -> int:
        n, self._unreported_images = self._unreported_images, 0
        return n

    def flush(self, accelerator: Accelerator) -> dict[str, float]:
        """Mean of each part over the window and over processes; resets the window."""
        if not self.sums:
            return {}
        keys = sorted(self.sums)
        stacked = accelerator.reduce(torch.stack([self.sums[k] for k in keys]) / self.count, reduction="mean")
        out = {k: float(v) for k, v in zip(keys, stacked.tolist())}
        now = time.perf_counter()
        out["images_per_s"] = self.images / max(now - self.window_start, 1e-9)
        self.sums, self.count, self.images, self.window_start = {}, 0, 0, now
        return out


class MetricsLog:
    """``metrics.jsonl`` (+ TensorBoard through the accelerator), written by the main process only."""

    def __init__(self, out: Path, accelerator: Accelerator):
        self.path = out / "metrics.jsonl"
        self.accelerator = accelerator

    def write(self, record: dict[str, Any]) -> None:
        scalars = {f"{record['kind']}/{k}": v for k, v in record.items()
                   if k not in ("kind", "step", "epoch") and isinstance(v, (int, float))}
        self.accelerator.log(scalars, step=int(record["step"]))
        if self.accelerator.is_main_process:
            with open(self.path, "a") as fh:
                fh.write(json.dumps(record) + "\n")

    def records(self) -> list[dict[str, Any]]:
        if not self.path.is_file():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]

    def truncate(self, step: int) -> None:
        """Keep only records up to ``step`` (a resumed run rewrites what the killed one logged after it)."""
        if self.accelerator.is_main_process and self.path.is_file():
            kept = [r for r in self.records() if int(r["step"]) <= step]
            self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))

    def to_csv(self) -> None:
        """``metrics.csv``: every record, columns = the union of keys (blank where a record lacks one)."""
        records = self.records()
        columns = list(dict.fromkeys(k for r in records for k in r))
        with open(self.path.with_suffix(".csv"), "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=columns)
            writer.writeheader()
            writer.writerows(records)


def export_student(task: DistillTask, out: Path, spec: dict[str, Any], mean: list[float], std: list[float]
                   ) -> dict[str, Any]:
    """Save the plain timm student (each method's ``export_student`` applied in turn) + ``student.json``.

    A method that changes the architecture (WeCoLoRA) sets ``featcache_spec`` on the model it returns
    (``{"model", "img_size", "num_classes", "model_kwargs"}``); otherwise the run's ``--student`` spec holds.
    """
    from safetensors.torch import save_file

    student = task.student
    for method in task.methods.values():
        student = method.export_student(student)
    spec = dict(getattr(student, "featcache_spec", None) or spec)
    state = {k: v.detach().cpu().contiguous() for k, v in student.state_dict().items()}
    save_file(state, str(out / "student.safetensors"), metadata={"model": str(spec["model"])})
    (out / "student.json").write_text(json.dumps({**spec, "mean": list(mean), "std": list(std)}, indent=1))
    return spec
