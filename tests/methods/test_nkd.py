"""NKD: the pure loss against explicit per-row loops (target column removed, renormalised non-targets)."""
import math

import numpy as np
import pytest
import torch

from featcache.methods import METHODS, StudentOutput
from featcache.methods.nkd import nkd_loss, nkd_target_index

ZS = [[1.0, 2.0, 0.5, -0.5], [0.0, -1.0, 3.0, 1.0]]
ZT = [[2.0, 0.0, 1.0, 0.5], [1.0, 1.0, -2.0, 0.0]]
LABELS = [0, 2]


def softmax(row, temp=1.0):
    e = [math.exp(v / temp) for v in row]
    return [v / sum(e) for v in e]


def hand_nkd(zs, zt, labels, temp, gamma, remove_target=True):
    """Explicit loops; ``remove_target=False`` reproduces the pre-2023-10-10 (9466b3f3) bug."""
    lt = lnt = 0.0
    for s_row, t_row, y in zip(zs, zt, labels):
        lt += -softmax(t_row)[y] * math.log(softmax(s_row)[y])
        keep = [c for c in range(len(s_row)) if c != y or not remove_target]
        qs = softmax([s_row[c] for c in keep], temp)
        qt = softmax([t_row[c] for c in keep], temp)
        lnt += -sum(t * math.log(s) for s, t in zip(qs, qt))
    b = len(zs)
    return lt / b, temp ** 2 * lnt / b, lt / b + gamma * temp ** 2 * lnt / b


@pytest.mark.parametrize("temp,gamma", [(1.0, 1.0), (2.0, 1.5)])
def test_nkd_matches_loops(temp, gamma):
    lt, lnt = nkd_loss(torch.tensor(ZS), torch.tensor(ZT), torch.tensor(LABELS), temp)
    want_t, want_nt, want = hand_nkd(ZS, ZT, LABELS, temp, gamma)
    assert abs(lt.item() - want_t) < 1e-6 and abs(lnt.item() - want_nt) < 1e-6
    assert abs((lt + gamma * lnt).item() - want) < 1e-6
    # The old bug (target column kept in the non-target softmax) gives a clearly different value.
    assert abs(hand_nkd(ZS, ZT, LABELS, temp, gamma, remove_target=False)[2] - (lt + gamma * lnt).item()) > 1e-2


def test_nkd_non_target_equals_renormalised_distribution():
    """softmax over the C-1 non-target logits == p_i / (1 - p_t) (the 'normalized' in NKD), at T=1."""
    zs = torch.tensor(ZS)
    p = torch.softmax(zs, 1)
    _, lnt = nkd_loss(zs, zs, torch.tensor(LABELS), 1.0)
    want = 0.0
    for b, y in enumerate(LABELS):
        q = [p[b, c] / (1 - p[b, y]) for c in range(4) if c != y]
        want += -sum(v * math.log(v) for v in q) / 2
    assert abs(lnt.item() - want) < 1e-5


def test_target_index_soft_hard_and_unlabelled():
    zt = torch.tensor(ZT)
    assert nkd_target_index(torch.tensor([3, -1]), zt).tolist() == [3, 0]  # -1 -> teacher argmax
    soft = torch.tensor([[0.1, 0.2, 0.6, 0.1], [0.7, 0.1, 0.1, 0.1]])
    assert nkd_target_index(soft, zt).tolist() == [2, 0]


def test_nkd_method_parts_and_teacher_argmax_for_unlabelled(ctx):
    method = METHODS.get("nkd")(ctx)
    assert (method.temperature, method.gamma) == (1.0, 1.0)
    assert method.required_targets(ctx.manifest) == ["logits"]
    out = method(StudentOutput(torch.tensor(ZS)), {"logits": torch.tensor(ZT)}, torch.tensor([0, -1]))
    want_t, want_nt, want = hand_nkd(ZS, ZT, [0, 0], 1.0, 1.0)  # row 2: teacher argmax of [1, 1, -2, 0] is 0
    assert np.allclose([out["target"].item(), out["non_target"].item(), out["loss"].item()],
                       [want_t, want_nt, want], atol=1e-6)


def test_nkd_gradient_does_not_reach_teacher_logits(ctx):
    zs, zt = torch.tensor(ZS, requires_grad=True), torch.tensor(ZT, requires_grad=True)
    lt, lnt = nkd_loss(zs, zt, torch.tensor(LABELS), 1.0)
    (lt + lnt).backward()
    assert zt.grad is None and zs.grad.abs().sum() > 0


def test_nkd_golden_default_config(ctx):
    gen = torch.Generator().manual_seed(123)
    zs, zt = torch.randn(8, 10, generator=gen), 3 * torch.randn(8, 10, generator=gen)
    labels = torch.tensor([0, 1, 2, 3, 4, 5, -1, 9])
    out = METHODS.get("nkd")(ctx)(StudentOutput(zs), {"logits": zt}, labels)
    assert np.isclose(out["loss"].item(), GOLDEN_NKD, rtol=1e-5), out["loss"].item()


GOLDEN_NKD = 3.0800693035125732  # computed once from the verified implementation (seed 123)
