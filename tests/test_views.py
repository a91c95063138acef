"""Tests for featcache.views: seeded params, bounds, replay == torchvision, fingerprints, recipe round-trip."""
import json
import pickle
from unittest import mock

import numpy as np
import pytest
import torch
from torchvision.transforms import v2
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as F

from featcache.views import (OPS, ColorJitter, HorizontalFlip, RandomResizedCrop, Recipe, default_recipe,
                             eval_recipe, fingerprint, make_view, normalize, replay, sample_params, view_seed)


def _image(h=40, w=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=g)


def test_view_seed_depends_on_triple_only():
    seeds = {view_seed(s, n, v) for s in range(3) for n in range(20) for v in range(4)}
    assert len(seeds) == 3 * 20 * 4  # no collisions like seed + sample sums would give
    assert all(0 <= s < 2 ** 63 for s in seeds)
    # Call order, interleaving and repetition do not matter.
    forward = [view_seed(7, n, v) for n in range(10) for v in range(3)]
    backward = [view_seed(7, n, v) for n in reversed(range(10)) for v in reversed(range(3))][::-1]
    assert forward == backward
    assert view_seed(1, 2, 3) != view_seed(1, 3, 2)
    with pytest.raises(ValueError):
        view_seed(-1, 0, 0)


def test_sample_params_deterministic_across_call_order():
    recipe = default_recipe(32, color_jitter=0.4)
    keys = [(n, v) for n in range(8) for v in range(4)]
    first = {k: sample_params(recipe, view_seed(0, *k), (40, 48)) for k in keys}
    rng = np.random.default_rng(123)
    for i in rng.permutation(len(keys)):  # shuffled order, as with other batch sizes / workers / resumes
        k = keys[i]
        np.testing.assert_array_equal(sample_params(recipe, view_seed(0, *k), (40, 48)), first[k])
    assert len({first[k].tobytes() for k in keys}) == len(keys)
    assert all(p.dtype == np.float64 and p.shape == (len(recipe.param_names),) for p in first.values())


@pytest.mark.parametrize("hw", [(40, 48), (64, 20), (17, 90), (32, 32)])
def test_rrc_params_within_bounds(hw):
    scale, ratio = (0.08, 1.0), (3 / 4, 4 / 3)
    recipe = default_recipe(16, scale=scale, ratio=ratio)
    names = recipe.param_names
    H, W = hw
    for n in range(200):
        p = dict(zip(names, sample_params(recipe, view_seed(0, n, 0), hw)))
        top, left, h, w = p["rrc.top"], p["rrc.left"], p["rrc.height"], p["rrc.width"]
        assert all(float(v).is_integer() for v in (top, left, h, w))
        assert 0 <= top and top + h <= H and 0 <= left and left + w <= W and h > 0 and w > 0
        assert p["hflip.flip"] in (0.0, 1.0)


def test_rrc_matches_torchvision_fallback():
    # An extremely wide image makes every attempt fail: both implementations take the deterministic fallback.
    op = RandomResizedCrop(scale=(0.9, 1.0))
    recipe = Recipe((op,), 16)
    ours = op.sample(np.random.default_rng(0), (10, 100), recipe)
    theirs = v2.RandomResizedCrop(16, scale=(0.9, 1.0)).make_params([torch.zeros(3, 10, 100)])
    assert ours == [theirs["top"], theirs["left"], theirs["height"], theirs["width"]]


def test_rrc_distribution_like_torchvision():
    # Same algorithm, different RNG: the mean crop area and flip rate must agree statistically.
    recipe = default_recipe(16)
    ours = np.stack([sample_params(recipe, view_seed(0, n, 0), (40, 48)) for n in range(2000)])
    torch.manual_seed(0)
    t = v2.RandomResizedCrop(16)
    theirs = [t.make_params([torch.zeros(3, 40, 48)]) for _ in range(2000)]
    their_area = np.mean([p["height"] * p["width"] for p in theirs])
    our_area = np.mean(ours[:, 2] * ours[:, 3])
    assert abs(our_area - their_area) / their_area < 0.06
    assert 0.45 < ours[:, 4].mean() < 0.55


@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear"])
def test_replay_equals_torchvision_transform(interpolation):
    img = _image()
    recipe = default_recipe(24, hflip=0.0, interpolation=interpolation)
    mode = {"bicubic": InterpolationMode.BICUBIC, "bilinear": InterpolationMode.BILINEAR}[interpolation]
    for n in range(5):
        params = sample_params(recipe, view_seed(3, n, 0), img.shape[-2:])
        box = dict(zip(("top", "left", "height", "width"), (int(v) for v in params[:4])))
        t = v2.RandomResizedCrop(24, interpolation=mode, antialias=True)
        with mock.patch.object(t, "make_params", return_value=box):
            expected = t(img)
        out = replay(img, recipe, params)
        assert out.dtype == torch.uint8 and out.shape == (3, 24, 24)
        assert torch.equal(out, expected)


def test_hflip_replay():
    img = _image()
    recipe = default_recipe(16, scale=(1.0, 1.0), ratio=(40 / 48, 40 / 48), hflip=1.0)
    params = sample_params(recipe, 5, (40, 48))
    assert params[-1] == 1.0
    noflip = params.copy()
    noflip[-1] = 0.0
    assert torch.equal(replay(img, recipe, params), replay(img, recipe, noflip).flip(-1))
    never = default_recipe(16, hflip=1e-12)
    assert all(sample_params(never, s, (40, 48))[-1] == 0.0 for s in range(50))


