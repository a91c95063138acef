"""Random erasing: timm's box distribution, noise in uint8 pixel space from the stored seed, exact replay."""
from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from scipy import stats
from timm.data.random_erasing import RandomErasing as TimmErasing

from featcache.views import Recipe, RandomErasing, RandomResizedCrop, make_view, replay, sample_params

S = 32


def _boxes_timm(n: int) -> np.ndarray:
    """[erased, top, left, h, w] of timm's RandomErasing(p=0.25, pixel) on n blank views, read off the noise."""
    random.seed(0)
    torch.manual_seed(0)
    t = TimmErasing(probability=0.25, mode="pixel", device="cpu")
    out = []
    for _ in range(n):
        x = t(torch.zeros(3, S, S))
        ys, xs = np.nonzero(x.abs().sum(0).numpy())
        out.append([0, 0, 0, 0, 0] if not len(ys) else [1, ys.min(), xs.min(), ys.max() - ys.min() + 1,
                                                         xs.max() - xs.min() + 1])
    return np.asarray(out, dtype=np.float64)


def _boxes_ours(n: int) -> np.ndarray:
    recipe = Recipe((RandomResizedCrop(), RandomErasing(0.25)), S)
    return np.stack([sample_params(recipe, seed, (40, 40))[4:9] for seed in range(n)])


def test_box_distribution_matches_timm():
    theirs, ours = _boxes_timm(6000), _boxes_ours(6000)
    assert abs(theirs[:, 0].mean() - 0.25) < 0.02 and abs(ours[:, 0].mean() - 0.25) < 0.02
    a, b = theirs[theirs[:, 0] == 1], ours[ours[:, 0] == 1]
    for col, what in ((1, "top"), (2, "left"), (3, "height"), (4, "width")):
        assert stats.ks_2samp(a[:, col], b[:, col]).pvalue > 1e-3, what
    area = b[:, 3] * b[:, 4] / S ** 2
    assert area.min() >= 0.015 and area.max() <= 0.36 and (b[:, 1] + b[:, 3] <= S).all() and (b[:, 3] < S).all()


def test_noise_is_the_teachers_normal_in_pixel_space():
    mean, std = (0.5, 0.4, 0.6), (0.1, 0.05, 0.08)  # narrow, so that clipping to 0..255 is rare
    op = RandomErasing(1.0, min_area=0.3, max_area=0.3, mean=mean, std=std)
    recipe = Recipe((RandomResizedCrop(scale=(1, 1), ratio=(1, 1)), op), S)
    image = torch.zeros(3, S, S, dtype=torch.uint8)
    params = sample_params(recipe, 4, (S, S))
    erase, top, left, h, w, noise_seed = params[4:]
    assert erase == 1 and noise_seed == int(noise_seed)
    view = replay(image, recipe, params)
    box = view[:, int(top):int(top + h), int(left):int(left + w)].numpy().astype(np.float64)
    z = np.random.default_rng(int(noise_seed)).standard_normal(box.shape)
    m, s = np.asarray(mean).reshape(3, 1, 1), np.asarray(std).reshape(3, 1, 1)
    np.testing.assert_array_equal(box, np.clip(np.rint((z * s + m) * 255), 0, 255))
    normalised = (box / 255 - m) / s  # what the teacher sees: timm's N(0, 1) noise, up to grey-level rounding
    assert abs(normalised.mean()) < 0.05 and abs(normalised.std() - 1) < 0.05
    outside = view.clone()
    outside[:, int(top):int(top + h), int(left):int(left + w)] = 0
    assert not outside.any()  # nothing outside the box changed


@pytest.mark.parametrize("mode", ["rand", "const"])
def test_channel_modes(mode):
    op = RandomErasing(1.0, min_area=0.3, max_area=0.3, mode=mode)
    recipe = Recipe((RandomResizedCrop(scale=(1, 1), ratio=(1, 1)), op), S)
    params = sample_params(recipe, 1, (S, S))
    _, top, left, h, w, _ = (int(v) for v in params[4:])
    box = replay(torch.zeros(3, S, S, dtype=torch.uint8), recipe, params)[:, top:top + h, left:left + w]
    assert all(len(torch.unique(box[c])) == 1 for c in range(3))  # one value per channel
    if mode == "const":  # timm's zeros in normalised space: the mean colour
        assert box[:, 0, 0].tolist() == [round(255 * x) for x in (0.485, 0.456, 0.406)]


def test_erasing_replays_and_validates():
    g = torch.Generator().manual_seed(1)
    image = torch.randint(0, 256, (3, 40, 44), dtype=torch.uint8, generator=g)
    recipe = Recipe((RandomResizedCrop(), RandomErasing(0.5)), 24)
    for view in range(20):
        v = make_view(image, recipe, 0, 3, view)
        assert torch.equal(replay(image, recipe, v.params), v.image)
    with pytest.raises(ValueError, match="after rrc"):
        Recipe((RandomErasing(), RandomResizedCrop()), 24)
    with pytest.raises(ValueError, match="mode"):
        RandomErasing(mode="noise")
    assert Recipe.from_dict(recipe.to_dict()) == recipe
