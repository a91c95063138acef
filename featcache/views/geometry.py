"""Geometric view ops: Inception-style random resized crop, horizontal flip, and the evaluation resize + centre crop.

Parameters are drawn with torchvision's algorithms from the view's numpy Generator and applied with
``torchvision.transforms.v2.functional`` given explicit arguments.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
from torchvision.transforms.v2 import functional as F

from ..errors import ConfigError
from .base import OPS, Recipe, ViewOp


@OPS.register("rrc")
@dataclass(frozen=True)
class RandomResizedCrop(ViewOp):
    """Inception-style random crop, resized to ``img_size`` (torchvision ``RandomResizedCrop``).

    Params ``top, left, height, width`` are the crop box in input pixels. They are drawn with the exact
    algorithm of torchvision's ``RandomResizedCrop.make_params`` (10 attempts, then a centre crop clamped
    to ``ratio``) but from the view's numpy Generator instead of torch's global RNG.
    """

    params: ClassVar[tuple[str, ...]] = ("top", "left", "height", "width")
    sets_size: ClassVar[bool] = True
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)

    def __post_init__(self) -> None:
        if not (len(self.scale) == 2 and 0 < self.scale[0] <= self.scale[1] and len(self.ratio) == 2
                and 0 < self.ratio[0] <= self.ratio[1]):
            raise ConfigError(f"rrc needs 0 < scale[0] <= scale[1] and 0 < ratio[0] <= ratio[1], "
                              f"got scale={self.scale}, ratio={self.ratio}")

    def sample(self, rng: np.random.Generator, image_hw: tuple[int, int], recipe: Recipe) -> list[float]:
        height, width = image_hw
        area = height * width
        log_ratio = (math.log(self.ratio[0]), math.log(self.ratio[1]))
        for _ in range(10):
            target_area = area * rng.uniform(self.scale[0], self.scale[1])
            aspect_ratio = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
            w = int(round(math.sqrt(target_area * aspect_ratio)))
            h = int(round(math.sqrt(target_area / aspect_ratio)))
            if 0 < w <= width and 0 < h <= height:
                top = int(rng.integers(0, height - h + 1))
                left = int(rng.integers(0, width - w + 1))
                return [top, left, h, w]
        return list(_center_box(height, width, self.ratio))

    def apply(self, image: torch.Tensor, values: np.ndarray, recipe: Recipe) -> torch.Tensor:
        top, left, h, w = (int(round(v)) for v in values)
        return F.resized_crop(image, top, left, h, w, size=[recipe.img_size, recipe.img_size],
                              interpolation=recipe.interp_mode, antialias=True)


def _center_box(height: int, width: int, ratio: tuple[float, float]) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop fallback: the whole image, clamped to the allowed aspect ratios."""
    in_ratio = float(width) / float(height)
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


@OPS.register("hflip")
@dataclass(frozen=True)
class HorizontalFlip(ViewOp):
    """Mirror left-right with probability ``p``. Param ``flip`` is 1.0 (flipped) or 0.0."""

    params: ClassVar[tuple[str, ...]] = ("flip",)
    p: float = 0.5

    def __post_init__(self) -> None:
        if not 0 <= self.p <= 1:
            raise ConfigError(f"hflip probability must be in [0, 1], got {self.p}")

    def sample(self, rng: np.random.Generator, image_hw: tuple[int, int], recipe: Recipe) -> list[float]:
        return [float(rng.random() < self.p)]

    def apply(self, image: torch.Tensor, values: np.ndarray, recipe: Recipe) -> torch.Tensor:
        return F.horizontal_flip(image) if values[0] >= 0.5 else image


@OPS.register("resize_center")
@dataclass(frozen=True)
class ResizeCenterCrop(ViewOp):
    """Evaluation view: resize the shorter side to ``floor(img_size / crop_pct)``, then centre-crop ``img_size``.

    Params ``height, width`` are the resized size (computed like torchvision ``Resize(int)``), stored so
    replay needs no rounding rule of its own. Draws nothing from the Generator.
    """

    params: ClassVar[tuple[str, ...]] = ("height", "width")
    sets_size: ClassVar[bool] = True
    crop_pct: float = 0.875

    def __post_init__(self) -> None:
        if not 0 < self.crop_pct <= 1:
            raise ConfigError(f"crop_pct must be in (0, 1], got {self.crop_pct}")

    def sample(self, rng: np.random.Generator, image_hw: tuple[int, int], recipe: Recipe) -> list[float]:
        height, width = image_hw
        short = math.floor(recipe.img_size / self.crop_pct)
        if height <= width:
            return [short, int(short * width / height)]
        return [int(short * height / width), short]

    def apply(self, image: torch.Tensor, values: np.ndarray, recipe: Recipe) -> torch.Tensor:
        size = [int(round(v)) for v in values]
        image = F.resize(image, size, interpolation=recipe.interp_mode, antialias=True)
        return F.center_crop(image, [recipe.img_size, recipe.img_size])
