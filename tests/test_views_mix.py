"""Mixed views: timm's CutMix box and corrected lambda, Mixup's blend, timm's mixed label target, and draws that
depend on (seed, sample, view) alone."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from scipy import stats
from timm.data.mixup import cutmix_bbox_and_lam, mixup_target

from featcache.views import (CutMix, Mix, Mixup, Recipe, RandomResizedCrop, default_recipe, fingerprint, make_view,
                             mix_target, replay, view_seed)

S = 32


class _Draws:
    """A stand-in Generator whose integers() returns fixed values (to feed timm and featcache the same centre)."""

    def __init__(self, values):
        self.values = list(values)

    def integers(self, low, high=None):
        return self.values.pop(0)


@pytest.mark.parametrize("lam", [0.05, 0.3, 0.5, 0.77, 0.99])
def test_cutmix_box_and_corrected_lambda_are_timms(lam, monkeypatch):
    for cy, cx in ((0, 0), (5, 31), (16, 16), (31, 2)):
        centres = iter([cy, cx])
        monkeypatch.setattr(np.random, "randint", lambda *a, **k: next(centres))
        (yl, yh, xl, xh), timm_lam = cutmix_bbox_and_lam((3, S, S), lam, correct_lam=True)
        our_lam, box = CutMix.box(_Draws([cy, cx]), lam, S, True)
        assert box == [yl, xl, yh - yl, xh - xl] and our_lam == pytest.approx(timm_lam, abs=1e-12)


def _blank_recipe(**mix) -> Recipe:
    return Recipe((RandomResizedCrop(),), S, mix=Mix(**mix))


def test_corrected_lambda_is_the_kept_area_fraction():
    a, b = torch.zeros(3, 40, 40, dtype=torch.uint8), torch.full((3, 40, 40), 255, dtype=torch.uint8)
    recipe = _blank_recipe(cutmix_alpha=1.0)
    lams = []
    for view in range(300):
        v = make_view(a, recipe, 0, 0, view, num_samples=5, load_partner=lambda p: b)
        p = dict(zip(recipe.param_names, v.params))
        from_partner = float((v.image == 255).float().mean())
        box_area = p["mix.height"] * p["mix.width"] / S ** 2
        assert p["mix.kind"] == 2 and 1 - p["mix.lam"] == pytest.approx(box_area, abs=1e-12)
        assert from_partner == pytest.approx(box_area, abs=1e-12)
        lams.append(p["mix.lam"])
    assert 0.55 < np.mean(lams) < 0.8  # Beta(1, 1) has mean 0.5; boxes clipped at the border keep more of the view


def test_mixup_blends_in_uint8_within_half_a_grey_level_of_timm():
    g = torch.Generator().manual_seed(0)
    a = torch.randint(0, 256, (3, S, S), dtype=torch.uint8, generator=g)
    b = torch.randint(0, 256, (3, S, S), dtype=torch.uint8, generator=g)
    for lam in (0.1, 0.5, 0.83):
        ours = torch.from_numpy(Mixup.apply(a.numpy(), b.numpy(), lam, [0, 0, 0, 0]))
        timm_float = a.double() * lam + b.double() * (1 - lam)  # timm mixes floats (normalisation is affine)
        assert (ours.double() - timm_float).abs().max() <= 0.5 + 1e-9


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_label_target_is_timms_mixup_target(smoothing):
    labels = torch.tensor([3, 0, 7, 7, 1, 9])
    for lam in (1.0, 0.6, 0.25):
        expected = mixup_target(labels, 10, lam, smoothing)  # timm pairs element i with element B - 1 - i
        for i in range(len(labels)):
            ours = mix_target(int(labels[i]), int(labels[len(labels) - 1 - i]), lam, 10, smoothing)
            torch.testing.assert_close(ours, expected[i], rtol=0, atol=1e-6)
    assert not mix_target(-1, 3, 0.5, 10, 0.1).any() and not mix_target(2, -1, 0.5, 10, 0.1).any()
    assert mix_target(2, -1, 1.0, 10, 0.1).argmax() == 2  # an unmixed view keeps its own label


def test_mix_draws_follow_the_settings():
    mix = Mix(mixup_alpha=0.8, cutmix_alpha=1.0, prob=0.6, switch_prob=0.3)
    draws = np.asarray([mix.sample(np.random.default_rng(s), 4, 50, S) for s in range(4000)])
    kind, lam, partner = draws[:, 0], draws[:, 1], draws[:, 2]
    assert abs((kind > 0).mean() - 0.6) < 0.03
    assert abs((kind[kind > 0] == 2).mean() - 0.3) < 0.03
    assert ((partner >= 0) & (partner < 50) & (partner != 4))[kind > 0].all() and (partner[kind == 0] == -1).all()
    assert stats.ks_2samp(lam[kind == 1], np.random.default_rng(0).beta(0.8, 0.8, 5000)).pvalue > 1e-3
    assert (lam[kind == 0] == 1).all()
    with pytest.raises(ValueError, match="one of them > 0"):
        Mix()
    with pytest.raises(ValueError, match="prob"):
        Mix(mixup_alpha=1.0, prob=1.5)


def _images(n=6):
    g = torch.Generator().manual_seed(2)
    return [torch.randint(0, 256, (3, 36 + i, 40), dtype=torch.uint8, generator=g) for i in range(n)]


def test_mixed_view_replays_from_both_components_and_depends_on_the_triple_only():
    images = _images()
    recipe = default_recipe(S, aa="rand-m9-mstd0.5-inc1", reprob=0.25, mix=Mix(0.8, 1.0))
    first = {}
    for sample, view in [(s, v) for s in range(6) for v in range(3)]:
        first[sample, view] = make_view(images[sample], recipe, 7, sample, view, 6, images.__getitem__)
    for sample, view in reversed(list(first)):  # another order: the same views
        v = make_view(images[sample], recipe, 7, sample, view, 6, images.__getitem__)
        assert v.fingerprint == first[sample, view].fingerprint and v.seed == view_seed(7, sample, view)
        np.testing.assert_array_equal(v.params, first[sample, view].params)
        partner = recipe.partner_of(v.params)
        again = replay(images[sample], recipe, v.params, None if partner is None else images[partner])
        assert fingerprint(again) == v.fingerprint
        if partner is not None:
            with pytest.raises(ValueError, match=f"mixed with sample {partner}"):
                replay(images[sample], recipe, v.params)
    kinds = {int(v.params[recipe.param_names.index("mix.kind")]) for v in first.values()}
    assert kinds == {1, 2}


def test_mix_settings_in_the_recipe_dict():
    recipe = default_recipe(S, mix=Mix(0.8, 1.0, 0.9, 0.4))
    d = json.loads(json.dumps(recipe.to_dict()))
    assert d["mix"] == {"mixup_alpha": 0.8, "cutmix_alpha": 1.0, "prob": 0.9, "switch_prob": 0.4, "correct_lam": True}
    assert Recipe.from_dict(d) == recipe
    assert "mix" not in default_recipe(S).to_dict()  # unmixed manifests are unchanged
    n = len(default_recipe(S).param_names)
    assert recipe.param_names[n:n + 7] == [f"mix.{k}" for k in ("kind", "lam", "partner", "top", "left", "height",
                                                                 "width")]
    assert recipe.param_names[n + 7:] == [f"partner.{k}" for k in default_recipe(S).param_names]
