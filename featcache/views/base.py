"""What a view is: ops that draw named parameters, the recipe that orders them, and the seeds they draw from.

Every view's randomness comes from ``(seed, sample, view)`` alone (`view_seed`), so a view is the same whatever the
batch size, worker count, process count or resume history. A `Recipe` is an ordered list of ops, optionally
followed by a mix (Mixup / CutMix with a second, *partner* component; :mod:`featcache.views.mix`). Each op draws
its parameters from one ``numpy`` Generator and declares their names, so a view is described by a flat float64
vector (columns ``"<op>.<param>"``, then ``"mix.<param>"`` and ``"partner.<op>.<param>"`` for a mixed recipe)
stored next to its seed. :mod:`featcache.views.replay` rebuilds the exact uint8 input from that vector.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, ClassVar, Mapping

import numpy as np
import torch
from torchvision.transforms.v2 import InterpolationMode

from ..errors import ConfigError
from ..registry import Registry
from .mix import MIX_PARAMS, Mix

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

    Subclasses set ``params`` (the names of the values they draw), ``sets_size`` (the op produces the recipe's
    ``img_size`` x ``img_size`` output) and ``after_size`` (the op works on that output, so it must come after the
    sizing op), and implement `sample` and `apply`.
    """

    name: ClassVar[str] = ""
    params: ClassVar[tuple[str, ...]] = ()
    sets_size: ClassVar[bool] = False
    after_size: ClassVar[bool] = False

    def sample(self, rng: np.random.Generator, image_hw: tuple[int, int], recipe: "Recipe") -> list[float]:
        raise NotImplementedError

    def apply(self, image: torch.Tensor, values: np.ndarray, recipe: "Recipe") -> torch.Tensor:
        raise NotImplementedError

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name}
        for k, v in self.__dict__.items():
            out[k] = list(v) if isinstance(v, tuple) else v
        return out


@dataclass(frozen=True)
class Recipe:
    """An ordered list of view ops producing ``img_size`` x ``img_size`` uint8 views, optionally mixed.

    Args:
        ops: the ops, applied in order; exactly one must set the output size (``rrc`` or ``resize_center``), and
            ops that work on the output (``random_erasing``) come after it.
        img_size: output side in pixels.
        interpolation: resampling for resizes: bicubic | bilinear | nearest | nearest-exact (always antialiased).
        mix: Mixup / CutMix of each view with a partner sample's view drawn with the same ops; ``None``: no mixing.
    """

    ops: tuple[ViewOp, ...]
    img_size: int
    interpolation: str = "bicubic"
    mix: Mix | None = None
    _slices: tuple[slice, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "ops", tuple(self.ops))
        if self.interpolation not in INTERPOLATIONS:
            raise ConfigError(f"unknown interpolation {self.interpolation!r}; known: {sorted(INTERPOLATIONS)}")
        sizing = [i for i, op in enumerate(self.ops) if op.sets_size]
        if len(sizing) != 1:
            raise ConfigError(f"a recipe needs exactly one sizing op (rrc or resize_center), got "
                              f"{[op.name for op in self.ops]}")
        early = [op.name for op in self.ops[:sizing[0]] if op.after_size]
        if early:
            raise ConfigError(f"view ops {early} work on the {self.img_size} px output; put them after "
                              f"{self.ops[sizing[0]].name}")
        if int(self.img_size) < 1:
            raise ConfigError(f"img_size must be >= 1, got {self.img_size}")
        bounds = np.cumsum([0] + [len(op.params) for op in self.ops])
        object.__setattr__(self, "_slices", tuple(slice(a, b) for a, b in zip(bounds[:-1], bounds[1:])))

    @property
    def component_names(self) -> list[str]:
        """Columns of one component's params, ``"<op>.<param>"`` in op order (the whole vector when unmixed)."""
        return [f"{op.name}.{p}" for op in self.ops for p in op.params]

    @property
    def param_names(self) -> list[str]:
        """Column names of the flat param vector: the component's, then (mixed) the mix's and the partner's."""
        names = self.component_names
        if self.mix is None:
            return names
        return names + [f"mix.{p}" for p in MIX_PARAMS] + [f"partner.{n}" for n in names]

    @property
    def interp_mode(self) -> InterpolationMode:
        return INTERPOLATIONS[self.interpolation]

    def split(self, params: np.ndarray) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
        """``(component, mix values, partner component)`` of a param vector; the last two are None when unmixed."""
        n = len(self.component_names)
        if self.mix is None:
            return params, None, None
        return params[:n], params[n:n + len(MIX_PARAMS)], params[n + len(MIX_PARAMS):]

    def partner_of(self, params: np.ndarray) -> int | None:
        """The sample position whose view is mixed into this one, or None (unmixed recipe, or a view left unmixed)."""
        _, mix, _ = self.split(np.asarray(params, dtype=np.float64))
        return None if mix is None else Mix.partner_of(mix)

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe description (stored in the manifest; `from_dict` rebuilds an equal recipe)."""
        out = {"img_size": int(self.img_size), "interpolation": self.interpolation,
               "ops": [op.to_dict() for op in self.ops]}
        if self.mix is not None:  # absent, not null, for unmixed recipes: their manifests stay as they were
            out["mix"] = self.mix.to_dict()
        return out

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Recipe":
        ops = [_op_from_dict(spec) for spec in d["ops"]]
        mix = Mix(**d["mix"]) if d.get("mix") is not None else None
        return cls(tuple(ops), int(d["img_size"]), str(d.get("interpolation", "bicubic")), mix)


def _op_from_dict(spec: Mapping[str, Any]) -> ViewOp:
    """One op from its manifest entry, naming settings the op does not have."""
    op_cls = OPS.get(spec["name"])
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in spec.items() if k != "name"}
    known = [f.name for f in fields(op_cls)]
    if set(kwargs) - set(known):
        raise ConfigError(f"view op {spec['name']!r} got unknown settings {sorted(set(kwargs) - set(known))}; "
                          f"known: {known}")
    return op_cls(**kwargs)


def view_seed(seed: int, sample: int, view: int) -> int:
    """Seed of one view, a non-negative int64 derived from ``(seed, sample, view)`` alone.

    ``np.random.SeedSequence`` mixes the three integers (no collisions from ``seed + sample`` style sums).
    """
    if min(seed, sample, view) < 0:
        raise ValueError(f"seed, sample and view must be >= 0, got {(seed, sample, view)}")
    return _mixed_seed([int(seed), int(sample), int(view)])


#: Last entry of a fresh view's seed sequence: keeps fresh views apart from every stored ``view_seed``.
FRESH_VIEW_TAG = 0xF2E5


def fresh_view_seed(seed: int, epoch: int, sample: int) -> int:
    """Seed of the view ``featcache train --fresh-views`` draws for ``sample`` in ``epoch`` (never a stored view's)."""
    if min(seed, epoch, sample) < 0:
        raise ValueError(f"seed, epoch and sample must be >= 0, got {(seed, epoch, sample)}")
    return _mixed_seed([int(seed), int(epoch), int(sample), FRESH_VIEW_TAG])


def _mixed_seed(entropy: list[int]) -> int:
    state = np.random.SeedSequence(entropy).generate_state(1, dtype=np.uint64)[0]
    return int(state & np.uint64(0x7FFF_FFFF_FFFF_FFFF))
