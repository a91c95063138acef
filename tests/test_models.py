"""timm plumbing: aliases, the layer resolver's contract, block counting, forward_taps (ViT and CNN), safe loading."""

import pytest
import timm
import torch
import torch.nn as nn
from safetensors.torch import save_file

from featcache.errors import ConfigError, FeatcacheError, MissingFileError
from featcache.models import (MODEL_ALIASES, count_blocks, forward_taps, load_model, load_state_dict, normalization,
                              resolve_device, resolve_layer, resolve_layers, resolve_name, weights_sha256)

TINY_VIT = dict(img_size=32, patch_size=8, embed_dim=48, depth=3, num_heads=3, num_classes=5)


def tiny_vit(**overrides) -> nn.Module:
    return load_model("vit_tiny_patch16_224", pretrained=False, **dict(TINY_VIT, **overrides)).eval()


def tiny_resnet() -> nn.Module:
    return load_model("resnet18", pretrained=False, num_classes=5).eval()


@pytest.fixture(scope="module")
def images():
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


# ------------------------------------------------------------------------------------------------ names


@pytest.mark.parametrize("alias", sorted(MODEL_ALIASES))
def test_every_alias_names_a_real_timm_model_with_pretrained_weights(alias):
    full = resolve_name(alias)
    assert full == MODEL_ALIASES[alias] and "." in full, "an alias pins the pretrained tag, not just the architecture"
    assert timm.is_model(full.split(".")[0])
    assert full in timm.list_pretrained(full), f"timm has no pretrained tag {full!r}"


def test_other_names_pass_through_and_unknown_names_name_the_fix():
    assert resolve_name("resnet18") == "resnet18" and resolve_name("vit_tiny_patch16_224.augreg_in21k") == \
        "vit_tiny_patch16_224.augreg_in21k"
    with pytest.raises(ConfigError, match=r"unknown timm model 'no_such_net'.*list_models"):
        load_model("no_such_net", pretrained=False)


def test_random_init_is_seeded_and_img_size_is_dropped_for_cnns():
    a, b = tiny_vit(), tiny_vit()
    assert weights_sha256(a) == weights_sha256(b)  # the same model every time it is built without weights
    assert weights_sha256(load_model("vit_tiny_patch16_224", pretrained=False, init_seed=1, **TINY_VIT)) != \
        weights_sha256(a)
    cnn = load_model("resnet18", pretrained=False, img_size=64, num_classes=3)  # ResNet takes no img_size
    assert cnn.num_classes == 3


def test_normalization_and_device():
    norm = normalization(load_model("deit_tiny", pretrained=False, img_size=32, depth=1))
    assert norm["mean"] == pytest.approx([0.485, 0.456, 0.406]) and norm["interpolation"] == "bicubic"
    assert norm["input_size"] == 224  # the pretrained config's side, not img_size: geometry comes from the cache
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")


# ------------------------------------------------------------------------------------------------ layers


def test_resolve_layers_counts_negative_indices_from_the_end_and_keeps_order():
    assert resolve_layers([0, 1, -1], 12) == [0, 1, 11]
    assert resolve_layers([-1, 0], 4) == [3, 0]
    assert resolve_layer(-12, 12) == 0 and resolve_layer(11, 12) == 11


@pytest.mark.parametrize("index", [12, -13, 100])
def test_resolve_layers_out_of_range_names_the_valid_range(index):
    with pytest.raises(ConfigError, match=rf"block index {index} is out of range.*valid: 0\.\.11 or -12\.\.-1"):
        resolve_layers([0, index], 12)
    with pytest.raises(ValueError, match="out of range"):  # still a ValueError for callers that catch the builtin
        resolve_layer(index, 12)


def test_resolve_layers_refuses_duplicates_even_when_spelled_differently():
    with pytest.raises(ConfigError, match=r"name a block twice \(resolved: \[11, 11\]\)"):
        resolve_layers([11, -1], 12)
    with pytest.raises(ConfigError, match="twice"):
        resolve_layers([2, 2], 4)


def test_count_blocks_vit_cnn_and_unknown():
    assert count_blocks(tiny_vit()) == 3
    resnet = tiny_resnet()
    assert count_blocks(resnet) == len(resnet.feature_info) == 5  # timm's taps (stem + 4 stages), not 4 layers
    stages = nn.Module()
    stages.stages = nn.Sequential(nn.Identity(), nn.Identity())  # no feature_info: fall back to the stage list
    assert count_blocks(stages) == 2
    with pytest.raises(ConfigError, match="cannot count the feature taps of Linear"):
        count_blocks(nn.Linear(2, 2))


# ------------------------------------------------------------------------------------------------ forward_taps


def manual_vit_blocks(model: nn.Module, images: torch.Tensor) -> list[torch.Tensor]:
    """Every block output of a timm ViT, computed step by step (prefix tokens first, before the final norm)."""
    x = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(images))))
    outs = []
    for blk in model.blocks:
        x = blk(x)
        outs.append(x)
    return outs


@pytest.mark.parametrize("reg_tokens", [0, 2], ids=["cls", "cls+registers"])
@torch.no_grad()
def test_forward_taps_vit_keeps_prefix_tokens_first(images, reg_tokens):
    model = tiny_vit(reg_tokens=reg_tokens)
    assert model.num_prefix_tokens == 1 + reg_tokens
    final, feats = forward_taps(model, images, [0, 2])
    blocks = manual_vit_blocks(model, images)
    assert [tuple(f.shape) for f in feats] == [(2, 1 + reg_tokens + 16, 48)] * 2
    torch.testing.assert_close(feats[0], blocks[0])
    torch.testing.assert_close(feats[1], blocks[2])
    torch.testing.assert_close(final, model.forward_features(images))
    torch.testing.assert_close(model.forward_head(final), model(images))


