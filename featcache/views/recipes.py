"""The recipes featcache builds: timm's training views (DeiT and its descendants) and deterministic evaluation views."""
from __future__ import annotations

from typing import Sequence

from ..errors import ConfigError
from .base import Recipe, ViewOp
from .color import ColorJitter
from .erasing import IMAGENET_MEAN, IMAGENET_STD, RandomErasing
from .geometry import HorizontalFlip, RandomResizedCrop, ResizeCenterCrop
from .mix import Mix
from .randaugment import rand_augment


def default_recipe(img_size: int, scale: Sequence[float] = (0.08, 1.0), ratio: Sequence[float] = (3 / 4, 4 / 3),
                   hflip: float = 0.5, color_jitter: float = 0.0, interpolation: str = "bicubic", aa: str | None = None,
                   reprob: float = 0.0, remode: str = "pixel", mean: Sequence[float] = IMAGENET_MEAN,
                   std: Sequence[float] = IMAGENET_STD, mix: Mix | None = None) -> Recipe:
    """timm's training views (``transforms_imagenet_train``): RandomResizedCrop -> horizontal flip -> RandAugment
    (``aa``) or ColorJitter (b/c/s, no hue) -> RandomErasing (``reprob``), then the optional Mixup/CutMix ``mix``.

    ``hflip=0``, ``color_jitter=0``, ``aa=None`` and ``reprob=0`` leave those ops out (and their param columns).
    ``mean``/``std`` are the teacher's normalisation: RandAugment fills with the mean (timm's ``img_mean``) and
    erasing noise is drawn in that normalised space.

    Raises:
        ConfigError: for ``aa`` together with ``color_jitter`` (timm silently drops the jitter then; pass one).
    """
    if aa and color_jitter > 0:
        raise ConfigError(f"--aa {aa} with --color-jitter {color_jitter}: timm drops colour jitter when RandAugment is "
                          "on, so the run would not be the recipe it names; pass one of them (--color-jitter 0)")
    ops: list[ViewOp] = [RandomResizedCrop(tuple(float(s) for s in scale), tuple(float(r) for r in ratio))]
    if hflip > 0:
        ops.append(HorizontalFlip(float(hflip)))
    if aa:
        ops.append(rand_augment(aa, fill=tuple(min(255, round(255 * x)) for x in mean)))
    elif color_jitter > 0:
        cj = float(color_jitter)
        ops.append(ColorJitter(cj, cj, cj, 0.0))
    if reprob > 0:
        ops.append(RandomErasing(float(reprob), mode=remode, mean=tuple(map(float, mean)), std=tuple(map(float, std))))
    return Recipe(tuple(ops), int(img_size), interpolation, mix)


def eval_recipe(img_size: int, crop_pct: float = 0.875, interpolation: str = "bicubic") -> Recipe:
    """Deterministic evaluation views: resize shorter side to ``img_size / crop_pct``, centre crop."""
    return Recipe((ResizeCenterCrop(float(crop_pct)),), int(img_size), interpolation)
