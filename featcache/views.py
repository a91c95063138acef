"""Seeded augmented views with explicit, stored parameters and exact replay.

Every view's randomness comes from ``(seed, sample, view)`` alone (`view_seed`), so a view is the same
whatever the batch size, worker count, process count or resume history. A `Recipe` is an ordered list
of ops; each op draws its parameters from one ``numpy`` Generator (`sample_params`) and declares their
names, so a view is described by a flat float64 vector (columns ``"<op>.<param>"``) stored next to its
seed. `replay` rebuilds the exact uint8 input from the decoded image and that vector with
``torchvision.transforms.v2.functional`` ops given explicit arguments; `fingerprint` (CRC-32 of the uint8
pixels) lets stage 2 detect replay drift (a different torchvision, Pillow or decoder).

Default recipe (DeiT): RandomResizedCrop(scale=(0.08, 1), ratio=(3/4, 4/3), bicubic, antialias) ->
horizontal flip (p=0.5) -> optional ColorJitter. ``resize_center`` gives deterministic eval-style views.
"""
from __future__ import annotations

import math
import zlib
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar, Mapping, NamedTuple, Sequence

import numpy as np
import torch
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as F

from .registry import Registry

OPS: Registry[type] = Registry("view op")

INTERPOLATIONS = {
    "bicubic": InterpolationMode.BICUBIC,
    "bilinear": InterpolationMode.BILINEAR,
    "nearest": InterpolationMode.NEAREST,
    "nearest-exact": InterpolationMode.NEAREST_EXACT,
}


@dataclass(frozen=True)
class ViewOp:
    """One augmentation step: draws named parameters, then applies them with explicit arguments.

    Subclasses set ``params`` (the names of the values they draw) and ``sets_size`` (whether the op
    produces the recipe's ``img_size`` x ``img_size`` output), and implement `sample` and `apply`.
    """

    name: ClassVar[str] = ""
    params: ClassVar[tuple[str, ...]] = ()
    sets_size: ClassVar[bool] = False

    def sample(self, rng: np.random.Generator, image_hw: tuple[int, int], recipe: "Recipe") -> list[float]:
        raise NotImplementedError

    def apply(self, image: torch.Tensor, values: np.ndarray, recipe: "Recipe") -> torch.Tensor:
        raise NotImplementedError

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name}
        for k, v in self.__dict__.items():
            out[k] = list(v) if isinstance(v, tuple) else v
        return out


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
            raise ValueError(f"rrc needs 0 < scale[0] <= scale[1] and 0 < ratio[0] <= ratio[1], "
                             f"got scale={self.scale}, ratio={self.ratio}")

    def sample(self, rng: np.random.Generator, image_hw: tuple[int, int], recipe: "Recipe") -> list[float]:
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

    def apply(self, image: torch.Tensor, values: np.ndarray, recipe: "Recipe") -> torch.Tensor:
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
            raise ValueError(f"hflip probability must be in [0, 1], got {self.p}")

    def sample(self, rng: np.random.Generator, image_hw: tuple[int, int], recipe: "Recipe") -> list[float]:
        return [float(rng.random() < self.p)]

    def apply(self, image: torch.Tensor, values: np.ndarray, recipe: "Recipe") -> torch.Tensor:
        return F.horizontal_flip(image) if values[0] >= 0.5 else image


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
            raise ValueError(f"color jitter strengths must be >= 0 (hue <= 0.5), got {self.to_dict()}")

    def sample(self, rng: np.random.Generator, image_hw: tuple[int, int], recipe: "Recipe") -> list[float]:
        order = rng.permutation(4)
        factors = [_uniform_or(rng, max(0.0, 1 - s), 1 + s, s, 1.0)
                   for s in (self.brightness, self.contrast, self.saturation)]
        factors.append(_uniform_or(rng, -self.hue, self.hue, self.hue, 0.0))
        return factors + [float(i) for i in order]

    def apply(self, image: torch.Tensor, values: np.ndarray, recipe: "Recipe") -> torch.Tensor:
        factors = values[:4]
        for op_id in (int(round(v)) for v in values[4:]):
            factor, neutral = float(factors[op_id]), (1.0, 1.0, 1.0, 0.0)[op_id]
            if factor != neutral:
                image = _JITTER_FNS[op_id](image, factor)
        return image


