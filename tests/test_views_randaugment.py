"""RandAugment as stored draws: the same op / magnitude / sign distributions as timm's for the same policy string,
timm's own op arguments and pixels, and policy strings parsed (or refused) like timm's."""
from __future__ import annotations

import random
from collections import Counter
from unittest import mock

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import stats
from timm.data import auto_augment as taa

from featcache.views import Recipe, RandAugment, RandomResizedCrop, level_args, rand_augment, replay, sample_params
from featcache.views.randaugment import LEVELS, RAND_INCREASING_TRANSFORMS, RAND_TRANSFORMS, SIGNED

POLICY = "rand-m9-mstd0.5-inc1"
HPARAMS = {"translate_const": 100, "img_mean": (124, 116, 104), "interpolation": Image.BICUBIC}


def timm_draws(policy: str, n: int) -> tuple[list[tuple[str, tuple]], int]:
    """What timm's own RandAugment applies over ``n`` calls: (op name, its arguments) per applied op, and the layers."""
    ra = taa.rand_augment_transform(policy, dict(HPARAMS))
    applied: list[tuple[str, tuple]] = []
    for op in ra.ops:  # record the arguments each op function receives, and leave the image alone
        op.aug_fn = (lambda name: lambda img, *args, **kw: applied.append((name, args)) or img)(op.name)
    random.seed(0)
    np.random.seed(0)
    img = Image.new("RGB", (4, 4))
    for _ in range(n):
        ra(img)
    return applied, n * ra.num_layers


def our_draws(policy: str, n: int) -> tuple[list[tuple[str, tuple]], int]:
    op = rand_augment(policy)
    recipe = Recipe((RandomResizedCrop(), op), 16)
    applied = []
    for seed in range(n):
        values = sample_params(recipe, seed, (20, 20))[4:]
        applied += [(name, level_args(name, m, s, op.translate_pct)) for name, m, s in op.layers(values)]
    return applied, n * op.num_ops


@pytest.mark.parametrize("policy", [POLICY, "rand-m7-n3-mstd101-p0.7"])
def test_drawn_ops_and_magnitudes_match_timm(policy):
    n = 6000
    theirs, their_layers = timm_draws(policy, n)
    ours, our_layers = our_draws(policy, n)
    # Each layer is applied with probability p.
    p = float(policy.split("-p")[1]) if "-p" in policy else 0.5
    for applied, layers in ((theirs, their_layers), (ours, our_layers)):
        assert abs(len(applied) / layers - p) < 0.015
    # Ops are drawn uniformly with replacement from the same set.
    their_counts, our_counts = Counter(a for a, _ in theirs), Counter(a for a, _ in ours)
    assert set(their_counts) == set(our_counts)
    names = sorted(their_counts)
    table = np.array([[their_counts[k] for k in names], [our_counts[k] for k in names]])
    assert stats.chi2_contingency(table).pvalue > 1e-3
    # Per op, the arguments it gets (magnitude through timm's level function, random sign included) agree.
    for name in names:
        a = np.array([args[0] for k, args in theirs if k == name and args], dtype=np.float64)
        b = np.array([args[0] for k, args in ours if k == name and args], dtype=np.float64)
        if len(a):
            assert stats.ks_2samp(a, b).pvalue > 1e-3, name
            if name in SIGNED and name.endswith(("X", "Y", "Rel", "Rotate")):
                assert abs((a < 0).mean() - 0.5) < 0.05 and abs((b < 0).mean() - 0.5) < 0.05


def test_op_sets_are_timms():
    assert RAND_TRANSFORMS == tuple(taa._RAND_TRANSFORMS)
    assert RAND_INCREASING_TRANSFORMS == tuple(taa._RAND_INCREASING_TRANSFORMS)
    assert rand_augment(POLICY).transforms == RAND_INCREASING_TRANSFORMS
    assert rand_augment("rand-m9").transforms == RAND_TRANSFORMS


