"""ScaleKD: DFM losses by hand, mean removal == DCT-DC zeroing, CAP by hand, students of any architecture, TPP."""
import math

import numpy as np
import pytest
import timm
import torch
from timm.models.mlp_mixer import MlpMixer

from featcache.methods import METHODS, DistillTask, MethodContext, student_forward
from featcache.methods.scalekd import (CrossAttentionProjector, frequency_view_loss, remove_dc, soft_ce_kd,
                                       spatial_view_loss)

from featcache.testing.students import CLASSES, IMG, TEACHER_KWARGS, make_student

ScaleKD = METHODS.get("scalekd")


def dct_matrix(n: int) -> np.ndarray:
    """Unnormalised DCT-II (scipy ``norm=None``): ``X_k = 2 Σ_j x_j cos(π k (2j + 1) / 2n)``."""
    k, j = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
    return 2.0 * np.cos(np.pi * k * (2 * j + 1) / (2 * n))


def dc_zeroed_via_dct(x: np.ndarray) -> np.ndarray:
    """2-D DCT over (H, W), set coefficient [0, 0] to 0, inverse DCT -- the official frequency path."""
    h, w = x.shape[-2:]
    dh, dw = dct_matrix(h), dct_matrix(w)
    coef = dh @ x @ dw.T
    coef[..., 0, 0] = 0.0
    return np.linalg.inv(dh) @ coef @ np.linalg.inv(dw).T


def hand_dfm(p: np.ndarray, t: np.ndarray) -> float:
    """Σ_{b,c,h,w} (p/|p|_c - t/|t|_c)² / B with explicit loops over b, h, w."""
    b, c, h, w = p.shape
    total = 0.0
    for i in range(b):
        for y in range(h):
            for x in range(w):
                pv, tv = p[i, :, y, x], t[i, :, y, x]
                total += float(((pv / np.linalg.norm(pv) - tv / np.linalg.norm(tv)) ** 2).sum())
    return total / b


@pytest.fixture
def maps():
    rng = np.random.default_rng(0)
    return rng.normal(size=(2, 3, 4, 5)), rng.normal(size=(2, 3, 4, 5))


def test_spatial_view_loss_equals_hand_value(maps):
    p, t = maps
    got = spatial_view_loss(torch.tensor(p), torch.tensor(t)).item()
    assert got == pytest.approx(hand_dfm(p, t), rel=1e-10)
    # A tiny case worked on paper: one location, channels (3, 4) vs (1, 0): |(.6, .8) - (1, 0)|² = .16 + .64.
    one = spatial_view_loss(torch.tensor([[[[3.0]], [[4.0]]]]), torch.tensor([[[[1.0]], [[0.0]]]]))
    assert one.item() == pytest.approx(0.8)


def test_frequency_view_is_dct_dc_zeroing_and_equals_hand_value(maps):
    p, t = maps
    for x in (p, t, np.random.default_rng(1).normal(size=(1, 2, 7, 7))):
        np.testing.assert_allclose(remove_dc(torch.tensor(x)).numpy(), dc_zeroed_via_dct(x), atol=1e-12)
    got = frequency_view_loss(torch.tensor(p), torch.tensor(t)).item()
    assert got == pytest.approx(hand_dfm(dc_zeroed_via_dct(p), dc_zeroed_via_dct(t)), rel=1e-9)
    assert got != pytest.approx(hand_dfm(p, t), rel=1e-3)  # the two views really differ


def test_soft_ce_kd_is_kl_plus_teacher_entropy():
    zs, zt = torch.tensor([[1.0, 2.0, 0.5]]), torch.tensor([[2.0, 0.0, 1.0]])
    pt = [math.exp(v) / sum(math.exp(u) for u in zt[0].tolist()) for v in zt[0].tolist()]
    ls = [v - math.log(sum(math.exp(u) for u in zs[0].tolist())) for v in zs[0].tolist()]
    hand = -sum(a * b for a, b in zip(pt, ls))
    assert soft_ce_kd(zs, zt, 1.0).item() == pytest.approx(hand, rel=1e-6)
    kl = torch.nn.functional.kl_div(zs.log_softmax(1), zt.softmax(1), reduction="batchmean")
    entropy = -sum(v * math.log(v) for v in pt)
    assert soft_ce_kd(zs, zt, 1.0).item() == pytest.approx(kl.item() + entropy, rel=1e-6)


