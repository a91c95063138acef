"""ViTKD: mimicking and generation terms against hand formulas (fixed mask, hand-set generator), the official
sum/B scale, the 1/lam division, variants, target resolution, golden values."""
import math

import numpy as np
import pytest
import timm
import torch

from featcache.methods import METHODS, DistillTask, MethodContext, StudentOutput
from featcache.methods.vitkd import (apply_mask, correlation_mimic_loss, random_masking, vitkd_generation_loss,
                                     vitkd_mimic_loss)
from featcache.manifest import Manifest

from featcache.testing.students import IMG, make_student

B, N, DT, DS = 2, 16, 48, 32


def layer_norm(x, w, b, eps):
    return (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + eps) * w + b


@pytest.fixture
def normed_manifest(manifest):
    """The tiny manifest with a non-trivial teacher final norm (random-init norms are weight 1, bias 0)."""
    m = manifest.copy()
    rng = np.random.default_rng(5)
    m["teacher"]["final_norm"].update(weight=rng.normal(1, 0.3, DT).tolist(), bias=rng.normal(0, 0.3, DT).tolist())
    return m


def fake_batch(seed=0):
    rng = np.random.default_rng(seed)
    feats = {i: rng.normal(size=(B, 1 + N, DS)).astype(np.float32) for i in range(3)}
    targets = {f"block_{i}": rng.normal(size=(B, 1 + N, DT)).astype(np.float32) for i in range(4)}
    return feats, targets


def student_output(feats, norm):
    return StudentOutput(torch.zeros(B, 10), {i: torch.tensor(v) for i, v in feats.items()}, 1, norm)


def test_mimic_sum_over_b_and_scale_gotcha():
    rng = np.random.default_rng(0)
    p, t = rng.normal(size=(2, B, N, DT)), rng.normal(size=(2, B, N, DT))
    got = vitkd_mimic_loss([torch.tensor(x) for x in p], [torch.tensor(x) for x in t]).item()
    # Sum over two layers / B, i.e. 2 * N * D times the per-element MSE (the official scale, not a mean).
    assert np.isclose(got, 2 * N * DT * ((p - t) ** 2).mean())


def test_apply_mask_matches_masked_where():
    torch.manual_seed(3)
    x, token = torch.randn(B, N, 4), torch.randn(1, 1, 4)
    masking = random_masking(B, N, 0.5)
    got = apply_mask(x, token, masking)
    assert masking.mask.sum(1).tolist() == [N - int(N * 0.5)] * B
    assert torch.equal(got, torch.where(masking.mask.bool()[..., None], token.expand_as(x), x))


@pytest.mark.parametrize("teacher_norm", ["LayerNorm", "Identity"])
def test_method_terms_by_hand(normed_manifest, teacher_norm):
    """Zeroed adapters/convs with set biases make both terms hand-computable; the mask is reproduced by seed.
    An average-pooling teacher (final norm ``Identity``) has its last block's raw tokens as the deep target."""
    student = make_student()
    fn = normed_manifest["teacher"]["final_norm"]
    if teacher_norm == "Identity":
        normed_manifest = Manifest({**normed_manifest, "teacher": {**normed_manifest["teacher"],
                                                                   "final_norm": {"type": "Identity"}}})
    method = METHODS.get("vitkd")(MethodContext(normed_manifest, student, IMG), lam=0.25)
    c, v = 0.3, np.linspace(-1, 1, DT).astype(np.float32)
    with torch.no_grad():
        for lin in [*method.align2, method.align]:
            lin.weight.zero_()
            lin.bias.fill_(c)
        method.generation[0].weight.zero_()
        method.generation[2].weight.zero_()
        method.generation[2].bias.copy_(torch.tensor(v))
    feats, targets = fake_batch()
    torch.manual_seed(11)
    out = method(student_output(feats, student.norm), {k: torch.tensor(t) for k, t in targets.items()}, None)
    # Mimicking: blocks 0 and 1, CLS dropped on both sides, prediction = c everywhere.
    mimic = sum(((targets[f"block_{k}"][:, 1:] - c) ** 2).sum() for k in (0, 1)) / B
    # Generation: G = v at every token; target = teacher final norm (manifest params) of block_3 patch tokens.
    th = targets["block_3"][:, 1:].astype(np.float64)
    if teacher_norm == "LayerNorm":
        th = layer_norm(th, np.array(fn["weight"]), np.array(fn["bias"]), fn["eps"])
    torch.manual_seed(11)
    ids_shuffle = torch.argsort(torch.rand(B, N), dim=1).numpy()
    len_keep = int(N * (1 - 0.25))
    gen = sum(((th[b, ids_shuffle[b, len_keep:]] - v) ** 2).sum() for b in range(B)) / (B * 0.25)
    assert len_keep == 12
    assert np.isclose(out["mimic"].item(), mimic, rtol=1e-5)
    assert np.isclose(out["generation"].item(), gen, rtol=1e-5)
    assert np.isclose(out["loss"].item(), 3e-5 * mimic + 3e-6 * gen, rtol=1e-5)


