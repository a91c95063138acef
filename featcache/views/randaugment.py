"""RandAugment (Cubuk et al., NeurIPS 2020) with timm's ``rand-...`` policy semantics, as a replayable view op.

The policy string is timm's (``timm.data.auto_augment.rand_augment_transform``, timm 1.0): ``rand-m9-mstd0.5-inc1``
draws ``n`` (2) ops uniformly with replacement from timm's op set (``inc1``: the variants whose severity increases
with the magnitude), applies each with probability ``p`` (0.5), at a magnitude drawn from N(m, mstd) (``mstd > 100``:
uniform in [0, m]) clipped to [0, ``mmax`` (10)], with a random sign for the ops timm negates (rotate, shear,
translate, the increasing enhancements). Every draw -- which op, applied or not, magnitude, sign -- is stored with the
view (columns ``rand_augment.op{i}``, ``apply{i}``, ``magnitude{i}``, ``sign{i}``) and replay turns it into the op's
argument with timm's level functions, written out here with the sign explicit (:func:`level_args`).

Pixels: each op is timm's own PIL function (``timm.data.auto_augment.NAME_TO_OP``) called with those explicit
arguments, timm's fill colour (the normalisation mean in 0..255, timm's ``img_mean``) and the recipe's resampling
filter (timm's ``interpolation`` hparam), on the uint8 view converted to a PIL image and back; no op draws from
Python's ``random``. So each op's pixels are timm's; what differs from timm's PIL pipeline is the op's *input*: the
random resized crop before it resamples with torchvision's antialiased tensor kernels, not ``PIL.Image.resize``.
"""
from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
from PIL import Image

from ..errors import ConfigError
from .base import OPS, Recipe, ViewOp

#: timm's ``_LEVEL_DENOM``: magnitude m maps to the fraction m / 10 of each op's range.
LEVEL_DENOM = 10.0

#: timm's ``_RAND_TRANSFORMS`` (the default set) and ``_RAND_INCREASING_TRANSFORMS`` (``inc1``), in timm's order; the
#: stored ``op{i}`` indexes the recipe's own copy (``transforms``), so a later timm cannot change a cache's meaning.
RAND_TRANSFORMS = ("AutoContrast", "Equalize", "Invert", "Rotate", "Posterize", "Solarize", "SolarizeAdd", "Color",
                   "Contrast", "Brightness", "Sharpness", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel")
RAND_INCREASING_TRANSFORMS = ("AutoContrast", "Equalize", "Invert", "Rotate", "PosterizeIncreasing",
                              "SolarizeIncreasing", "SolarizeAdd", "ColorIncreasing", "ContrastIncreasing",
                              "BrightnessIncreasing", "SharpnessIncreasing", "ShearX", "ShearY", "TranslateXRel",
                              "TranslateYRel")


def _enhance(m: float, s: float, t: float) -> tuple[float]:
    return (m / LEVEL_DENOM) * 1.8 + 0.1,


def _enhance_increasing(m: float, s: float, t: float) -> tuple[float]:
    return max(0.1, 1.0 + s * ((m / LEVEL_DENOM) * 0.9)),


def _posterize(m: float, s: float, t: float) -> tuple[int]:
    return int((m / LEVEL_DENOM) * 4),


def _solarize(m: float, s: float, t: float) -> tuple[int]:
    return min(256, int((m / LEVEL_DENOM) * 256)),


#: op name -> (magnitude, sign, translate_pct) -> the op's arguments: timm's ``LEVEL_TO_ARG`` with the sign explicit.
LEVELS: dict[str, Callable[[float, float, float], tuple]] = {
    "AutoContrast": lambda m, s, t: (),
    "Equalize": lambda m, s, t: (),
    "Invert": lambda m, s, t: (),
    "Rotate": lambda m, s, t: (s * ((m / LEVEL_DENOM) * 30.0),),
    "Posterize": _posterize,
    "PosterizeIncreasing": lambda m, s, t: (4 - _posterize(m, s, t)[0],),
    "PosterizeOriginal": lambda m, s, t: (_posterize(m, s, t)[0] + 4,),
    "Solarize": _solarize,
    "SolarizeIncreasing": lambda m, s, t: (256 - _solarize(m, s, t)[0],),
    "SolarizeAdd": lambda m, s, t: (min(128, int((m / LEVEL_DENOM) * 110)),),
    **{name: _enhance for name in ("Color", "Contrast", "Brightness", "Sharpness")},
    **{f"{name}Increasing": _enhance_increasing for name in ("Color", "Contrast", "Brightness", "Sharpness")},
    "ShearX": lambda m, s, t: (s * ((m / LEVEL_DENOM) * 0.3),),
    "ShearY": lambda m, s, t: (s * ((m / LEVEL_DENOM) * 0.3),),
    "TranslateXRel": lambda m, s, t: (s * ((m / LEVEL_DENOM) * t),),
    "TranslateYRel": lambda m, s, t: (s * ((m / LEVEL_DENOM) * t),),
}

#: The ops whose argument timm negates with probability 1/2 (``_randomly_negate``); the others store sign +1.
SIGNED = frozenset({"Rotate", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel", "ColorIncreasing",
                    "ContrastIncreasing", "BrightnessIncreasing", "SharpnessIncreasing"})

_PIL_FILTERS = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR, "nearest": Image.NEAREST,
                "nearest-exact": Image.NEAREST}


