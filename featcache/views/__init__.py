"""Seeded augmented views with explicit, stored parameters and exact replay.

``base``: the op interface, the `Recipe` and the view seeds; ``geometry``, ``color``, ``randaugment``, ``erasing``:
the registered ops (:data:`OPS`); ``mix``: Mixup / CutMix of two components (:data:`MIXES`); ``replay``: drawing,
replaying and fingerprinting a view; ``recipes``: the recipes featcache builds. docs/FORMAT.md says how to replay
any view without featcache.
"""
from .base import FRESH_VIEW_TAG, INTERPOLATIONS, OPS, Recipe, ViewOp, fresh_view_seed, view_seed
from .color import ColorJitter
from .erasing import ERASE_MODES, RandomErasing
from .geometry import HorizontalFlip, RandomResizedCrop, ResizeCenterCrop
from .mix import MIX_KINDS, MIX_PARAMS, MIXES, CutMix, Mix, Mixup, mix_target, mix_views
from .randaugment import RandAugment, level_args, rand_augment
from .recipes import default_recipe, eval_recipe
from .replay import View, draw_view, fingerprint, make_view, normalize, replay, sample_component, sample_params

__all__ = ["ERASE_MODES", "FRESH_VIEW_TAG", "INTERPOLATIONS", "MIXES", "MIX_KINDS", "MIX_PARAMS", "OPS", "ColorJitter",
           "CutMix", "HorizontalFlip", "Mix", "Mixup", "RandAugment", "RandomErasing", "RandomResizedCrop", "Recipe",
           "ResizeCenterCrop", "View", "ViewOp", "default_recipe", "draw_view", "eval_recipe", "fingerprint",
           "fresh_view_seed", "level_args", "make_view", "mix_target", "mix_views", "normalize", "rand_augment",
           "replay", "sample_component", "sample_params", "view_seed"]