def test_cap_matches_a_hand_written_forward():
    torch.manual_seed(0)
    cap = CrossAttentionProjector(student_dim=6, teacher_dim=8, query_hw=(2, 3), student_hw=(2, 2), num_heads=2).eval()
    x = torch.randn(2, 6, 2, 2)
    kv = (cap.proj_student(x) + cap.pos_embed).flatten(2).transpose(1, 2)  # [2, 4, 6]
    qry = torch.relu(cap.proj_pos[0](cap.query.weight.t().reshape(1, 8, 2, 3))).flatten(2).transpose(1, 2)
    q, k, v = cap.q(qry), cap.k(kv), cap.v(kv)
    heads = []
    for h in range(2):
        sl = slice(4 * h, 4 * h + 4)
        att = torch.softmax(q[..., sl] @ k[..., sl].transpose(1, 2) * 4 ** -0.5 * 5.0, dim=-1)
        heads.append(att @ v[..., sl])
    a = cap.proj(torch.cat(heads, -1))
    n = cap.norm(a)
    expected = n + cap.ffn(n)
    got = cap(x)
    assert got.shape == (2, 6, 8)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def resnet_student():
    torch.manual_seed(0)
    return timm.create_model("resnet18", pretrained=False, num_classes=CLASSES)


def mixer_student():
    torch.manual_seed(0)
    return MlpMixer(img_size=IMG, patch_size=8, embed_dim=32, num_blocks=2, num_classes=CLASSES)


def gap_vit_student():
    """No CLS token, average pooling: the official ScaleKD DeiT-B student setting (``with_cls_token=False``)."""
    return make_student(class_token=False, global_pool="avg")


@pytest.mark.parametrize("make", [make_student, gap_vit_student, resnet_student, mixer_student],
                         ids=["vit", "vit-gap", "resnet", "mixer"])
def test_any_student_architecture_trains(manifest, batch, make):
    images, targets, labels = batch
    student = make()
    method = ScaleKD(MethodContext(manifest, student, IMG))
    assert method.online_teacher_cost() is None
    task = DistillTask(student, {"scalekd": (method, 1.0)}, ce_weight=ScaleKD.default_ce_weight)
    out = task(images, targets, labels)
    out["loss"].backward()
    parts = {k.split("/")[1] for k in out if k.startswith("scalekd/")}
    assert parts == {"loss", "spat", "freq", "kd"}
    hand = 0.08 * out["scalekd/spat"] + 0.06 * out["scalekd/freq"] + 0.5 * out["scalekd/kd"]
    assert out["scalekd/loss"].item() == pytest.approx(hand.item(), rel=1e-5)
    assert 0 < out["scalekd/spat"].item() <= 4 * 16  # each of the 4x4 teacher locations contributes at most 4
    first = next(p for p in student.parameters() if p.requires_grad)
    assert first.grad is not None and first.grad.abs().sum() > 0
    assert method.projectors[0].query.weight.shape[0] == 16  # one query per teacher token (4x4 grid)


def test_teacher_map_is_final_normed_patch_tokens(manifest, batch):
    _, targets, _ = batch
    method = ScaleKD(MethodContext(manifest, make_student(), IMG))
    fn = manifest["teacher"]["final_norm"]
    normed = torch.nn.functional.layer_norm(targets["block_3"], (48,), torch.tensor(fn["weight"]),
                                            torch.tensor(fn["bias"]), fn["eps"])
    expected = normed[:, 1:].transpose(1, 2).reshape(4, 48, 4, 4)
    torch.testing.assert_close(method.teacher_map(targets), expected)


