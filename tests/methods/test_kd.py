"""Hinton KD: the pure loss against a hand-written KL, and the registered method on a tiny student."""
import math

import numpy as np
import torch
import torch.nn.functional as F

from featcache.methods import METHODS, StudentOutput
from featcache.methods.kd import kd_loss

ZS = [[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]]
ZT = [[2.0, 0.0, 1.0], [1.0, 1.0, -2.0]]


def hand_kd(zs, zt, temp):
    """T^2 * (1/B) sum_b sum_c p_t log(p_t / p_s), with explicit loops."""
    total = 0.0
    for s_row, t_row in zip(zs, zt):
        es = [math.exp(v / temp) for v in s_row]
        et = [math.exp(v / temp) for v in t_row]
        ps = [v / sum(es) for v in es]
        pt = [v / sum(et) for v in et]
        total += sum(t * math.log(t / s) for s, t in zip(ps, pt))
    return temp ** 2 * total / len(zs)


def test_kd_matches_hand_kl_with_t2_and_batchmean():
    got = kd_loss(torch.tensor(ZS), torch.tensor(ZT), temperature=2.0)
    assert abs(got.item() - hand_kd(ZS, ZT, 2.0)) < 1e-6
    # Not the per-element 'mean' reduction (C times smaller) and not without T^2 (4 times smaller).
    log_s, p_t = F.log_softmax(torch.tensor(ZS) / 2.0, dim=1), F.softmax(torch.tensor(ZT) / 2.0, dim=1)
    per_element = F.kl_div(log_s, p_t, reduction="sum").item() / log_s.numel()  # what reduction='mean' gives
    assert abs(got.item() - per_element * 4.0) > 1e-3
    assert abs(got.item() - F.kl_div(log_s, p_t, reduction="batchmean").item()) > 1e-3
    assert abs(kd_loss(torch.tensor(ZS), torch.tensor(ZT), 1.0).item() - hand_kd(ZS, ZT, 1.0)) < 1e-6


def test_kd_is_zero_when_student_matches_and_soft_ce_has_same_gradient():
    z = torch.tensor(ZT)
    assert kd_loss(z, z, 4.0).abs().item() < 1e-6
    zs = torch.tensor(ZS, requires_grad=True)
    kd_loss(zs, torch.tensor(ZT), 2.0).backward()
    # cls_KD's soft cross-entropy -T^2 mean_b sum p_t log p_s differs by a constant: identical gradient.
    zs2 = torch.tensor(ZS, requires_grad=True)
    pt = torch.softmax(torch.tensor(ZT) / 2, 1)
    (-(pt * torch.log_softmax(zs2 / 2, 1)).sum(1).mean() * 4).backward()
    assert torch.allclose(zs.grad, zs2.grad, atol=1e-6)


def test_kd_method_weight_and_parts(ctx):
    method = METHODS.get("kd")(ctx, temperature=2.0, weight=0.5)
    assert method.required_targets(ctx.manifest) == ["logits"] and method.student_layers() == []
    out = method(StudentOutput(torch.tensor(ZS)), {"logits": torch.tensor(ZT)}, torch.tensor([0, 1]))
    assert np.isclose(out["kd"].item(), hand_kd(ZS, ZT, 2.0), atol=1e-6)
    assert np.isclose(out["loss"].item(), 0.5 * hand_kd(ZS, ZT, 2.0), atol=1e-6)


def test_kd_golden_default_config(ctx):
    gen = torch.Generator().manual_seed(123)
    zs, zt = torch.randn(8, 10, generator=gen), 3 * torch.randn(8, 10, generator=gen)
    out = METHODS.get("kd")(ctx)(StudentOutput(zs), {"logits": zt}, torch.zeros(8, dtype=torch.long))
    assert np.isclose(out["loss"].item(), GOLDEN_KD, rtol=1e-5), out["loss"].item()


GOLDEN_KD = 1.7922221422195435  # computed once from the verified implementation (seed 123)
