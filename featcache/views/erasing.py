"""Random erasing (Zhong et al., AAAI 2020) with timm's box sampling, applied to the uint8 view.

Following ``timm.data.random_erasing.RandomErasing`` (one box, timm's ``re_count=1``): with probability ``prob``, up
to 10 attempts draw an area fraction in [min_area, max_area] and a log-uniform aspect ratio in
[min_aspect, max_aspect]; the first box that fits strictly inside the view is erased, and if none fits the view is
left as is. timm erases the *normalised* tensor with N(0, 1) noise (``mode='pixel'``: per pixel; ``'rand'``: one
value per channel; ``'const'``: zeros). featcache erases in uint8 pixel space instead, so that a teacher and a
student that normalise differently still see the same pixels: the noise z is drawn from
``numpy.random.default_rng(noise_seed).standard_normal`` and written as ``clip(rint((z * std + mean) * 255), 0,
255)`` with the teacher's mean and std -- timm's values, clipped to the pixel range and rounded to grey levels.
The box and the noise seed are stored (``random_erasing.erase, top, left, height, width, noise_seed``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch

from ..errors import ConfigError
from .base import OPS, Recipe, ViewOp

#: timm's ``IMAGENET_DEFAULT_MEAN`` / ``IMAGENET_DEFAULT_STD`` (the recipe records the teacher's own).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
ERASE_MODES = ("pixel", "rand", "const")
#: Noise seeds stay below 2**52, so the float64 param vector holds them exactly.
_NOISE_SEEDS = 2 ** 52


@OPS.register("random_erasing")
@dataclass(frozen=True)
class RandomErasing(ViewOp):
    """Erase one random box of the ``img_size`` view with noise, with probability ``prob`` (timm ``--reprob``).

    Args:
        prob: probability of erasing (DeiT: 0.25).
        min_area: smallest erased fraction of the view (timm 0.02).
        max_area: largest erased fraction (timm 1/3).
        min_aspect: smallest aspect ratio of the box (timm 0.3).
        max_aspect: largest aspect ratio [1 / min_aspect].
        mode: ``pixel`` (per-pixel noise, DeiT's ``--remode pixel``), ``rand`` (per-channel) or ``const`` (the mean).
        mean: per-channel mean of the normalisation the noise is expressed in (the teacher's).
        std: per-channel std of that normalisation.
    """

    params: ClassVar[tuple[str, ...]] = ("erase", "top", "left", "height", "width", "noise_seed")
    after_size: ClassVar[bool] = True
    prob: float = 0.25
    min_area: float = 0.02
    max_area: float = 1 / 3
    min_aspect: float = 0.3
    max_aspect: float | None = None
    mode: str = "pixel"
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def __post_init__(self) -> None:
        if self.mode not in ERASE_MODES:
            raise ConfigError(f"random erasing mode {self.mode!r} is not one of {', '.join(ERASE_MODES)}")
        if not (0 <= self.prob <= 1 and 0 < self.min_area <= self.max_area and self.min_aspect > 0):
            raise ConfigError(f"random erasing needs 0 <= prob <= 1, 0 < min_area <= max_area and min_aspect > 0, got "
                              f"{self.to_dict()}")

    @property
    def log_aspect(self) -> tuple[float, float]:
        return math.log(self.min_aspect), math.log(self.max_aspect or 1 / self.min_aspect)

    def sample(self, rng: np.random.Generator, image_hw: tuple[int, int], recipe: Recipe) -> list[float]:
        if rng.random() > self.prob:  # timm: `if random.random() > self.probability: return`
            return [0.0] * 6
        box = self._box(rng, int(recipe.img_size))
        if box is None:
            return [0.0] * 6
        return [1.0, *box, float(rng.integers(_NOISE_SEEDS))]

    def _box(self, rng: np.random.Generator, size: int) -> list[int] | None:
        """timm's 10 attempts at a box strictly inside the ``size`` x ``size`` view: ``[top, left, h, w]``."""
        for _ in range(10):
            target_area = rng.uniform(self.min_area, self.max_area) * size * size
            aspect = math.exp(rng.uniform(*self.log_aspect))
            h = int(round(math.sqrt(target_area * aspect)))
            w = int(round(math.sqrt(target_area / aspect)))
            if w < size and h < size:
                return [int(rng.integers(0, size - h + 1)), int(rng.integers(0, size - w + 1)), h, w]
        return None

    def apply(self, image: torch.Tensor, values: np.ndarray, recipe: Recipe) -> torch.Tensor:
        erase, top, left, h, w = (int(round(v)) for v in values[:5])
        if not erase:
            return image
        out = image.clone()
        out[:, top:top + h, left:left + w] = torch.from_numpy(self.pixels(h, w, int(values[5])))
        return out

    def pixels(self, height: int, width: int, noise_seed: int) -> np.ndarray:
        """The uint8 [3, height, width] fill of a box: the noise of ``noise_seed`` in the teacher's pixel space."""
        rng = np.random.default_rng(noise_seed)
        shape = {"pixel": (3, height, width), "rand": (3, 1, 1), "const": (3, 1, 1)}[self.mode]
        z = rng.standard_normal(shape) if self.mode != "const" else np.zeros(shape)
        mean, std = np.asarray(self.mean).reshape(3, 1, 1), np.asarray(self.std).reshape(3, 1, 1)
        values = np.clip(np.rint((z * std + mean) * 255.0), 0, 255).astype(np.uint8)
        return np.array(np.broadcast_to(values, (3, height, width)))  # a writable copy
