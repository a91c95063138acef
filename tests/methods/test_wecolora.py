"""WeCoLoRA: weight-copied student, step-0 identity, LoRA-only gradients, merge equivalence, hand-computed L1."""
import numpy as np
import pytest
import timm
import torch

from featcache.methods import METHODS, DistillTask, MethodContext, student_forward
from featcache.methods.wecolora import LoRALinear, wecolora_loss

from featcache.testing.students import IMG, TEACHER_KWARGS

WeCoLoRA = METHODS.get("wecolora")


def build(manifest, **kw):
    student = WeCoLoRA.build_student(manifest, "teacher", IMG, **kw)
    return student, WeCoLoRA(MethodContext(manifest, student, IMG), **kw)


def subsampled_teacher(teacher, images, k):
    """The teacher's own forward with only blocks 0, k, 2k, ... (pre-norm tokens, then its norm + head)."""
    m = teacher.model
    with torch.no_grad():
        x = m.norm_pre(m._pos_embed(m.patch_embed(images)))
        for blk in m.blocks[0::k]:
            x = blk(x)
        return x, m.forward_head(m.norm(x))


@pytest.mark.parametrize("k,blocks", [(2, [0, 2]), (3, [0, 3])])
def test_student_copies_teacher_blocks_j_times_k(manifest, tiny_teacher, k, blocks):
    student, method = build(manifest, k=k, r=4)
    assert len(student.blocks) == len(blocks) == method.spec["model_kwargs"]["depth"]
    t_state = tiny_teacher.model.state_dict()
    for j, i in enumerate(blocks):
        base = student.blocks[j].attn.qkv.base.weight
        assert torch.equal(base, t_state[f"blocks.{i}.attn.qkv.weight"])
        assert torch.equal(student.blocks[j].mlp.fc2.base.weight, t_state[f"blocks.{i}.mlp.fc2.weight"])
    for name in ("cls_token", "pos_embed", "patch_embed.proj.weight", "norm.weight", "head.weight"):
        assert torch.equal(student.state_dict()[name], t_state[name])
    assert [d["module"] for d in student.feature_info] == [f"blocks.{j}" for j in range(len(blocks))]
    assert method.required_targets(manifest) == [f"block_{TEACHER_KWARGS['depth'] - 1}"]


@pytest.mark.parametrize("targets", ["all", "qv"])
def test_step0_student_is_exactly_the_layer_subsampled_teacher(manifest, tiny_teacher, batch, targets):
    images = batch[0]
    student, method = build(manifest, k=2, r=4, lora_targets=targets)
    student.eval()
    with torch.no_grad():
        out = student_forward(student, images, method.student_layers())
    ref_tokens, ref_logits = subsampled_teacher(tiny_teacher, images, 2)
    assert torch.equal(out.features[method.student_last], ref_tokens)
    assert torch.equal(out.logits, ref_logits)


def test_only_lora_parameters_receive_gradients(manifest, batch):
    images, targets, labels = batch
    student, method = build(manifest, k=2, r=4)
    task = DistillTask(student, {"wecolora": (method, 1.0)}, ce_weight=WeCoLoRA.default_ce_weight)
    task(images, targets, labels)["loss"].backward()
    trainable = {n for n, p in task.named_parameters() if p.requires_grad}
    with_grad = {n for n, p in task.named_parameters() if p.grad is not None}
    assert trainable == with_grad and trainable
    assert all(".lora_A." in n or ".lora_B." in n for n in trainable)
    # Six adapted layers per block: q, k, v (three slices of qkv), proj, fc1, fc2 -> 6 A and 6 B per block.
    assert len(trainable) == 12 * len(student.blocks)
    # B starts at zero, so at step 0 only B gets a non-zero gradient (dL/dA = B^T(...) = 0).
    assert all(p.grad.abs().sum() > 0 for n, p in task.named_parameters() if ".lora_B." in n)


