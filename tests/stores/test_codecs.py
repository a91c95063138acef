"""Codecs: precision, lossless compressors, lossy feature codecs within their stated bounds, top-k logits."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from featcache.stores import codecs as C
from featcache.testing.toystore import toy_manifest, toy_targets


def _vit_like(seed: int = 0, n: int = 6, tokens: int = 17, dim: int = 64) -> np.ndarray:
    """Features with a few outlier channels (x40), as ViT blocks have."""
    x = np.random.default_rng(seed).standard_normal((n, tokens, dim)).astype(np.float32)
    x[..., [3, 17]] *= 40.0
    return x


def test_parse_codec_forms():
    assert C.parse_codec("none") == {"lossy": None, "compressor": {"name": "none"}}
    assert C.parse_codec("zstd:7")["compressor"] == {"name": "zstd", "level": 7}
    assert C.parse_codec("blosc-zstd:bitshuffle")["compressor"] == {"name": "blosc", "cname": "zstd", "clevel": 5,
                                                                    "shuffle": "bitshuffle"}
    assert C.parse_codec("bitround:8") == {"lossy": {"name": "bitround", "keepbits": 8},
                                           "compressor": {"name": "zstd", "level": 3}}
    assert C.parse_codec("int8+blosc-zstd:3:shuffle")["lossy"] == {"name": "int8"}
    for bad in ("lz4", "zstd:fast", "bitround", "int8+bitround:3", "zstd+zstd", "blosc-zstd:5:twist"):
        with pytest.raises(ValueError, match="codec"):
            C.parse_codec(bad)


def test_bf16_matches_torch_rounding():
    x = _vit_like()
    ours = C.bf16_bits_to_float(C.float_to_bf16_bits(x))
    np.testing.assert_array_equal(ours, torch.from_numpy(x).bfloat16().float().numpy())


@pytest.mark.parametrize("spec", ["zstd:3", "blosc-zstd:5:shuffle", "blosc-zstd:1:bitshuffle", "blosc-zstd:noshuffle"])
def test_lossless_compressors_are_exact(spec):
    codec = C.numcodecs_compressor(C.parse_codec(spec)["compressor"])
    data = _vit_like().astype(np.float16).tobytes()
    assert bytes(codec.decode(codec.encode(data))) == data


def _round_trip(x: np.ndarray, storage: dict, name: str = "block_0"):
    shapes = {name: x.shape[1:]}
    m = {"targets": C.targets_section(shapes, storage), "arrays": C.array_specs(shapes, storage)}
    stored = C.encode_targets({name: x}, storage)
    assert {k: (v.dtype.name, list(v.shape[1:])) for k, v in stored.items()} == {
        k: (s["dtype"], s["shape"]) for k, s in m["arrays"].items()}
    return C.decode_targets(stored, m)[name], m["targets"][name]["encoding"]


@pytest.mark.parametrize("dtype,keepbits", [("fp16", 4), ("fp16", 7), ("fp16", 10), ("fp32", 6), ("fp32", 12)])
def test_bitround_within_stated_bound(dtype, keepbits):
    x = _vit_like(1)
    x[0, 0, :4] = [1e-6, -3e-5, 0.0, 7e-8]  # fp16 subnormals and zero
    out, enc = _round_trip(x, {"dtype": dtype, "codec": f"bitround:{keepbits}"})
    assert enc["kind"] == "bitround" and enc["keepbits"] == keepbits
    assert (np.abs(out.astype(np.float64) - x) <= C.error_bound(enc, x)).all()
    err = C.measure_error(x, out)
    assert 0 < err["rel_l2"] <= 2.0 ** -(keepbits + 1) + (2.0 ** -11 if dtype == "fp16" else 0)
    if keepbits < 10:  # fewer kept bits compress better once zstd sees the zeroed mantissas
        plain = C.numcodecs_compressor({"name": "zstd", "level": 3})
        stored = C.encode_targets({"block_0": x}, {"dtype": dtype, "codec": f"bitround:{keepbits}"})["block_0"]
        assert len(plain.encode(stored.tobytes())) < len(plain.encode(x.astype(stored.dtype).tobytes()))


def test_bitround_refuses_bf16_and_too_many_bits():
    with pytest.raises(ValueError, match="fp32 or fp16"):
        C.target_encoding("block_0", {"dtype": "bf16", "codec": "bitround:5"})
    with pytest.raises(ValueError, match="1..10"):
        C.target_encoding("block_0", {"dtype": "fp16", "codec": "bitround:11"})


def test_int8_per_channel_within_stated_bound_and_beats_per_token():
    x = _vit_like(2)
    out, enc = _round_trip(x, {"dtype": "fp16", "codec": "int8"})
    assert enc["kind"] == "int8"
    absmax = np.abs(x).max(axis=1, keepdims=True)  # per view and channel
    assert (np.abs(out - x) <= absmax / 254 * (1 + 1e-6)).all()
    assert (np.abs(out - x) <= C.error_bound(enc, x)).all()
    normal = np.setdiff1d(np.arange(x.shape[-1]), [3, 17])
    per_channel = C.measure_error(x[..., normal], out[..., normal])["rel_l2"]
    tok_scale = np.abs(x).max(axis=-1, keepdims=True) / 127  # the rejected alternative: one scale per token
    per_token = np.clip(np.rint(x / tok_scale), -127, 127) * tok_scale
    assert per_channel < 0.01 < C.measure_error(x[..., normal], per_token[..., normal])["rel_l2"]


def test_int8_zero_channel_and_logits_untouched():
    x = _vit_like(3)
    x[:, :, 5] = 0
    out, _ = _round_trip(x, {"dtype": "fp32", "codec": "int8"})
    assert (out[:, :, 5] == 0).all()
    logits = np.random.default_rng(0).standard_normal((4, 10)).astype(np.float32)
    out, enc = _round_trip(logits, {"dtype": "fp32", "codec": "int8"}, name="logits")
    assert enc == {"kind": "float", "dtype": "fp32"} and np.array_equal(out, logits)


@pytest.mark.parametrize("dtype,rtol", [("fp32", 1e-5), ("fp16", 2e-3), ("bf16", 1.6e-2)])
def test_topk_recovers_probabilities_and_leftover(dtype, rtol):
    k, classes = 5, 50
    logits = np.random.default_rng(4).standard_normal((8, classes)).astype(np.float32) * 3
    probs = torch.softmax(torch.from_numpy(logits).double(), -1).numpy()
    top = np.argsort(-probs, -1)[:, :k]
    want_top = np.take_along_axis(probs, top, -1)
    storage = {"dtype": dtype, "codec": "none", "topk": k}
    stored = C.encode_targets({"logits": logits}, storage)
    np.testing.assert_array_equal(stored["logits__topk_indices"], top)
    assert stored["logits__topk_indices"].dtype == np.int16
    values = C.decode_target("logits__topk_values", {"logits__topk_values": stored["logits__topk_values"]},
                             {"encoding": {"kind": "float", "dtype": dtype}})
    p_top, leftover = C.topk_probs(values, stored["logits__topk_indices"])
    np.testing.assert_allclose(p_top, want_top, rtol=rtol)
    np.testing.assert_allclose(leftover, 1 - want_top.sum(-1), atol=rtol)
    dense, enc = _round_trip(logits, storage, name="logits")
    assert enc["kind"] == "topk" and dense.shape == logits.shape
    soft = torch.softmax(torch.from_numpy(dense).double(), -1).numpy()
    np.testing.assert_allclose(np.take_along_axis(soft, top, -1), p_top, rtol=1e-5)
    rest = np.ones_like(soft, dtype=bool)
    np.put_along_axis(rest, top, False, -1)
    np.testing.assert_allclose(soft[rest].reshape(8, -1), np.repeat(leftover[:, None] / (classes - k), classes - k, 1),
                               rtol=1e-4)


def test_fp16_range_check():
    ok = {"block_0": np.full((2, 3), 1000.0, np.float32)}
    C.check_fp16_range(ok, "fp16")
    hot = {"block_11": np.array([[1.0, -40000.0]], np.float32)}
    with pytest.raises(ValueError, match=r"block_11.*--dtype bf16"):
        C.check_fp16_range(hot, "fp16")
    C.check_fp16_range(hot, "bf16")
    with pytest.raises(ValueError, match="non-finite"):
        C.check_fp16_range({"logits": np.array([np.inf], np.float32)}, "fp16")


def test_manifest_arrays_match_encoded_arrays():
    for codec, topk in [("none", None), ("int8+zstd", 3), ("bitround:5", 7)]:
        m = toy_manifest("zarr", codec=codec, topk=topk)
        stored = C.encode_targets(toy_targets(m), m["storage"])
        assert sorted(stored) == sorted(m["arrays"]) == sorted(C.stored_names(m))
        assert C.stored_names(m, ["logits"]) == [n for n in m["arrays"] if n.startswith("logits")]
