"""Mixed views: Mixup (Zhang et al., ICLR 2018) and CutMix (Yun et al., ICCV 2019) of two recorded components.

Semantics of timm's ``Mixup(mode='elem', correct_lam=True)`` (``timm/data/mixup.py``), drawn per view from that
view's seed instead of per batch element, so a mixed view depends on ``(seed, sample, view)`` alone: with
probability ``prob`` the view is mixed with a *partner*, a view of another sample drawn uniformly; when both alphas
are set, CutMix is used with probability ``switch_prob`` (else Mixup); ``lam ~ Beta(alpha, alpha)``. CutMix's box
is timm's ``rand_bbox`` (side ``int(S * sqrt(1 - lam))``, centred at a uniform pixel, clipped to the view) and its
lambda is corrected to the area the view keeps, ``1 - box area / S^2`` (timm's ``correct_lam``). timm's default
``mode='batch'`` shares one lambda (and box) across a batch and pairs each element with the reversed batch; that
couples views to batch composition, which a cache cannot replay, so featcache mixes per view.

Pixels are mixed in uint8 space, after both components' ops: CutMix pastes the partner's box exactly as timm does;
Mixup stores ``rint(lam * a + (1 - lam) * b)`` (float64, then rounded), within half a grey level of timm's blend
of normalised floats. The stored values (columns ``mix.kind, lam, partner, top, left, height, width``) say what was
done: ``kind`` indexes :data:`MIX_KINDS`, ``partner`` is the partner's sample position (-1 when unmixed), the box
is CutMix's (zeros otherwise). The label target is timm's ``mixup_target``: the ``lam``-weighted mix of the two
smoothed one-hot labels (:func:`mix_target`).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..errors import ConfigError
from ..registry import Registry

MIX_PARAMS = ("kind", "lam", "partner", "top", "left", "height", "width")
#: ``mix.kind`` codes: the index in this tuple.
MIX_KINDS = ("none", "mixup", "cutmix")
MIXES: Registry[type] = Registry("mix")
_UNMIXED = [0.0, 1.0, -1.0, 0.0, 0.0, 0.0, 0.0]


@MIXES.register("mixup")
class Mixup:
    """Blend the whole partner view in with weight ``1 - lam`` (timm ``x * lam + x_partner * (1 - lam)``)."""

    @staticmethod
    def box(rng: np.random.Generator, lam: float, size: int, correct_lam: bool) -> tuple[float, list[int]]:
        return lam, [0, 0, 0, 0]

    @staticmethod
    def apply(a: np.ndarray, b: np.ndarray, lam: float, box: list[int]) -> np.ndarray:
        return np.clip(np.rint(a * lam + b * (1.0 - lam)), 0, 255).astype(np.uint8)


@MIXES.register("cutmix")
class CutMix:
    """Paste the partner's pixels inside a random box (timm ``rand_bbox`` + ``correct_lam``)."""

    @staticmethod
    def box(rng: np.random.Generator, lam: float, size: int, correct_lam: bool) -> tuple[float, list[int]]:
        cut = int(size * math.sqrt(1.0 - lam))
        cy, cx = int(rng.integers(0, size)), int(rng.integers(0, size))
        top, bottom = int(np.clip(cy - cut // 2, 0, size)), int(np.clip(cy + (cut + 1) // 2, 0, size))
        left, right = int(np.clip(cx - cut // 2, 0, size)), int(np.clip(cx + (cut + 1) // 2, 0, size))
        if correct_lam:
            lam = 1.0 - (bottom - top) * (right - left) / float(size * size)
        return lam, [top, left, bottom - top, right - left]

    @staticmethod
    def apply(a: np.ndarray, b: np.ndarray, lam: float, box: list[int]) -> np.ndarray:
        top, left, h, w = box
        out = a.copy()
        out[:, top:top + h, left:left + w] = b[:, top:top + h, left:left + w]
        return out


@dataclass(frozen=True)
class Mix:
    """How views are mixed (timm's ``--mixup``, ``--cutmix``, ``--mixup-prob``, ``--mixup-switch-prob``).

    Args:
        mixup_alpha: Beta parameter of Mixup's lambda (DeiT: 0.8; 0: no Mixup).
        cutmix_alpha: Beta parameter of CutMix's lambda (DeiT: 1.0; 0: no CutMix).
        prob: probability that a view is mixed at all.
        switch_prob: probability of CutMix instead of Mixup when both are on.
        correct_lam: set CutMix's lambda to the kept area after clipping the box (timm's default).
    """

    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0
    prob: float = 1.0
    switch_prob: float = 0.5
    correct_lam: bool = True

    def __post_init__(self) -> None:
        if min(self.mixup_alpha, self.cutmix_alpha) < 0 or max(self.mixup_alpha, self.cutmix_alpha) <= 0:
            raise ConfigError(f"a mix needs mixup_alpha >= 0 and cutmix_alpha >= 0, one of them > 0; got {self}")
        if not (0 <= self.prob <= 1 and 0 <= self.switch_prob <= 1):
            raise ConfigError(f"mix prob and switch_prob must be in [0, 1], got {self}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def sample(self, rng: np.random.Generator, sample: int, num_samples: int, size: int) -> list[float]:
        """The view's mix values (:data:`MIX_PARAMS`), drawn in timm's order: mix or not, which mix, lambda."""
        mixed = rng.random() < self.prob
        if self.mixup_alpha > 0 and self.cutmix_alpha > 0:
            kind = "cutmix" if rng.random() < self.switch_prob else "mixup"
        else:
            kind = "cutmix" if self.cutmix_alpha > 0 else "mixup"
        alpha = self.cutmix_alpha if kind == "cutmix" else self.mixup_alpha
        lam = float(rng.beta(alpha, alpha))
        partner = _partner(rng, sample, num_samples)
        if not mixed or lam == 1.0:  # timm leaves a view alone when lam == 1
            return list(_UNMIXED)
        lam, box = MIXES.get(kind).box(rng, lam, size, self.correct_lam)
        return [float(MIX_KINDS.index(kind)), lam, float(partner), *map(float, box)]

    @staticmethod
    def partner_of(values: np.ndarray) -> int | None:
        """The partner's sample position for mix values, None when the view is not mixed."""
        return None if int(round(values[0])) == 0 else int(round(values[2]))


def _partner(rng: np.random.Generator, sample: int, num_samples: int) -> int:
    """A uniformly drawn other sample (the sample itself when it is the only one, as timm pairs a lone element)."""
    if num_samples <= 1:
        return sample
    other = int(rng.integers(num_samples - 1))
    return other + (other >= sample)


def mix_views(a: torch.Tensor, b: torch.Tensor, values: np.ndarray) -> torch.Tensor:
    """The mixed uint8 [3, S, S] view of component ``a`` and partner component ``b`` for mix ``values``."""
    kind = MIX_KINDS[int(round(values[0]))]
    if kind == "none":
        return a
    box = [int(round(v)) for v in values[3:7]]
    out = MIXES.get(kind).apply(a.numpy(), b.numpy(), float(values[1]), box)
    return torch.from_numpy(np.ascontiguousarray(out))


def mix_target(label: int, partner_label: int, lam: float, num_classes: int, smoothing: float = 0.0) -> torch.Tensor:
    """timm's ``mixup_target`` for one view: ``lam * smooth(y) + (1 - lam) * smooth(y_partner)``, float32 [C].

    Smoothing puts ``smoothing / C`` on every class and ``1 - smoothing + smoothing / C`` on the label. A view whose
    label (or, when it is mixed, whose partner's label) is unknown (-1) gets all zeros: unlabelled.
    """
    if label < 0 or (lam < 1.0 and partner_label < 0):
        return torch.zeros(num_classes, dtype=torch.float32)
    off = smoothing / num_classes
    out = np.full(num_classes, off, dtype=np.float64)
    out[label] += lam * (1.0 - smoothing)
    if lam < 1.0:
        out[partner_label] += (1.0 - lam) * (1.0 - smoothing)
    return torch.from_numpy(out.astype(np.float32))