def test_tpp_runs_the_frozen_teacher_tail_with_gradients(manifest, batch, tiny_teacher):
    images, targets, labels = batch
    student = make_student()
    method = ScaleKD(MethodContext(manifest, student, IMG), tpp=True)
    last = TEACHER_KWARGS["depth"] - 1
    assert f"block {last}" in method.online_teacher_cost()
    t_state = tiny_teacher.model.state_dict()
    for name, value in method.tpp_block.state_dict().items():
        assert torch.equal(value, t_state[f"blocks.{last}.{name}"])
    assert not any(p.requires_grad for p in method.tpp_block.parameters())
    task = DistillTask(student, {"scalekd": (method, 1.0)}, ce_weight=0.5)
    task.train()
    assert not method.tpp_block.training
    out = task(images, targets, labels)
    assert {"scalekd/tpp_spat", "scalekd/tpp_freq"} <= set(out)
    out["loss"].backward()
    assert all(p.grad is None for p in method.tpp_block.parameters())
    # Gradients flow *through* the frozen teacher block into the TPP projectors and the student.
    assert method.tpp_projectors[0].k.weight.grad.abs().sum() > 0
    assert method.tpp_prefix.grad is not None
    assert student.blocks[-1].mlp.fc2.weight.grad.abs().sum() > 0


def test_required_targets_and_loss_on_kd_off(manifest, batch):
    images, targets, labels = batch
    assert ScaleKD.required_targets(manifest) == ["block_3", "logits"]
    assert ScaleKD.required_targets(manifest, kd_weight=0.0) == ["block_3"]
    student = make_student()
    method = ScaleKD(MethodContext(manifest, student, IMG), kd_weight=0.0, alpha=(1.0, 0.0))
    out = method(student_forward(student, images, method.student_layers()), targets, labels)
    assert "kd" not in out and out["loss"].item() == pytest.approx(out["spat"].item(), rel=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("student,args", [("deit_tiny_patch16_224", ["--method-arg", "tpp=true",
                                                                     "--student-kwargs", '{"patch_size": 8}']),
                                          ("resnet18", [])], ids=["deit-tpp", "resnet"])
def test_cli_extract_then_train_scalekd(tmp_path, student, args):
    """`featcache extract` -> `featcache train --method scalekd` with a ViT (TPP on) and a ResNet student."""
    import json

    from click.testing import CliRunner
    from featcache.testing.caches import cli_extract_tiny_vit

    from featcache.cli import main

    _, cache = cli_extract_tiny_vit(tmp_path)
    run = CliRunner().invoke
    res = run(main, ["train", "--cache", str(cache), "--out", str(tmp_path / "run"), "--method",
                     "scalekd", "--student", student, "--epochs", "1", "--max-steps", "2", "--batch-size", "4",
                     "--workers", "0", "--log-every", "1", *args])
    assert res.exit_code == 0, res.output
    final = json.loads((tmp_path / "run" / "final.json").read_text())
    assert final["steps"] == 2
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    assert train and {"scalekd/spat", "scalekd/freq", "scalekd/kd"} <= set(train[-1])
    online = " ".join(final["online_teacher_cost"])
    assert ("TPP runs teacher block 3" in online) == ("tpp=true" in args)


@pytest.mark.parametrize("tpp", [False, True], ids=["default", "tpp"])
def test_scalekd_golden_default_config(manifest, batch, tpp):
    """Official defaults (alpha 0.08/0.06, KD 0.5 at T=1, 8 heads, scale 5) on fixed inputs, against stored values."""
    images, targets, labels = batch
    torch.manual_seed(0)  # student and projector init
    student = make_student()
    method = ScaleKD(MethodContext(manifest, student, IMG), tpp=tpp)
    out = method(student_forward(student, images, method.student_layers()), targets, labels)
    got = {k: v.item() for k, v in out.items()}
    want = GOLDEN_SCALEKD["tpp" if tpp else "default"]
    assert set(got) == set(want)
    assert np.allclose([got[k] for k in sorted(want)], [want[k] for k in sorted(want)], rtol=1e-5), got


# Computed once from the verified implementation (seed 0, the session's tiny teacher and batch).
GOLDEN_SCALEKD = {
    "default": {"loss": 5.665008544921875, "spat": 32.40457534790039, "freq": 31.966665267944336,
                "kd": 2.3092851638793945},
    "tpp": {"loss": 10.173885345458984, "tpp_spat": 31.996328353881836, "tpp_freq": 31.676610946655273,
            "spat": 32.56163024902344, "freq": 32.56682586669922, "kd": 2.3092851638793945},
}