def test_generation_loss_divides_by_lam():
    pred, target = torch.ones(1, 4, 2), torch.zeros(1, 4, 2)
    mask = torch.tensor([[1.0, 0.0, 0.0, 0.0]])
    assert vitkd_generation_loss(pred, target, mask, 0.25).item() == pytest.approx(2 / 0.25)
    assert vitkd_generation_loss(pred, target, mask, 0.5).item() == pytest.approx(2 / 0.5)


def test_correlation_mimic_matches_formula():
    rng = np.random.default_rng(4)
    s, t = rng.normal(size=(B, N, DS)), rng.normal(size=(B, N, DT))
    ms = np.einsum("bnd,bmd->bnm", s, s) / math.sqrt(DS)
    mt = np.einsum("bnd,bmd->bnm", t, t) / math.sqrt(DT)
    got = correlation_mimic_loss([torch.tensor(s)], [torch.tensor(t)]).item()
    assert np.isclose(got, ((mt - ms) ** 2).sum() / B)


@pytest.mark.parametrize("kwargs", [dict(mimic="correlation"), dict(generation="self_attention", gen_depth=1),
                                    dict(generation="cross_attention", gen_depth=1)])
def test_variants_train(ctx, batch, kwargs):
    method = METHODS.get("vitkd")(ctx, **kwargs)
    task = DistillTask(ctx.student, {"vitkd": (method, 1.0)}, ce_weight=0.0)
    images, targets, labels = batch
    out = task(images, targets, labels)
    out["loss"].backward()
    assert torch.isfinite(out["loss"]) and out["loss"].ndim == 0
    assert all(p.grad is not None for p in method.parameters()), [n for n, p in method.named_parameters()
                                                                  if p.grad is None]
    assert ctx.student.blocks[0].attn.qkv.weight.grad.abs().sum() > 0


def test_cross_attention_only_changes_masked_tokens():
    from featcache.methods._generators import CrossAttentionGenerator

    torch.manual_seed(0)
    gen, x = CrossAttentionGenerator(8, depth=1), torch.randn(B, N, 8)
    masking = random_masking(B, N, 0.5)
    out = gen(x, masking.ids_masked, (4, 4))
    keep = ~masking.mask.bool()
    assert not torch.allclose(out[keep], x[keep])  # positions are added, so the visible outputs are x + pos
    from timm.layers import build_sincos2d_pos_embed
    pos = build_sincos2d_pos_embed([4, 4], 8).expand(B, -1, -1)
    assert torch.allclose(out[keep], (x + pos)[keep])


def test_required_targets_resolution(manifest):
    vitkd = METHODS.get("vitkd")
    assert vitkd.required_targets(manifest) == ["block_0", "block_1", "block_3"]
    assert vitkd.required_targets(Manifest(teacher={"num_blocks": 12})) == ["block_0", "block_1", "block_11"]
    assert vitkd.required_targets(Manifest(teacher={"num_blocks": 2})) == ["block_0", "block_1"]  # deduplicated


def test_bad_inputs_fail_loudly(manifest):
    cnn = timm.create_model("convnext_atto", pretrained=False, num_classes=10, depths=(1, 1, 1, 1),
                            dims=(8, 16, 24, 32))
    with pytest.raises(ValueError, match="ViT-like"):
        METHODS.get("vitkd")(MethodContext(manifest, cnn, IMG))
    with pytest.raises(ValueError, match="unknown"):
        METHODS.get("vitkd")(MethodContext(manifest, make_student(), IMG), generation="mlp")
    method = METHODS.get("vitkd")(MethodContext(manifest, make_student(patch_size=4), IMG))
    feats = {i: torch.randn(B, 65, DS) for i in range(3)}
    with pytest.raises(ValueError, match="same patch grid"):
        method(StudentOutput(torch.zeros(B, 10), feats, 1, torch.nn.LayerNorm(DS)),
               {f"block_{i}": torch.randn(B, 17, DT) for i in range(4)}, None)


def test_vitkd_golden_default_config(normed_manifest):
    torch.manual_seed(0)
    student = make_student()
    method = METHODS.get("vitkd")(MethodContext(normed_manifest, student, IMG))
    feats, targets = fake_batch(1)
    torch.manual_seed(5)
    out = method(student_output(feats, student.norm), {k: torch.tensor(t) for k, t in targets.items()}, None)
    got = [out["loss"].item(), out["mimic"].item(), out["generation"].item()]
    assert np.allclose(got, GOLDEN_VITKD, rtol=1e-5), got


GOLDEN_VITKD = [0.06556417047977448, 2110.08154296875, 753.9083251953125]  # once from the verified code (seeds 0, 5)
