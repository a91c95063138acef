"""Configs for extraction and training: dataclasses with the defaults, validation and YAML round-trip.

Config flows one way: recipe YAML + CLI overrides (options the user typed win) -> dataclass -> ``validate()`` ->
saved ``config.yaml``.
CLI option names are the field names with ``_`` -> ``-`` (``--batch-size`` sets ``batch_size``).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, TypeVar

import yaml

C = TypeVar("C")


@dataclass
class ExtractConfig:
    """Stage 1: which teacher, which data, which views, where and how to store."""

    data: str = ""
    out: str = ""
    teacher: str = "deit3_small"
    pretrained: bool = True
    checkpoint: str | None = None
    img_size: int | None = None  # None: the teacher's default input size
    num_classes: int | None = None
    teacher_kwargs: dict[str, Any] = field(default_factory=dict)  # extra timm.create_model kwargs (recorded)
    layers: list[int] = field(default_factory=lambda: [0, 1, -1])
    data_format: str | None = None  # folder | wds; None: detect
    shots: int | None = None
    fraction: float | None = None
    subset_seed: int = 0
    views: int = 4
    seed: int = 0
    scale: tuple[float, float] = (0.08, 1.0)  # RandomResizedCrop area range (DeiT default)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: float = 0.5
    color_jitter: float = 0.0
    format: str = "zarr"
    dtype: str = "fp16"
    codec: str = "none"
    topk: int | None = None
    shard_size: int = 256
    batch_size: int = 64
    workers: int = 2
    device: str = "auto"
    overwrite: bool = False
    skip_corrupt: bool = False

    def validate(self) -> None:
        if not self.data or not self.out:
            raise ValueError("extract needs --data DIR (images) and --out PATH (the cache)")
        if self.shots is not None and self.fraction is not None:
            raise ValueError("give --shots or --fraction, not both")
        if self.views < 1:
            raise ValueError(f"--views must be >= 1, got {self.views}")
        if not self.layers:
            raise ValueError("--layers must name at least one teacher block, e.g. --layers 0,1,11")


@dataclass
class TrainConfig:
    """Stage 2: one student trained from one cache with one (composite) method."""

    cache: str = ""
    out: str = "runs/run"
    method: str = "kd"
    method_args: dict[str, Any] = field(default_factory=dict)  # {"alpha": 3e-5} or {"vitkd": {...}, "nkd": {...}}
    student: str = "deit_tiny"
    pretrained: bool = False
    student_checkpoint: str | None = None
    student_kwargs: dict[str, Any] = field(default_factory=dict)  # extra timm.create_model kwargs
    img_size: int | None = None  # None: the cache's image size
    num_classes: int | None = None  # None: the teacher's
    data: str | None = None  # source images; None: the root recorded in the cache
    val: str | None = None
    epochs: int = 10
    max_steps: int | None = None
    batch_size: int = 64
    grad_accum: int = 1
    lr: float = 1e-3
    lr_base_batch: int | None = None  # lr is scaled by batch_size * grad_accum * processes / lr_base_batch
    min_lr: float = 1e-5
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_epochs: float = 0.0
    grad_clip: float | None = 5.0
    label_smoothing: float = 0.1
    ce_weight: float | None = None  # None: the methods' default (0 for label-free methods)
    label_shots: int | None = None  # keep labels for this many samples per class; the rest are unlabelled
    view_policy: str = "cycle"  # cycle: view = (epoch + offset(sample)) mod K; random: uniform per epoch
    fingerprint_checks: int = 16  # replayed views checked against the stored fingerprint per epoch
    online_teacher: bool = False
    mixed_precision: str = "no"
    seed: int = 0
    workers: int = 2
    checkpoint_every: int = 0  # steps; 0: at the end of every epoch
    resume: bool = False
    log_every: int = 10
    teacher: str | None = None  # expected teacher (alias/timm name); checked against the cache before step 0
    cache_dtype: str | None = None  # expected storage dtype (fp32|fp16|bf16); checked before step 0

    def validate(self) -> None:
        if not self.cache:
            raise ValueError("train needs --cache PATH (made by `featcache extract`)")
        if self.view_policy not in ("cycle", "random"):
            raise ValueError(f"--view-policy must be 'cycle' or 'random', got {self.view_policy!r}")
        if self.epochs < 1:  # --max-steps only cuts a run short; the epochs still bound the schedule
            raise ValueError(f"--epochs must be >= 1, got {self.epochs}")


def from_dict(cls: type[C], values: Mapping[str, Any]) -> C:
    """Build a config dataclass from a mapping, naming unknown keys and listing the known ones."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ValueError(f"unknown {cls.__name__} keys {unknown}; known keys: {sorted(names)}")
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name in values:
            v = values[f.name]
            kwargs[f.name] = tuple(v) if isinstance(f.default, tuple) and v is not None else v
    return cls(**kwargs)


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping with the safe loader (no tags that run code)."""
    data = yaml.safe_load(Path(path).read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a YAML mapping at the top level")
    return data


def to_dict(config: Any) -> dict[str, Any]:
    """Plain, YAML-safe dict of a config dataclass (tuples become lists)."""

    def plain(v: Any) -> Any:
        if isinstance(v, tuple):
            return [plain(x) for x in v]
        if isinstance(v, list):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return {k: plain(v) for k, v in dataclasses.asdict(config).items()}


def save_yaml(config: Any, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(config), sort_keys=False))