@torch.no_grad()
def test_forward_taps_vit_without_prefix_tokens(images):
    model = tiny_vit(class_token=False, global_pool="avg")
    assert model.num_prefix_tokens == 0
    final, feats = forward_taps(model, images, [resolve_layer(-1, count_blocks(model))])
    torch.testing.assert_close(feats[0], manual_vit_blocks(model, images)[2])
    torch.testing.assert_close(model.forward_head(final), model(images))


@torch.no_grad()
def test_forward_taps_cnn_gives_nchw_stage_maps(images):
    model = tiny_resnet()
    final, feats = forward_taps(model, images, [1, 4])
    info = model.feature_info
    for f, i in zip(feats, [1, 4]):
        side = 32 // info[i]["reduction"]
        assert tuple(f.shape) == (2, info[i]["num_chs"], side, side)
    torch.testing.assert_close(final, model.forward_features(images))
    torch.testing.assert_close(feats[1], final)  # the last tap is the last stage, before the (absent) final norm
    torch.testing.assert_close(model.forward_head(final), model(images))


# ------------------------------------------------------------------------------------------------ loading

_UNPICKLED = []


class _Payload:
    """An object whose unpickling would run code (here: record that it ran)."""

    def __reduce__(self):
        return (_UNPICKLED.append, ("ran",))


def test_load_state_dict_refuses_pickled_objects(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"weight": torch.zeros(2), "payload": _Payload()}, path)
    # Refused by torch's restricted unpickler, reported as one line naming the file and the safe ways out.
    with pytest.raises(ConfigError, match=r"evil.pt' cannot be loaded safely \(Unsupported global"):
        load_state_dict(path)
    assert _UNPICKLED == [], "load_state_dict ran code from the checkpoint"


def test_load_state_dict_safetensors_plain_and_wrapped(tmp_path):
    model = tiny_vit()
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(tmp_path / "w.safetensors"))
    torch.save({"model": state, "epoch": 3}, tmp_path / "wrapped.pth")  # DeiT-style wrapper
    torch.save(state, tmp_path / "plain.pth")
    for name in ("w.safetensors", "wrapped.pth", "plain.pth"):
        loaded = load_state_dict(tmp_path / name)
        assert loaded.keys() == state.keys() and all(torch.equal(loaded[k], state[k]) for k in state)
    checkpoint = str(tmp_path / "w.safetensors")
    other = load_model("vit_tiny_patch16_224", pretrained=False, init_seed=7, checkpoint=checkpoint, **TINY_VIT)
    assert weights_sha256(other) == weights_sha256(model)


def test_missing_checkpoint_is_a_featcache_error(tmp_path):
    with pytest.raises(MissingFileError, match="does not exist") as err:
        load_state_dict(tmp_path / "nope.safetensors")
    assert isinstance(err.value, FileNotFoundError) and isinstance(err.value, FeatcacheError)


# ------------------------------------------------------------------------------------------------ sources, offline


@pytest.fixture
def no_hub(monkeypatch, tmp_path):
    """An empty hub cache and a hub endpoint on a closed loopback port: nothing can be downloaded."""
    import socket

    from huggingface_hub import constants

    with socket.socket() as s:  # a port that was free a moment ago refuses connections once closed
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    for var in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    return tmp_path / "hub"


def save_timm_folder(model: nn.Module, folder) -> None:
    from timm.models import save_for_hf

    save_for_hf(model, str(folder), safe_serialization=True)


def test_local_dir_names_pass_through_to_timm(tmp_path, images):
    vit = tiny_vit()
    save_timm_folder(vit, tmp_path / "vit")
    loaded = load_model(f"local-dir:{tmp_path / 'vit'}", pretrained=True).eval()
    assert weights_sha256(loaded) == weights_sha256(vit) and torch.equal(loaded(images), vit(images))
    fresh = load_model(f"local-dir:{tmp_path / 'vit'}", pretrained=False, init_seed=1)  # the architecture alone
    assert fresh.state_dict().keys() == vit.state_dict().keys() and weights_sha256(fresh) != weights_sha256(vit)
    with pytest.raises(MissingFileError, match="has no config.json.*save_for_hf"):
        load_model(f"local-dir:{tmp_path}", pretrained=True)


def test_hf_hub_names_load_from_the_offline_hub_cache(no_hub, images):
    vit = tiny_vit()
    snapshot = no_hub / "models--featcache-test--tiny-vit" / "snapshots" / ("0" * 40)
    save_timm_folder(vit, snapshot)  # the layout huggingface_hub leaves after a download
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text("0" * 40)
    loaded = load_model("hf-hub:featcache-test/tiny-vit", pretrained=True).eval()
    assert torch.equal(loaded(images), vit(images))


@pytest.mark.parametrize("name", ["deit_tiny", "hf-hub:featcache-test/absent"])
def test_pretrained_without_a_network_fails_fast_naming_the_ways_out(no_hub, name):
    import time

    start = time.perf_counter()
    with pytest.raises(FeatcacheError) as err:
        load_model(name, pretrained=True, img_size=32, depth=1)
    assert time.perf_counter() - start < 10  # v0.1: ~50 s of retries, then the hub's message
    message = str(err.value)
    for hint in ("--checkpoint PATH", "--no-pretrained", "hub cache", "HF_HUB_OFFLINE", "unreachable"):
        assert hint in message, (hint, message)
    assert isinstance(err.value, FileNotFoundError)


def test_an_offline_environment_is_named(no_hub, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FeatcacheError, match="HF_HUB_OFFLINE is set.*--no-pretrained"):
        load_model("deit_tiny", pretrained=True, img_size=32, depth=1)
