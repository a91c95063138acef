"""The frozen teacher: named targets (ViT tokens, CNN maps as tokens), its manifest entry, and the rebuild check."""
import subprocess
import sys

import pytest
import torch

from featcache.errors import CompatError
from featcache.models import forward_taps, weights_sha256
from featcache.teachers import load_teacher, teacher_from_manifest

VIT = dict(img_size=32, num_classes=5, patch_size=8, embed_dim=48, depth=3, num_heads=3)


@pytest.fixture(scope="module")
def images():
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def vit():
    return load_teacher("deit3_small_patch16_224", pretrained=False, **VIT)


def test_vit_targets_are_prefixed_tokens_and_logits(vit, images):
    targets = vit.targets(images, [0, 2])
    assert sorted(targets) == ["block_0", "block_2", "logits"]
    _, feats = forward_taps(vit.model, images, [0, 2])
    assert torch.equal(targets["block_0"], feats[0]) and targets["block_2"].shape == (2, 1 + 16, 48)
    torch.testing.assert_close(targets["logits"], vit.model(images))
    assert not any(p.requires_grad for p in vit.model.parameters()) and not vit.model.training


def test_cnn_targets_are_row_major_tokens_of_the_stage_maps(images):
    teacher = load_teacher("resnet18", pretrained=False, num_classes=5)
    assert teacher.num_blocks() == 5
    targets = teacher.targets(images, [2, 3])
    _, maps = forward_taps(teacher.model, images, [2, 3])
    for name, m in zip(("block_2", "block_3"), maps):
        b, c, h, w = m.shape
        assert targets[name].shape == (b, h * w, c)
        assert torch.equal(targets[name][:, 1], m[:, :, 0, 1])  # token 1 = row 0, column 1
    entry = teacher.manifest_entry()
    assert entry["final_norm"] is None and entry["num_prefix_tokens"] == 0 and entry["grid_size"] is None


def test_manifest_entry_describes_the_vit(vit):
    entry = vit.manifest_entry()
    assert entry["name"] == "deit3_small_patch16_224" and entry["architecture"] == "deit3_small_patch16_224"
    assert (entry["num_blocks"], entry["num_prefix_tokens"], entry["embed_dim"], entry["patch_size"]) == (3, 1, 48, 8)
    assert entry["grid_size"] == [4, 4] and entry["weights_sha256"] == weights_sha256(vit.model)
    norm = entry["final_norm"]
    assert norm["type"] == "LayerNorm" and len(norm["weight"]) == len(norm["bias"]) == 48


def test_an_average_pooling_vit_records_that_its_tokens_have_no_final_norm():
    teacher = load_teacher("vit_tiny_patch16_224", pretrained=False, img_size=32, num_classes=3, patch_size=8,
                           embed_dim=48, depth=2, num_heads=3, global_pool="avg")
    assert isinstance(teacher.model.fc_norm, torch.nn.LayerNorm), "timm normalises the pooled vector instead"
    assert teacher.manifest_entry()["final_norm"] == {"type": "Identity"}


def test_teacher_from_manifest_rebuilds_and_checks_the_weights(vit):
    manifest = {"teacher": vit.manifest_entry(), "img_size": 32,
                "teacher_kwargs": {k: v for k, v in VIT.items() if k not in ("img_size", "num_classes")}}
    rebuilt = teacher_from_manifest(manifest)
    assert weights_sha256(rebuilt.model) == manifest["teacher"]["weights_sha256"]
    manifest["teacher"] = dict(manifest["teacher"], weights_sha256="0" * 64)
    with pytest.raises(CompatError, match=r"teacher weights differ.*random init.*extract from a saved --checkpoint"):
        teacher_from_manifest(manifest)


def test_teacher_from_a_moved_checkpoint_is_checked_against_the_cache(vit, tmp_path):
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in vit.model.state_dict().items()}, str(tmp_path / "t.safetensors"))
    manifest = {"teacher": dict(vit.manifest_entry(), checkpoint="gone/t.safetensors"), "img_size": 32,
                "teacher_kwargs": {k: v for k, v in VIT.items() if k not in ("img_size", "num_classes")}}
    rebuilt = teacher_from_manifest(manifest, checkpoint=str(tmp_path / "t.safetensors"))
    assert weights_sha256(rebuilt.model) == manifest["teacher"]["weights_sha256"]
    manifest["teacher"]["weights_sha256"] = "0" * 64
    with pytest.raises(CompatError, match=r"teacher weights differ.*pass the same --checkpoint/--pretrained"):
        teacher_from_manifest(manifest, checkpoint=str(tmp_path / "t.safetensors"))


def test_teachers_do_not_import_the_methods():
    """Teachers sit below the methods: loading one must not pull in (or cycle through) featcache.methods."""
    code = "import sys, featcache.teachers; print('featcache.methods' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_a_local_dir_teacher_is_recorded_by_its_name_and_real_architecture(vit, tmp_path, images):
    from timm.models import save_for_hf

    save_for_hf(vit.model, str(tmp_path / "t"), safe_serialization=True)  # e.g. an earlier run's student/
    teacher = load_teacher(f"local-dir:{tmp_path / 't'}", pretrained=True)
    entry = teacher.manifest_entry()
    assert entry["name"] == entry["timm_name"] == f"local-dir:{tmp_path / 't'}"
    assert entry["architecture"] == "deit3_small_patch16_224" and entry["weights_sha256"] == weights_sha256(vit.model)
    rebuilt = teacher_from_manifest({"teacher": entry, "img_size": 32})
    assert torch.equal(rebuilt.targets(images, [1])["logits"], vit.targets(images, [1])["logits"])