def level_args(name: str, magnitude: float, sign: float, translate_pct: float = 0.45) -> tuple:
    """The arguments timm's op ``name`` gets at ``magnitude`` (already clipped) with the drawn ``sign`` (+1 / -1)."""
    return LEVELS[name](float(magnitude), float(sign), float(translate_pct))


@functools.cache
def _timm_ops() -> dict[str, Callable[..., Image.Image]]:
    from timm.data.auto_augment import NAME_TO_OP  # timm's PIL op functions; imported on first use (timm is heavy)

    return NAME_TO_OP


@OPS.register("rand_augment")
@dataclass(frozen=True)
class RandAugment(ViewOp):
    """timm's RandAugment as stored draws: ``num_ops`` layers of (op, applied, magnitude, sign).

    Args:
        num_ops: layers per view (timm ``n``, 2).
        magnitude: mean magnitude (timm ``m``; 10 unless the policy says).
        magnitude_std: std of the magnitude (timm ``mstd``; 0: fixed; > 100: uniform in [0, magnitude]).
        magnitude_max: upper clip of the magnitude (timm ``mmax``; None: 10).
        prob: probability of applying each layer (timm ``p``, 0.5).
        transforms: the op set, in order (timm's default set, or the increasing one for ``inc1``).
        translate_pct: translate range as a fraction of the side (timm's ``translate_pct``, 0.45).
        fill: RGB fill of the pixels that rotate, shear and translate uncover (timm's ``img_mean``).
    """

    num_ops: int = 2
    magnitude: float = 10.0
    magnitude_std: float = 0.0
    magnitude_max: float | None = None
    prob: float = 0.5
    transforms: tuple[str, ...] = RAND_TRANSFORMS
    translate_pct: float = 0.45
    fill: tuple[int, int, int] = (128, 128, 128)

    def __post_init__(self) -> None:
        unknown = [t for t in self.transforms if t not in LEVELS]
        if unknown or not self.transforms:
            raise ConfigError(f"rand_augment transforms {list(self.transforms)}: unknown {unknown}; known: "
                              f"{sorted(LEVELS)}")
        if self.num_ops < 0 or not 0 <= self.prob <= 1 or self.magnitude < 0 or self.magnitude_std < 0:
            raise ConfigError(f"rand_augment needs num_ops >= 0, 0 <= prob <= 1, magnitude >= 0 and magnitude_std >= 0,"
                              f" got {self.to_dict()}")

    @property
    def params(self) -> tuple[str, ...]:  # type: ignore[override]  # one group of four per layer
        return tuple(f"{p}{i}" for i in range(self.num_ops) for p in ("op", "apply", "magnitude", "sign"))

    def sample(self, rng: np.random.Generator, image_hw: tuple[int, int], recipe: Recipe) -> list[float]:
        return [v for _ in range(self.num_ops) for v in self._layer(rng)]

    def _layer(self, rng: np.random.Generator) -> list[float]:
        """One layer's draws, always the same number of them (so the stream does not depend on earlier outcomes)."""
        op = int(rng.integers(len(self.transforms)))
        applied = self.prob >= 1.0 or rng.random() <= self.prob  # timm skips the op when random() > prob
        magnitude = self._magnitude(rng)
        sign = -1.0 if rng.random() > 0.5 else 1.0  # timm's _randomly_negate
        return [op, float(applied), magnitude, sign if self.transforms[op] in SIGNED else 1.0]

    def _magnitude(self, rng: np.random.Generator) -> float:
        m = float(self.magnitude)
        if self.magnitude_std > 100:
            m = float(rng.uniform(0, m))
        elif self.magnitude_std > 0:
            m = float(rng.normal(m, self.magnitude_std))
        return max(0.0, min(m, float(self.magnitude_max or LEVEL_DENOM)))

    def layers(self, values: np.ndarray) -> list[tuple[str, float, float]]:
        """``(op name, magnitude, sign)`` of the layers that apply, in order."""
        rows = np.asarray(values, dtype=np.float64).reshape(self.num_ops, 4)
        return [(self.transforms[int(round(op))], m, s) for op, applied, m, s in rows if applied >= 0.5]

    def apply(self, image: torch.Tensor, values: np.ndarray, recipe: Recipe) -> torch.Tensor:
        todo = self.layers(values)
        if not todo:
            return image
        ops, kwargs = _timm_ops(), {"fillcolor": tuple(int(c) for c in self.fill),
                                    "resample": _PIL_FILTERS[recipe.interpolation]}
        pil = Image.fromarray(np.ascontiguousarray(image.permute(1, 2, 0).numpy()))
        for name, magnitude, sign in todo:
            args = level_args(name, magnitude, sign, self.translate_pct)
            if name.startswith("Posterize") and args[0] < 1:  # see _posterize_nothing
                pil = _posterize_nothing(pil)
            else:
                pil = ops[name](pil, *args, **kwargs)
        return torch.from_numpy(np.array(pil, dtype=np.uint8)).permute(2, 0, 1).contiguous()