def test_fingerprint():
    view = _image(16, 16)
    fp = fingerprint(view)
    assert 0 <= fp < 2 ** 32 and fp == fingerprint(view.clone()) == fingerprint(view.numpy())
    changed = view.clone()
    changed[1, 7, 3] ^= 1
    assert fingerprint(changed) != fp
    assert fingerprint(view.permute(0, 2, 1)) == fingerprint(view.permute(0, 2, 1).contiguous())
    with pytest.raises(ValueError, match="uint8"):
        fingerprint(view.float())


def test_recipe_round_trip_and_identity():
    for recipe in (default_recipe(32), default_recipe(224, scale=(0.3, 1.0), hflip=0.0, color_jitter=0.3,
                                                        interpolation="bilinear"), eval_recipe(32, 0.9)):
        d = json.loads(json.dumps(recipe.to_dict()))
        back = Recipe.from_dict(d)
        assert back == recipe and back.param_names == recipe.param_names and back.to_dict() == d
        assert pickle.loads(pickle.dumps(recipe)) == recipe
    assert default_recipe(32) != default_recipe(32, scale=(0.2, 1.0))
    assert default_recipe(32).param_names == ["rrc.top", "rrc.left", "rrc.height", "rrc.width", "hflip.flip"]


def test_recipe_validation():
    with pytest.raises(ValueError, match="sizing op"):
        Recipe((HorizontalFlip(),), 32)
    with pytest.raises(ValueError, match="interpolation"):
        default_recipe(32, interpolation="lanczos5")
    with pytest.raises(KeyError, match="known: .*rrc"):
        Recipe.from_dict({"img_size": 32, "ops": [{"name": "cutmix"}]})
    with pytest.raises(ValueError, match="params has shape"):
        replay(_image(), default_recipe(16), np.zeros(3))
    with pytest.raises(ValueError, match="uint8"):
        replay(_image().float(), default_recipe(16), np.zeros(5))
    assert set(OPS.names()) >= {"rrc", "hflip", "color_jitter", "resize_center"}


def test_color_jitter_changes_pixels_and_replays():
    img = _image()
    plain, jitter = default_recipe(24), default_recipe(24, color_jitter=0.4)
    names = jitter.param_names
    for n in range(4):
        seed = view_seed(0, n, 0)
        p = sample_params(jitter, seed, (40, 48))
        np.testing.assert_array_equal(p[:5], sample_params(plain, seed, (40, 48)))  # jitter draws after geometry
        cj = dict(zip(names, p))
        assert all(0.6 <= cj[f"color_jitter.{k}"] <= 1.4 for k in ("brightness", "contrast", "saturation"))
        assert cj["color_jitter.hue"] == 0.0
        assert sorted(p[-4:]) == [0, 1, 2, 3]
        a, b = replay(img, jitter, p), replay(img, plain, p[:5])
        assert not torch.equal(a, b)
        assert torch.equal(a, replay(img.clone(), jitter, p.copy()))
        # Same result as applying the torchvision adjustments by hand in the stored order.
        fns = [F.adjust_brightness, F.adjust_contrast, F.adjust_saturation, F.adjust_hue]
        expected = b
        for i in p[-4:].astype(int):
            if i < 3:
                expected = fns[i](expected, float(p[5 + i]))
        assert torch.equal(a, expected)


def test_color_jitter_hue_and_disabled_components():
    op = ColorJitter(brightness=0.0, contrast=0.5, saturation=0.0, hue=0.1)
    recipe = Recipe((RandomResizedCrop(), op), 16)
    p = sample_params(recipe, 11, (40, 48))
    b, c, s, h = p[4:8]
    assert b == 1.0 and s == 1.0 and 0.5 <= c <= 1.5 and -0.1 <= h <= 0.1
    assert replay(_image(), recipe, p).shape == (3, 16, 16)
    with pytest.raises(ValueError):
        ColorJitter(hue=0.7)


def test_eval_recipe_matches_resize_center_crop():
    img = _image(40, 60)
    recipe = eval_recipe(32, crop_pct=0.875)
    p = sample_params(recipe, 0, (40, 60))
    assert list(p) == [36, 54]
    expected = F.center_crop(F.resize(img, 36, interpolation=InterpolationMode.BICUBIC, antialias=True), [32, 32])
    assert torch.equal(replay(img, recipe, p), expected)
    assert torch.equal(expected, v2.Compose([v2.Resize(36, interpolation=InterpolationMode.BICUBIC),
                                             v2.CenterCrop(32)])(img))


def test_make_view_and_normalize():
    img = _image()
    recipe = default_recipe(16)
    v = make_view(img, recipe, seed=0, sample=4, view=2)
    assert v.seed == view_seed(0, 4, 2) and v.fingerprint == fingerprint(v.image)
    assert torch.equal(replay(img, recipe, v.params), v.image)
    x = normalize(torch.stack([v.image, v.image]), (0.5, 0.4, 0.3), (0.2, 0.25, 0.3))
    assert x.dtype == torch.float32 and x.shape == (2, 3, 16, 16)
    ref = (v.image.float() / 255 - torch.tensor([0.5, 0.4, 0.3]).view(3, 1, 1)) / torch.tensor([0.2, 0.25, 0.3]).view(
        3, 1, 1)
    torch.testing.assert_close(x[1], ref)
    assert v.image.dtype == torch.uint8  # normalize does not touch its input


def test_op_settings_validated():
    for bad in (dict(scale=(0.5, 0.1)), dict(ratio=(0.0, 1.0))):
        with pytest.raises(ValueError, match="rrc needs"):
            RandomResizedCrop(**bad)
    with pytest.raises(ValueError, match="hflip probability"):
        HorizontalFlip(1.5)
    with pytest.raises(ValueError, match="unknown settings"):
        Recipe.from_dict({"img_size": 32, "ops": [{"name": "rrc", "scael": [0.1, 1.0]}]})
