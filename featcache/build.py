"""What the stage-2 loop (:mod:`featcache.engine`) trains with: methods, student, task, optimizer, schedule, loaders.

Kept apart from the loop so ``engine.py`` reads like Accelerate's examples. Nothing here branches on a method: a
method says what it needs (targets, a student it builds itself) through :class:`featcache.methods.Method`.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import torch
import torch.nn as nn
from torch.utils.data import DataLoader

from . import compat
from .config import TrainConfig
from .errors import CompatError, ConfigError
from .manifest import Manifest, block_index
from .methods import MethodContext
from .methods.task import DistillTask, MethodSpec, method_specs
from .models import load_model, resolve_name
from .views import normalize

def resolve_methods(cfg: TrainConfig, manifest: Manifest) -> list[MethodSpec]:
    """Parse ``--method`` + ``method_args`` and run the compatibility check (before anything is built)."""
    specs = method_specs(cfg.method, cfg.method_args)
    compat.check(manifest, cfg, specs)
    return specs


def resolve_ce_weight(cfg: TrainConfig, specs: Sequence[MethodSpec]) -> float:
    """``--ce-weight``, else the smallest default of the methods (0 as soon as one is label-free)."""
    return cfg.ce_weight if cfg.ce_weight is not None else min(cls.default_ce_weight for _, cls, _, _ in specs)


def required_targets(manifest: Manifest, specs: Sequence[MethodSpec]) -> list[str]:
    """The cached targets the methods read, sorted (the loader reads nothing else)."""
    return sorted({t for _, cls, args, _ in specs for t in cls.required_targets(manifest, **args)})


def student_spec(cfg: TrainConfig, manifest: Manifest, img_size: int) -> dict[str, Any]:
    """The ``--student`` spec ``student.json`` records unless a method builds (and describes) its own student.

    ``model`` is the real timm name behind an alias (``deit_tiny`` -> ``deit_tiny_patch16_224.fb_in1k``), which
    ``timm.create_model`` takes without featcache.
    """
    return {"model": resolve_name(cfg.student), "img_size": img_size, "num_classes": _num_classes(cfg, manifest),
            "model_kwargs": dict(cfg.student_kwargs)}


def _num_classes(cfg: TrainConfig, manifest: Manifest) -> int:
    return int(cfg.num_classes or manifest["teacher"]["num_classes"])


def build_student(cfg: TrainConfig, manifest: Manifest, specs: Sequence[MethodSpec], img_size: int) -> nn.Module:
    """The student a method builds (at most one may, e.g. WeCoLoRA's weight copy), else the timm ``--student``."""
    built = [(n, m) for n, cls, args, _ in specs if (m := cls.build_student(manifest, cfg.student, img_size, **args))
             is not None]
    if len(built) > 1:
        raise ConfigError(f"methods {[n for n, _ in built]} each build their own student; combine at most one of them")
    if built:
        return built[0][1]
    return load_model(cfg.student, pretrained=cfg.pretrained, checkpoint=cfg.student_checkpoint, img_size=img_size,
                      num_classes=_num_classes(cfg, manifest), init_seed=cfg.seed, **cfg.student_kwargs)


def build_task(cfg: TrainConfig, manifest: Manifest, student: nn.Module, specs: Sequence[MethodSpec], img_size: int
               ) -> DistillTask:
    """Instantiate every method on the student and wrap them in the one trainable module."""
    ctx = MethodContext(manifest, student, img_size)
    methods = {}
    for name, cls, args, weight in specs:
        try:
            methods[name] = (cls(ctx, **args), weight)
        except (TypeError, ValueError) as err:
            raise CompatError(f"method {name} cannot run on this cache/student: {err}") from err
    return DistillTask(student, methods, ce_weight=resolve_ce_weight(cfg, specs),
                       label_smoothing=cfg.label_smoothing)


#: ``--sched`` values: timm's schedules that step per optimizer update without a metric (``plateau`` needs one per
#: epoch; ``wsd``/``rsqrt`` fit their warmup inside the schedule, unlike featcache's cosine).
SCHEDULES = ("cosine", "tanh", "step", "multistep", "poly", "constant")

#: ``--sched-kwargs`` that count epochs; featcache schedules per optimizer step, so they are converted to steps.
_EPOCH_KWARGS = ("decay_epochs", "decay_milestones")


def build_optimizer(cfg: TrainConfig, task: DistillTask, num_processes: int) -> torch.optim.Optimizer:
    """``--opt`` from ``timm.optim.create_optimizer_v2``; no weight decay on 1-D params, biases and the student's
    ``no_weight_decay()`` (timm's ``param_groups_weight_decay``), ``--lr`` linearly scaled by ``--lr-base-batch``."""
    from timm.optim import create_optimizer_v2, param_groups_weight_decay

    skip = getattr(task.student, "no_weight_decay", lambda: set())()
    groups = param_groups_weight_decay(task, cfg.weight_decay, no_weight_decay_list=[f"student.{n}" for n in skip])
    lr = cfg.lr
    if cfg.lr_base_batch:
        lr = cfg.lr * cfg.batch_size * cfg.grad_accum * num_processes / cfg.lr_base_batch
    kwargs = {"weight_decay": cfg.weight_decay, "betas": tuple(cfg.betas), **cfg.opt_kwargs}
    try:
        return create_optimizer_v2(groups, opt=cfg.opt, lr=lr, **kwargs)
    except ValueError as err:
        raise ConfigError(f"--opt {cfg.opt!r} / --opt-kwargs {cfg.opt_kwargs}: {err}; list the optimizers with "
                          "`python -c 'import timm.optim; print(timm.optim.list_optimizers())'`") from None


def build_scheduler(cfg: TrainConfig, optimizer: torch.optim.Optimizer, batches_per_epoch: int, num_processes: int
                    ) -> "TimmScheduler":
    """``--sched`` from ``timm.scheduler.create_scheduler_v2``: linear warmup over ``warmup_epochs``, then the schedule
    from ``lr`` (to ``min_lr`` for the decaying ones) over the remaining steps.

    Counted in *global* optimizer steps (Accelerate steps a prepared scheduler once per process per step),
    from the loader length before ``prepare``, as in Accelerate's examples.
    """
    from timm.scheduler import create_scheduler_v2

    if cfg.sched not in SCHEDULES:
        raise ConfigError(f"--sched {cfg.sched!r} is not one of {', '.join(SCHEDULES)}")
    steps_per_epoch = math.ceil(batches_per_epoch / cfg.grad_accum)
    total = steps_per_epoch * cfg.epochs
    if cfg.max_steps is not None:
        total = min(total, cfg.max_steps * num_processes)
    warmup = int(round(cfg.warmup_epochs * steps_per_epoch))
    base_lr = optimizer.param_groups[0]["lr"]
    kwargs = {"noise_seed": cfg.seed, **cfg.sched_kwargs}
    for key in set(_EPOCH_KWARGS) & set(kwargs):
        value = kwargs[key]
        kwargs[key] = [v * steps_per_epoch for v in value] if isinstance(value, list) else value * steps_per_epoch
    # One timm "epoch" is one optimizer step here (updates_per_epoch=1), so every length below is in steps.
    scheduler, _ = create_scheduler_v2(optimizer, sched=cfg.sched, num_epochs=max(total - warmup, 1),
                                       warmup_epochs=warmup, warmup_lr=0.0, warmup_prefix=True,
                                       min_lr=min(cfg.min_lr, base_lr), step_on_epochs=False, updates_per_epoch=1,
                                       **kwargs)
    return TimmScheduler(optimizer, scheduler, warmup)


class TimmScheduler(torch.optim.lr_scheduler.LRScheduler):
    """A timm scheduler stepped like a torch one, so that Accelerate prepares, steps and checkpoints it.

    timm's schedulers are told the update count (``step_update(n)``); this one counts the global optimizer steps
    (torch's ``last_epoch``) and asks timm for each step's rate. Step ``k < warmup`` runs at timm's warmup value of
    update ``k + 1``, i.e. ``(k + 1) / warmup`` of the peak (no step at lr 0), and the schedule proper starts at the
    peak on step ``warmup``: the rates featcache's own warmup + cosine gave before it used timm's factories.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, scheduler: Any, warmup_steps: int):
        self.timm_scheduler = scheduler
        self.warmup_steps = int(warmup_steps)
        super().__init__(optimizer)

    def get_lr(self) -> list[float]:
        step = self.last_epoch
        self.timm_scheduler.step_update(step + 1 if step < self.warmup_steps else step)
        return [group["lr"] for group in self.optimizer.param_groups]

    def state_dict(self) -> dict[str, Any]:
        """torch's state without the timm object (stateless: it is rebuilt from the config and the step count)."""
        return {k: v for k, v in super().state_dict().items() if k != "timm_scheduler"}


def build_ema(cfg: TrainConfig, student: nn.Module) -> nn.Module | None:
    """``--model-ema``: timm's ``ModelEmaV3`` of the student (on its device), else ``None``."""
    if not cfg.model_ema:
        return None
    from timm.utils import ModelEmaV3

    return ModelEmaV3(student, decay=cfg.model_ema_decay, use_warmup=cfg.model_ema_warmup)


def _loader_kwargs(cfg: TrainConfig) -> dict[str, Any]:
    # Worker seeds come from the loader's own generator, never from the global RNG that load_state restores.
    return {"batch_size": cfg.batch_size, "num_workers": cfg.workers, "pin_memory": torch.cuda.is_available(),
            "generator": torch.Generator().manual_seed(cfg.seed)}


def resolve_decode(cfg: TrainConfig, device: torch.device) -> str:
    """``--decode auto`` -> ``device`` on CUDA (the compact bytes cross the bus), else ``workers`` (the decode runs
    in the loader workers, in parallel with the step, instead of in it)."""
    from .datasets import DECODE_CHOICES

    if cfg.decode not in DECODE_CHOICES:
        raise ConfigError(f"--decode {cfg.decode!r}: choose one of {', '.join(DECODE_CHOICES)}")
    if cfg.decode != "auto":
        return cfg.decode
    return "device" if device.type == "cuda" else "workers"


def use_stream(cfg: TrainConfig, reader: Any) -> bool:
    """``--stream`` / ``--no-stream``, by default on for a wds cache on object storage (where a round trip per item
    is what random access costs) and off otherwise.

    Raises:
        ConfigError: for ``--stream`` with ``--grad-accum`` > 1 (a stream's epoch need not end on a full
            accumulation window, and its loader is not prepared, so Accelerate could not close it).
    """
    from .storage import is_local

    remote_wds = reader.manifest["storage"]["format"] == "wds" and not is_local(reader.path)
    stream = cfg.stream if cfg.stream is not None else remote_wds and not cfg.fresh_views
    if stream and (cfg.labelled_only or cfg.labelled_batch):
        flag = "--labelled-only" if cfg.labelled_only else "--labelled-batch"
        raise ConfigError(f"--stream reads whole shards, every sample of them, so it cannot serve the labelled samples "
                          f"on their own; pass --no-stream with {flag}")
    if stream and cfg.grad_accum > 1:
        raise ConfigError(f"--stream with --grad-accum {cfg.grad_accum} is not supported; pass --no-stream (random "
                          "access) or --grad-accum 1")
    return stream


def build_train_loader(cfg: TrainConfig, reader: Any, needed: list[str], decode: str = "workers",
                       stream: bool = False, rank: int = 0, world_size: int = 1) -> tuple[Any, Any, DataLoader]:
    """The cached views (replayed from their source images, or new ones with ``--fresh-views``) with their targets:
    ``(dataset, sampler, loader)``. With ``stream``, the loader reads a :class:`~featcache.streaming.StreamedViews`
    of this ``rank`` (which is also the sampler: it takes the epoch), already batched and split over the
    ``world_size`` processes: it must not be given to ``accelerator.prepare``."""
    from .datasets import CachedViewDataset
    from .samplers import EpochSampler
    from .sources import source_from_manifest
    from .views import Recipe

    if cfg.labelled_batch and cfg.ce_weight == 0:
        raise ConfigError(f"--labelled-batch {cfg.labelled_batch} adds labelled items for the label loss, but "
                          f"--method {cfg.method} trains without labels (label CE weight 0); drop --labelled-batch, "
                          "or give the labels a weight with --ce-weight W")
    manifest = reader.manifest
    source = source_from_manifest(manifest, root=cfg.data)
    dataset = CachedViewDataset(reader, source, Recipe.from_dict(manifest["views"]["recipe"]), needed,
                                view_policy=cfg.view_policy, label_shots=cfg.label_shots, seed=cfg.seed,
                                fingerprint_checks=cfg.fingerprint_checks, with_targets=not cfg.online_teacher,
                                num_classes=_num_classes(cfg, manifest), label_smoothing=cfg.label_smoothing,
                                fresh_views=cfg.fresh_views, max_views=_max_views(cfg, manifest),
                                decode=decode, labelled_only=cfg.labelled_only, keep_decoded=cfg.keep_decoded)
    if stream:
        from .streaming import StreamedViews

        views = StreamedViews(dataset, cfg.batch_size, rank, world_size, cfg.workers, cfg.seed)
        return dataset, views, DataLoader(views, **dict(_loader_kwargs(cfg), batch_size=None))
    if cfg.labelled_batch:
        return _labelled_batches(cfg, dataset)
    sampler = EpochSampler(len(dataset), seed=cfg.seed)
    return dataset, sampler, DataLoader(dataset, sampler=sampler, drop_last=False, **_loader_kwargs(cfg))


def _labelled_batches(cfg: TrainConfig, dataset: Any) -> tuple[Any, Any, DataLoader]:
    """``--labelled-batch M``: each batch is ``--batch-size`` items of the epoch plus ``M`` labelled ones."""
    from .samplers import LabelledBatchSampler

    items = dataset.epoch_items
    dataset.add_labelled_stream(LabelledBatchSampler.labelled_items(items, cfg.batch_size, cfg.labelled_batch))
    sampler = LabelledBatchSampler(items, cfg.batch_size, cfg.labelled_batch, len(dataset.labelled_positions),
                                   seed=cfg.seed)
    kwargs = {k: v for k, v in _loader_kwargs(cfg).items() if k != "batch_size"}  # the batch sampler sizes batches
    return dataset, sampler, DataLoader(dataset, batch_sampler=sampler, **kwargs)


def _max_views(cfg: TrainConfig, manifest: Manifest) -> int | None:
    """``--max-views``, refused when the cache holds fewer views."""
    if cfg.max_views is not None and cfg.max_views > manifest.views_per_sample:
        raise ConfigError(f"--max-views {cfg.max_views}: the cache holds {manifest.views_per_sample} views per sample; "
                          f"pass at most {manifest.views_per_sample} or extract more with --views")
    return cfg.max_views


def build_eval_loader(cfg: TrainConfig, manifest: Manifest, img_size: int, data_config: dict[str, Any]
                      ) -> DataLoader | None:
    """``--val`` as timm's evaluation transform at the cache's ``img_size``: resize to ``img_size / crop_pct`` and
    centre-crop, with the ``crop_pct`` and interpolation of the student's timm data config
    (:func:`featcache.models.normalization`); ``None`` without ``--val``."""
    if not cfg.val:
        return None
    from .datasets import EvalDataset
    from .sources import open_local_source

    if data_config.get("crop_mode", "center") != "center":
        raise ConfigError(f"the student's timm data config asks for crop_mode={data_config['crop_mode']!r}; --val "
                          "evaluates with centre crops only: use a student whose pretrained_cfg has crop_mode "
                          "'center', or evaluate the exported student with timm's own transforms")
    dataset = EvalDataset(open_local_source(cfg.val, "--val"), img_size, manifest["data"]["classes"],
                          crop_pct=data_config["crop_pct"], interpolation=data_config["interpolation"])
    return DataLoader(dataset, shuffle=False, **_loader_kwargs(cfg))


class OnlineTargets:
    """``--online-teacher``: the cache's teacher computes the targets on the replayed views of each batch.

    Targets are rounded through the cache's storage dtype (fp16/bf16), so for a cache without a lossy codec they
    equal the cached ones up to batch-composition float noise (with fp32, the teacher's exact outputs). The
    codec (``int8``, ``bitround``, ``--topk``) is not applied: against such a cache the online run sees the
    teacher's unquantised targets, so it is the reference the codec's error is measured against, not a parity run.
    """

    def __init__(self, manifest: Manifest, names: list[str], device: torch.device):
        from . import teachers  # imported here: the cached path must never touch the teacher

        self.teacher = teachers.teacher_from_manifest(manifest, device=device)
        blocks = sorted(i for i in map(block_index, names) if i is not None)
        self.layers = blocks or [int(manifest["teacher"]["num_blocks"]) - 1]
        self.names = names
        self.mean, self.std = manifest["normalization"]["mean"], manifest["normalization"]["std"]
        self.round_to = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(manifest["storage"]["dtype"])

    def __call__(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        out = self.teacher.targets(normalize(images, self.mean, self.std), self.layers)
        return {n: out[n].to(self.round_to).float() if self.round_to else out[n].float() for n in self.names}


class DeviceTargets:
    """``--decode device``: the batch's stored arrays (already on the device) decoded there into float32 targets."""

    def __init__(self, manifest: Manifest, names: list[str]):
        from .stores.encodings import encoding, stored_names

        self.shapes = {n: manifest["targets"][n]["shape"] for n in names}
        self.encodings = {n: encoding(manifest["targets"][n]["encoding"]) for n in names}
        self.arrays = {n: stored_names(manifest, [n]) for n in names}

    def __call__(self, stored: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {n: enc.decode_torch(n, {a: stored[a] for a in self.arrays[n]}, self.shapes[n])
                for n, enc in self.encodings.items()}


def build_targets_fn(cfg: TrainConfig, manifest: Manifest, names: list[str], device: torch.device, decode: str
                     ) -> Any:
    """batch -> the targets the methods read: the online teacher's, decoded on the device, or the batch's own."""
    if cfg.online_teacher:
        online = OnlineTargets(manifest, names, device)
        return lambda batch: online(batch["image"])
    if decode == "device":
        on_device = DeviceTargets(manifest, names)
        return lambda batch: on_device(batch["stored"]) if "stored" in batch else {}
    return lambda batch: batch.get("targets", {})