def _posterize_nothing(image: Image.Image) -> Image.Image:
    """Posterize keeping 0 bits, which ``PosterizeIncreasing`` asks for at magnitude 10 (m9-mstd0.5: ~2 % of its
    draws). Older Pillow masked every pixel to 0; recent Pillow (13 here) refuses ``bits < 1``, so timm's op raises
    there. featcache keeps the old meaning: a black image."""
    return Image.new(image.mode, image.size)


_POLICY_KEYS: dict[str, tuple[str, Callable[[str], Any]]] = {
    "m": ("magnitude", int), "n": ("num_ops", int), "p": ("prob", float), "mstd": ("magnitude_std", float),
    "mmax": ("magnitude_max", int), "inc": ("increasing", lambda v: bool(int(v))),
}


def rand_augment(policy: str, fill: tuple[int, int, int] = (128, 128, 128)) -> RandAugment:
    """The op of a timm RandAugment policy string, e.g. ``rand-m9-mstd0.5-inc1`` (DeiT, ViTKD, NKD, ScaleKD).

    Raises:
        ConfigError: for policies other than ``rand-...`` (AutoAugment, AugMix, 3-Augment), weighted op sets
            (``t...``) and sections timm does not know; the message names the section.
    """
    head, *sections = policy.split("-")
    if head != "rand":
        raise ConfigError(f"--aa {policy!r}: only timm RandAugment policies are supported, e.g. rand-m9-mstd0.5-inc1 "
                          "(not AutoAugment 'v0'/'original', AugMix or 3-Augment)")
    settings: dict[str, Any] = {"increasing": False}
    for section in sections:
        key, value = _policy_section(section, policy)
        settings[_POLICY_KEYS[key][0]] = _POLICY_KEYS[key][1](value)
    increasing = settings.pop("increasing")
    return RandAugment(**settings, transforms=RAND_INCREASING_TRANSFORMS if increasing else RAND_TRANSFORMS,
                       fill=tuple(int(c) for c in fill))


def _policy_section(section: str, policy: str) -> tuple[str, str]:
    """``"mstd0.5"`` -> ``("mstd", "0.5")``, refusing what timm would ignore or fail on."""
    match = re.fullmatch(r"([a-z]+)(\d.*)", section)
    if match is None or match.group(1) not in _POLICY_KEYS:
        raise ConfigError(f"--aa {policy!r}: unknown section {section!r}; RandAugment sections are "
                          f"{', '.join(k + 'N' for k in _POLICY_KEYS)} (weighted op sets 't...' are not supported)")
    return match.group(1), match.group(2)