@pytest.mark.parametrize("name", sorted(LEVELS))
@pytest.mark.parametrize("magnitude", [0.0, 3.7, 9.0, 10.0])
def test_level_args_are_timms_with_the_sign_explicit(name, magnitude):
    fn = taa.LEVEL_TO_ARG[name]
    for draw, sign in ((0.9, -1.0), (0.1, 1.0)):  # timm negates when random() > 0.5
        with mock.patch("random.random", return_value=draw):
            expected = fn(magnitude, HPARAMS) if fn is not None else ()
        got = level_args(name, magnitude, sign if name in SIGNED else 1.0, 0.45)
        assert got == pytest.approx(expected, rel=0, abs=0), (name, magnitude, sign)


def test_replay_applies_timms_op_functions_with_the_stored_arguments():
    g = torch.Generator().manual_seed(0)
    image = torch.randint(0, 256, (3, 30, 36), dtype=torch.uint8, generator=g)
    op = rand_augment(POLICY, fill=(124, 116, 104))
    recipe = Recipe((RandomResizedCrop(), op), 24)
    seen = set()
    for seed in range(60):
        params = sample_params(recipe, seed, (30, 36))
        crop = replay(image, Recipe((RandomResizedCrop(),), 24), params[:4])
        expected = Image.fromarray(crop.permute(1, 2, 0).numpy())
        for name, m, s in op.layers(params[4:]):
            seen.add(name)
            expected = taa.NAME_TO_OP[name](expected, *level_args(name, m, s), fillcolor=(124, 116, 104),
                                            resample=Image.BICUBIC)
        expected = torch.from_numpy(np.array(expected)).permute(2, 0, 1)
        assert torch.equal(replay(image, recipe, params), expected), seed
    assert len(seen) >= 12  # the seeds exercised most of the op set


def test_stored_draws_are_what_replay_uses():
    op = rand_augment(POLICY)
    recipe = Recipe((RandomResizedCrop(), op), 16)
    assert recipe.param_names[4:] == [f"rand_augment.{p}{i}" for i in range(2) for p in ("op", "apply", "magnitude",
                                                                                          "sign")]
    values = np.stack([sample_params(recipe, s, (20, 20))[4:] for s in range(500)]).reshape(-1, 4)
    assert set(values[:, 1]) == {0.0, 1.0} and set(values[:, 3]) == {-1.0, 1.0}
    assert values[:, 2].min() >= 0 and values[:, 2].max() <= 10 and abs(values[:, 2].mean() - 9) < 0.1
    unsigned = [i for i, t in enumerate(op.transforms) if t not in SIGNED]
    assert (values[np.isin(values[:, 0], unsigned), 3] == 1.0).all()


def test_policy_strings():
    op = rand_augment("rand-m7-n3-mstd0.2-mmax12-p0.9")
    assert (op.magnitude, op.num_ops, op.magnitude_std, op.magnitude_max, op.prob) == (7, 3, 0.2, 12, 0.9)
    assert rand_augment("rand") == RandAugment()
    for bad, match in (("v0", "only timm RandAugment"), ("augmix-m5", "only timm RandAugment"),
                       ("rand-m9-tweights", "unknown section"), ("rand-x3", "unknown section"),
                       ("rand-m9-mstd", "unknown section")):
        with pytest.raises(ValueError, match=match):
            rand_augment(bad)
    with pytest.raises(ValueError, match="unknown"):
        RandAugment(transforms=("Cutout",))


def test_posterize_to_zero_bits_gives_black_instead_of_raising():
    """PosterizeIncreasing at magnitude 10 keeps 0 bits; recent Pillow refuses that, older Pillow returned black."""
    op = rand_augment(POLICY)
    assert level_args("PosterizeIncreasing", 10.0, 1.0) == (0,)
    index = op.transforms.index("PosterizeIncreasing")
    values = np.array([index, 1, 10.0, 1, index, 0, 0.0, 1], dtype=np.float64)
    image = torch.full((3, 8, 8), 200, dtype=torch.uint8)
    assert not op.apply(image, values, Recipe((RandomResizedCrop(), op), 8)).any()