def test_qv_variant_adapts_only_q_and_v_slices(manifest):
    student, _ = build(manifest, k=2, r=4, lora_targets="qv")
    d = TEACHER_KWARGS["embed_dim"]
    qkv = student.blocks[0].attn.qkv
    assert isinstance(qkv, LoRALinear) and qkv.slices == [(0, d), (2 * d, 3 * d)]
    assert not isinstance(student.blocks[0].attn.proj, LoRALinear)
    assert not isinstance(student.blocks[0].mlp.fc1, LoRALinear)


def randomise_lora(student, seed=1, scale=0.05):
    """Non-zero B (and unit LayerScale: DeiT III's 1e-6 init would hide every block's contribution)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in student.named_parameters():
            if ".lora_B." in n:
                p.copy_(torch.randn(p.shape, generator=gen) * scale)
            elif n.endswith(".gamma"):
                p.fill_(1.0)
    return student


def test_merged_export_is_plain_timm_and_matches_unmerged(manifest, batch):
    images = batch[0]
    student, method = build(manifest, k=2, r=4)
    reference, _ = build(manifest, k=2, r=4)
    randomise_lora(student)
    randomise_lora(reference, scale=0.0)  # same LayerScale, B = 0: the step-0 student
    exported = method.export_student(student.eval()).eval()
    with torch.no_grad():
        unmerged = student_forward(student, images, [1])
        merged = student_forward(exported, images, [1])
        step0 = student_forward(reference.eval(), images, [1])
    assert not any(isinstance(m, LoRALinear) for m in exported.modules())
    fresh = timm.create_model("deit3_small_patch16_224", pretrained=False, img_size=IMG, num_classes=10,
                              **dict(TEACHER_KWARGS, depth=2))
    assert type(exported) is type(fresh)
    assert list(exported.state_dict()) == list(fresh.state_dict())
    assert exported.featcache_spec["model_kwargs"]["depth"] == 2
    torch.testing.assert_close(merged.features[1], unmerged.features[1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(merged.logits, unmerged.logits, rtol=1e-5, atol=1e-5)
    # The LoRA update really changed the features, so the equality above is not trivially true.
    assert (unmerged.features[1] - step0.features[1]).abs().max() > 1e-2


def test_l1_loss_equals_hand_computed_value():
    s = np.array([[[1.0, -2.0], [0.5, 0.0], [3.0, 1.0]]])  # [B=1, tokens=3 (CLS first), D=2]
    t = np.array([[[0.0, -1.0], [1.5, 2.0], [3.0, -1.0]]])
    hand = (1.0 + 1.0 + 1.0 + 2.0 + 0.0 + 2.0) / 6
    assert wecolora_loss(torch.tensor(s), torch.tensor(t)).item() == pytest.approx(hand)


def test_method_loss_is_l1_on_prenorm_tokens_against_cached_last_block(manifest, batch):
    images, targets, labels = batch
    student, method = build(manifest, k=2, r=4)
    out = student_forward(student, images, method.student_layers())
    got = method(out, targets, labels)
    last = targets[f"block_{TEACHER_KWARGS['depth'] - 1}"].numpy()
    hand = np.abs(last - out.features[1].detach().numpy()).mean()  # all tokens, CLS included
    assert got["loss"].item() == pytest.approx(float(hand), rel=1e-6)
    assert set(got) == {"loss", "l1"}


def test_weco_kd_variant_trains_everything_on_final_normed_features(manifest, batch):
    images, targets, labels = batch
    student, method = build(manifest, k=2, variant="weco_kd")
    assert all(p.requires_grad for p in student.parameters())
    assert not any(isinstance(m, LoRALinear) for m in student.modules())
    out = student_forward(student, images, method.student_layers())
    got = method(out, targets, labels)["loss"]
    fn = manifest["teacher"]["final_norm"]
    t = torch.nn.functional.layer_norm(targets["block_3"], (48,), torch.tensor(fn["weight"]), torch.tensor(fn["bias"]),
                                       fn["eps"])
    s = student.norm(out.features[1])
    assert got.item() == pytest.approx((t - s).abs().mean().item(), rel=1e-6)


def test_errors_name_the_fix(manifest):
    with pytest.raises(ValueError, match="img-size"):
        WeCoLoRA.build_student(manifest, "teacher", IMG * 2, k=2)
    with pytest.raises(ValueError, match="variant"):
        WeCoLoRA.build_student(manifest, "teacher", IMG, variant="lora++")
    student = WeCoLoRA.build_student(manifest, "teacher", IMG, k=2, r=4)
    with pytest.raises(ValueError, match="build_student"):
        WeCoLoRA(MethodContext(manifest, student, IMG), k=2, variant="weco_kd")
    with pytest.warns(UserWarning, match="ignored"):
        WeCoLoRA.build_student(manifest, "deit_tiny", IMG, k=2, r=4)
    with pytest.raises(ValueError, match="blocks"):
        WeCoLoRA(MethodContext(manifest, student, IMG), k=4)  # 1 block, not 2


@pytest.mark.slow
def test_cli_extract_train_wecolora_then_probe(tmp_path):
    """`featcache extract` -> `featcache train --method wecolora` -> `featcache probe`, tiny and on CPU."""
    import json

    from click.testing import CliRunner
    from featcache.testing.caches import cli_extract_tiny_vit
    from featcache.testing.images import make_image_folder

    from featcache.cli import main

    data, _ = cli_extract_tiny_vit(tmp_path)
    val = make_image_folder(tmp_path / "val", classes=3, per_class=2, size=(36, 40), seed=1)
    run = CliRunner().invoke
    res = run(main, ["train", "--cache", str(tmp_path / "cache"), "--out", str(tmp_path / "run"), "--method",
                     "wecolora", "--method-arg", "k=2", "--method-arg", "r=4", "--student", "teacher", "--epochs", "1",
                     "--max-steps", "2", "--batch-size", "4", "--workers", "0"])
    assert res.exit_code == 0, res.output
    spec = json.loads((tmp_path / "run" / "student.json").read_text())
    assert spec["model"] == "vit_tiny_patch16_224" and spec["model_kwargs"]["depth"] == 2
    final = json.loads((tmp_path / "run" / "final.json").read_text())
    assert final["steps"] == 2 and final["method"] == "wecolora"
    res = run(main, ["probe", "--student", str(tmp_path / "run"), "--data", str(data), "--val", str(val),
                     "--steps", "10", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    assert "linear probe top-1:" in res.output and (tmp_path / "run" / "probe.json").is_file()


def perturbed(student, variant, seed=1):
    """Non-zero LoRA B and unit LayerScale (lora), or every weight nudged (weco_kd), from one fixed generator."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in student.named_parameters():
            if ".lora_B." in n:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
            elif n.endswith(".gamma"):
                p.fill_(1.0)
            elif variant == "weco_kd":
                p.add_(torch.randn(p.shape, generator=gen) * 0.01)
    return student


@pytest.mark.parametrize("variant", ["lora", "weco_kd"])
def test_wecolora_golden_default_config(manifest, batch, variant):
    """Paper defaults (k=2, r=128, enhanced LoRA on all six layers) on fixed inputs, against stored values."""
    images, targets, labels = batch
    torch.manual_seed(0)  # LoRA A init
    student = WeCoLoRA.build_student(manifest, "teacher", IMG, variant=variant)
    method = WeCoLoRA(MethodContext(manifest, student, IMG), variant=variant)
    out = method(student_forward(perturbed(student, variant), images, method.student_layers()), targets, labels)
    assert np.isclose(out["loss"].item(), GOLDEN_WECOLORA[variant], rtol=1e-5), out["loss"].item()
    assert out["l1"].item() == out["loss"].item()


# Computed once from the verified implementation (seeds 0 and 1, the session's tiny teacher and batch).
GOLDEN_WECOLORA = {"lora": 0.1058579832315445, "weco_kd": 0.23137906193733215}
