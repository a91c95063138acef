"""Drawing a view, replaying it from its stored params, and the fingerprint that proves the replay exact.

A view's ops draw, in recipe order, from ``np.random.default_rng(seed)``. A mixed recipe then draws the mix from
``default_rng([seed, 1])`` and, when the view is mixed, the partner component's ops from ``default_rng([seed, 2])``
on the partner's image. `replay` rebuilds the exact uint8 input from the decoded image(s) and the stored vector
with ``torchvision.transforms.v2.functional`` (and timm's PIL RandAugment ops) given explicit arguments;
`fingerprint` (CRC-32 of the uint8 pixels) lets stage 2 detect replay drift (a different torchvision, Pillow or
decoder).
"""
from __future__ import annotations

import zlib
from typing import Callable, NamedTuple, Sequence

import numpy as np
import torch

from .base import Recipe, view_seed
from .mix import Mix, mix_views

#: Loads the decoded uint8 [3, H, W] image of a sample position (a mixed view's partner).
LoadImage = Callable[[int], torch.Tensor]


def sample_component(recipe: Recipe, seed: int | Sequence[int], image_hw: tuple[int, int]) -> np.ndarray:
    """Draw every op's parameters of one component for an image of ``image_hw`` = (height, width); float64."""
    rng = np.random.default_rng(seed)
    hw = (int(image_hw[0]), int(image_hw[1]))
    return np.asarray([v for op in recipe.ops for v in op.sample(rng, hw, recipe)], dtype=np.float64)


def sample_params(recipe: Recipe, seed: int, image_hw: tuple[int, int]) -> np.ndarray:
    """Draw the params of an unmixed recipe's view; float64 [P]. A mixed view needs its partner: use `draw_view`."""
    if recipe.mix is not None:
        raise ValueError("a mixed recipe's params depend on the partner image; draw them with make_view/draw_view")
    return sample_component(recipe, seed, image_hw)


def _check_image(image: torch.Tensor, what: str = "replay") -> None:
    if not isinstance(image, torch.Tensor) or image.dtype != torch.uint8 or image.ndim != 3 or image.shape[0] != 3:
        got = (type(image).__name__, getattr(image, "dtype", None), tuple(getattr(image, "shape", ())))
        raise ValueError(f"{what} needs a uint8 [3, H, W] tensor, got {got}")


def _apply_ops(image: torch.Tensor, recipe: Recipe, params: np.ndarray) -> torch.Tensor:
    for op, sl in zip(recipe.ops, recipe._slices):
        image = op.apply(image, params[sl], recipe)
    return image.contiguous()


def replay(image: torch.Tensor, recipe: Recipe, params: np.ndarray | Sequence[float],
           partner: torch.Tensor | None = None) -> torch.Tensor:
    """Rebuild a view from the decoded uint8 [3, H, W] image and its stored params; uint8 [3, S, S].

    Args:
        image: the view's source image.
        recipe: the recipe the params were drawn with.
        params: the stored param vector (``recipe.param_names``).
        partner: the partner sample's image, needed when the view is mixed (``recipe.partner_of(params)``).
    """
    _check_image(image)
    params = np.asarray(params, dtype=np.float64)
    if params.shape != (len(recipe.param_names),):
        raise ValueError(f"params has shape {params.shape}, recipe expects ({len(recipe.param_names)},) "
                         f"for {recipe.param_names}")
    own, mix, partner_params = recipe.split(params)
    view = _apply_ops(image, recipe, own)
    if mix is None or Mix.partner_of(mix) is None:
        return view
    if partner is None:
        raise ValueError(f"this view is mixed with sample {Mix.partner_of(mix)}: pass that sample's decoded image "
                         "as partner")
    _check_image(partner, "replay's partner")
    return mix_views(view, _apply_ops(partner, recipe, partner_params), mix).contiguous()


class View(NamedTuple):
    image: torch.Tensor  # uint8 [3, S, S]
    seed: int
    params: np.ndarray  # float64 [P]
    fingerprint: int


def make_view(image: torch.Tensor, recipe: Recipe, seed: int, sample: int, view: int, num_samples: int | None = None,
              load_partner: LoadImage | None = None) -> View:
    """Draw and render view ``view`` of sample ``sample``: the one call stage 1 needs per view."""
    return draw_view(image, recipe, view_seed(seed, sample, view), sample, num_samples, load_partner)


def draw_view(image: torch.Tensor, recipe: Recipe, seed: int, sample: int, num_samples: int | None = None,
              load_partner: LoadImage | None = None) -> View:
    """Draw the view of ``seed`` (a `view_seed` or `fresh_view_seed`) of ``sample`` and render it.

    Args:
        image: the sample's decoded image.
        recipe: the view recipe.
        seed: the view's seed.
        sample: the sample's position (a partner is drawn among the others).
        num_samples: how many samples partners are drawn from (mixed recipes).
        load_partner: loads a partner's image by sample position (mixed recipes).
    """
    params = sample_component(recipe, seed, image.shape[-2:])
    partner = None
    if recipe.mix is not None:
        if num_samples is None or load_partner is None:
            raise ValueError("a mixed recipe draws a partner: pass num_samples and load_partner")
        mix = recipe.mix.sample(np.random.default_rng([seed, 1]), sample, num_samples, recipe.img_size)
        other = np.zeros(len(params))
        if (p := Mix.partner_of(np.asarray(mix))) is not None:
            partner = load_partner(p)
            other = sample_component(recipe, [seed, 2], partner.shape[-2:])
        params = np.concatenate([params, np.asarray(mix, dtype=np.float64), other])
    out = replay(image, recipe, params, partner)
    return View(out, seed, params, fingerprint(out))


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
