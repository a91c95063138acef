"""Colour jitter as a view op: torchvision ``ColorJitter``'s draws, stored, and replayed with explicit factors."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
from torchvision.transforms.v2 import functional as F

from ..errors import ConfigError
from .base import OPS, Recipe, ViewOp


@OPS.register("color_jitter")
@dataclass(frozen=True)
class ColorJitter(ViewOp):
    """Random brightness / contrast / saturation / hue in a random order (torchvision ``ColorJitter``).

    Factors are drawn uniformly from ``[max(0, 1 - s), 1 + s]`` (hue from ``[-hue, hue]``); a strength of 0
    disables that adjustment and stores its neutral factor (1, or 0 for hue). ``order0..order3`` hold the
    permutation of adjustment ids (0 brightness, 1 contrast, 2 saturation, 3 hue) applied in that order.
    Replay skips adjustments whose factor is neutral, so it needs only the stored vector.
    """

    params: ClassVar[tuple[str, ...]] = ("brightness", "contrast", "saturation", "hue",
                                         "order0", "order1", "order2", "order3")
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.4
    hue: float = 0.0

    def __post_init__(self) -> None:
        if min(self.brightness, self.contrast, self.saturation, self.hue) < 0 or self.hue > 0.5:
            raise ConfigError(f"color jitter strengths must be >= 0 (hue <= 0.5), got {self.to_dict()}")

    def sample(self, rng: np.random.Generator, image_hw: tuple[int, int], recipe: Recipe) -> list[float]:
        order = rng.permutation(4)
        factors = [_uniform_or(rng, max(0.0, 1 - s), 1 + s, s, 1.0)
                   for s in (self.brightness, self.contrast, self.saturation)]
        factors.append(_uniform_or(rng, -self.hue, self.hue, self.hue, 0.0))
        return factors + [float(i) for i in order]

    def apply(self, image: torch.Tensor, values: np.ndarray, recipe: Recipe) -> torch.Tensor:
        factors = values[:4]
        for op_id in (int(round(v)) for v in values[4:]):
            factor, neutral = float(factors[op_id]), (1.0, 1.0, 1.0, 0.0)[op_id]
            if factor != neutral:
                image = _JITTER_FNS[op_id](image, factor)
        return image


def _uniform_or(rng: np.random.Generator, low: float, high: float, strength: float, neutral: float) -> float:
    return float(rng.uniform(low, high)) if strength > 0 else neutral


_JITTER_FNS = (F.adjust_brightness, F.adjust_contrast, F.adjust_saturation, F.adjust_hue)