def _uniform_or(rng: np.random.Generator, low: float, high: float, strength: float, neutral: float) -> float:
    return float(rng.uniform(low, high)) if strength > 0 else neutral


_JITTER_FNS = (F.adjust_brightness, F.adjust_contrast, F.adjust_saturation, F.adjust_hue)


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
            raise ValueError(f"crop_pct must be in (0, 1], got {self.crop_pct}")

    def sample(self, rng: np.random.Generator, image_hw: tuple[int, int], recipe: "Recipe") -> list[float]:
        height, width = image_hw
        short = math.floor(recipe.img_size / self.crop_pct)
        if height <= width:
            return [short, int(short * width / height)]
        return [int(short * height / width), short]

    def apply(self, image: torch.Tensor, values: np.ndarray, recipe: "Recipe") -> torch.Tensor:
        size = [int(round(v)) for v in values]
        image = F.resize(image, size, interpolation=recipe.interp_mode, antialias=True)
        return F.center_crop(image, [recipe.img_size, recipe.img_size])


@dataclass(frozen=True)
class Recipe:
    """An ordered list of view ops producing ``img_size`` x ``img_size`` uint8 views.

    Args:
        ops: the ops, applied in order; exactly one must set the output size (``rrc`` or ``resize_center``).
        img_size: output side in pixels.
        interpolation: resampling for resizes: bicubic | bilinear | nearest | nearest-exact (always antialiased).
    """

    ops: tuple[ViewOp, ...]
    img_size: int
    interpolation: str = "bicubic"
    _slices: tuple[slice, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "ops", tuple(self.ops))
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(f"unknown interpolation {self.interpolation!r}; known: {sorted(INTERPOLATIONS)}")
        if sum(op.sets_size for op in self.ops) != 1:
            raise ValueError(f"a recipe needs exactly one sizing op (rrc or resize_center), got "
                             f"{[op.name for op in self.ops]}")
        if int(self.img_size) < 1:
            raise ValueError(f"img_size must be >= 1, got {self.img_size}")
        bounds = np.cumsum([0] + [len(op.params) for op in self.ops])
        object.__setattr__(self, "_slices", tuple(slice(a, b) for a, b in zip(bounds[:-1], bounds[1:])))

    @property
    def param_names(self) -> list[str]:
        """Column names of the flat param vector, ``"<op>.<param>"`` in op order."""
        return [f"{op.name}.{p}" for op in self.ops for p in op.params]

    @property
    def interp_mode(self) -> InterpolationMode:
        return INTERPOLATIONS[self.interpolation]

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe description (stored in the manifest; `from_dict` rebuilds an equal recipe)."""
        return {"img_size": int(self.img_size), "interpolation": self.interpolation,
                "ops": [op.to_dict() for op in self.ops]}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Recipe":
        ops = []
        for spec in d["ops"]:
            op_cls = OPS.get(spec["name"])
            kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in spec.items() if k != "name"}
            known = [f.name for f in fields(op_cls)]
            if set(kwargs) - set(known):
                raise ValueError(f"view op {spec['name']!r} got unknown settings {sorted(set(kwargs) - set(known))}; "
                                 f"known: {known}")
            ops.append(op_cls(**kwargs))
        return cls(tuple(ops), int(d["img_size"]), str(d.get("interpolation", "bicubic")))


def default_recipe(img_size: int, scale: Sequence[float] = (0.08, 1.0), ratio: Sequence[float] = (3 / 4, 4 / 3),
                   hflip: float = 0.5, color_jitter: float = 0.0, interpolation: str = "bicubic") -> Recipe:
    """DeiT training views: RandomResizedCrop -> horizontal flip -> ColorJitter (b/c/s, no hue; timm's choice).

    ``hflip=0`` and ``color_jitter=0`` leave those ops out (and their param columns).
    """
    ops: list[ViewOp] = [RandomResizedCrop(tuple(float(s) for s in scale), tuple(float(r) for r in ratio))]
    if hflip > 0:
        ops.append(HorizontalFlip(float(hflip)))
    if color_jitter > 0:
        cj = float(color_jitter)
        ops.append(ColorJitter(cj, cj, cj, 0.0))
    return Recipe(tuple(ops), int(img_size), interpolation)


def eval_recipe(img_size: int, crop_pct: float = 0.875, interpolation: str = "bicubic") -> Recipe:
    """Deterministic evaluation views: resize shorter side to ``img_size / crop_pct``, centre crop."""
    return Recipe((ResizeCenterCrop(float(crop_pct)),), int(img_size), interpolation)


def view_seed(seed: int, sample: int, view: int) -> int:
    """Seed of one view, a non-negative int64 derived from ``(seed, sample, view)`` alone.

    ``np.random.SeedSequence`` mixes the three integers (no collisions from ``seed + sample`` style sums).
    """
    if min(seed, sample, view) < 0:
        raise ValueError(f"seed, sample and view must be >= 0, got {(seed, sample, view)}")
    state = np.random.SeedSequence([int(seed), int(sample), int(view)]).generate_state(1, dtype=np.uint64)[0]
    return int(state & np.uint64(0x7FFF_FFFF_FFFF_FFFF))


def sample_params(recipe: Recipe, seed: int, image_hw: tuple[int, int]) -> np.ndarray:
    """Draw every op's parameters for an image of ``image_hw`` = (height, width); float64 [P]."""
    rng = np.random.default_rng(int(seed))
    hw = (int(image_hw[0]), int(image_hw[1]))
    values = [v for op in recipe.ops for v in op.sample(rng, hw, recipe)]
    return np.asarray(values, dtype=np.float64)


def replay(image: torch.Tensor, recipe: Recipe, params: np.ndarray | Sequence[float]) -> torch.Tensor:
    """Rebuild a view from the decoded uint8 [3, H, W] image and its stored params; uint8 [3, S, S]."""
    if not isinstance(image, torch.Tensor) or image.dtype != torch.uint8 or image.ndim != 3 or image.shape[0] != 3:
        got = (type(image).__name__, getattr(image, "dtype", None), tuple(getattr(image, "shape", ())))
        raise ValueError(f"replay needs a uint8 [3, H, W] tensor, got {got}")
    params = np.asarray(params, dtype=np.float64)
    if params.shape != (len(recipe.param_names),):
        raise ValueError(f"params has shape {params.shape}, recipe expects ({len(recipe.param_names)},) "
                         f"for {recipe.param_names}")
    for op, sl in zip(recipe.ops, recipe._slices):
        image = op.apply(image, params[sl], recipe)
    return image.contiguous()


class View(NamedTuple):
    image: torch.Tensor  # uint8 [3, S, S]
    seed: int
    params: np.ndarray  # float64 [P]
    fingerprint: int


def make_view(image: torch.Tensor, recipe: Recipe, seed: int, sample: int, view: int) -> View:
    """Draw and render view ``view`` of sample ``sample``: the one call stage 1 needs per view."""
    vseed = view_seed(seed, sample, view)
    params = sample_params(recipe, vseed, (image.shape[-2], image.shape[-1]))
    out = replay(image, recipe, params)
    return View(out, vseed, params, fingerprint(out))


def fingerprint(view: torch.Tensor | np.ndarray) -> int:
    """CRC-32 (``zlib.crc32``, uint32) of the view's contiguous uint8 bytes in [3, S, S] order."""
    arr = view.detach().cpu().contiguous().numpy() if isinstance(view, torch.Tensor) else np.ascontiguousarray(view)
    if arr.dtype != np.uint8:
        raise ValueError(f"fingerprint needs uint8 pixels, got {arr.dtype}")
    return zlib.crc32(arr.tobytes()) & 0xFFFFFFFF


def normalize(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """``(x / 255 - mean) / std`` as float32 on the images' device; ``images`` uint8 [..., 3, S, S]."""
    x = images.to(torch.float32).div_(255.0)
    # Built on the host and copied without blocking: a synchronous copy here would stall every training step.
    m = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1).to(x.device, non_blocking=True)
    s = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1).to(x.device, non_blocking=True)
    return x.sub_(m).div_(s)
