"""Target encodings: one registered class per kind, the --codec string, lossy codecs within their stated bounds,
top-k logits, and bytes identical to those the pre-registry code wrote."""
from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch

from featcache.errors import CacheError, ConfigError
from featcache.stores import codecs as C
from featcache.stores import encodings as E
from featcache.testing.toystore import toy_manifest, toy_targets


def _vit_like(seed: int = 0, n: int = 6, tokens: int = 17, dim: int = 64) -> np.ndarray:
    """Features with a few outlier channels (x40), as ViT blocks have."""
    x = np.random.default_rng(seed).standard_normal((n, tokens, dim)).astype(np.float32)
    x[..., [3, 17]] *= 40.0
    return x


def test_parse_codec_forms():
    assert E.parse_codec("none") == {"lossy": None, "compressor": {"name": "none"}}
    assert E.parse_codec("zstd:7")["compressor"] == {"name": "zstd", "level": 7}
    assert E.parse_codec("blosc-zstd:bitshuffle")["compressor"] == {"name": "blosc", "cname": "zstd", "clevel": 5,
                                                                    "shuffle": "bitshuffle"}
    assert E.parse_codec("bitround:8") == {"lossy": {"name": "bitround", "keepbits": 8},
                                           "compressor": {"name": "zstd", "level": 3}}
    assert E.parse_codec("int8+blosc-zstd:3:shuffle")["lossy"] == {"name": "int8"}
    for bad in ("lz4", "zstd:fast", "bitround", "int8+bitround:3", "zstd+zstd", "blosc-zstd:5:twist"):
        with pytest.raises(ValueError, match="codec"):
            E.parse_codec(bad)
    with pytest.raises(ConfigError, match="bitround:N or int8"):  # the lossy forms come from the registry
        E.parse_codec("int8+bitround:3")


def test_registry_one_class_per_kind():
    assert E.ENCODINGS.names() == ["bitround", "float", "int8", "pca", "topk"]
    flags = {n: (E.ENCODINGS.get(n).lossy, E.ENCODINGS.get(n).elementwise) for n in E.ENCODINGS}
    assert flags == {"float": (False, True), "bitround": (True, True), "int8": (True, True), "pca": (True, True),
                     "topk": (True, False)}
    assert E.lossy_usage() == "bitround:N or int8 or pca:S"
    assert [n for n in E.ENCODINGS if E.ENCODINGS.get(n).fitted] == ["pca"]
    for name in E.ENCODINGS:
        assert E.ENCODINGS.get(name).name == name  # named once, by registration


# One storage setting per registered kind, applied to a block target and to the logits.
KIND_SETTINGS = {"float": {"dtype": "bf16", "codec": "none"}, "bitround": {"dtype": "fp16", "codec": "bitround:6"},
                 "int8": {"dtype": "fp32", "codec": "int8"}, "topk": {"dtype": "fp16", "codec": "none", "topk": 4},
                 "pca": {"dtype": "fp16", "codec": "pca:0.2"}}


@pytest.mark.parametrize("kind", E.ENCODINGS.names())
def test_every_registered_encoding_round_trips(kind):
    storage = KIND_SETTINGS[kind]
    name, x = ("logits", np.random.default_rng(1).standard_normal((4, 12)).astype(np.float32) * 3) if kind == "topk" \
        else ("block_1", _vit_like(1, n=4))
    spec = E.target_encoding(name, storage)
    assert spec["kind"] == kind
    if E.ENCODINGS.get(kind).fitted:  # the codebook comes from the data, here the values themselves
        spec = E.fit_targets({name: {"shape": list(x.shape[1:]), "encoding": spec}}, {name: x})[name]["encoding"]
    enc = E.encoding(spec)
    assert isinstance(enc, E.ENCODINGS.get(kind))
    stored = enc.encode(name, x)
    arrays = enc.arrays(name, list(x.shape[1:]))
    assert {k: (v.dtype.name, list(v.shape[1:])) for k, v in stored.items()} == {
        k: (s["dtype"], s["shape"]) for k, s in arrays.items()}
    decoded = enc.decode(name, stored, x.shape[1:])
    assert decoded.dtype == np.float32 and decoded.shape == x.shape
    if enc.elementwise:
        assert (np.abs(decoded.astype(np.float64) - x) <= enc.bound(x)).all()
        assert enc.stored_error(name, stored) is None
    else:
        with pytest.raises(ConfigError, match="no element-wise error bound"):
            enc.bound(x)
        assert 0 < enc.stored_error(name, stored)["leftover_mean"] < 1
        np.testing.assert_array_equal(enc.reference(name, x, x.shape[1:]), decoded)


def test_unknown_kind_names_the_known_ones():
    with pytest.raises(CacheError, match="newer featcache"):
        E.encoding({"kind": "fp4"})


def _golden_inputs() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(123)
    x = rng.standard_normal((3, 5, 16)).astype(np.float32)
    x[..., [1, 7]] *= 40
    x[0, 0, :3] = [1e-6, 0.0, -3e-7]
    return {"block_3": x, "logits": (rng.standard_normal((3, 40)) * 3).astype(np.float32)}


# sha256 prefixes of (stored arrays, manifest targets + arrays sections) per "dtype|codec|topk", computed with the
# if/elif codecs module this registry replaced: every setting must keep writing the same bytes and the same manifest.
GOLDEN = {
    "fp32|none|None": ("98628db9ccc976aa", "ca5e48a57b63a995"),
    "fp32|none|5": ("a4564fb2728f6747", "8c267050228aa429"),
    "fp32|zstd:5|None": ("98628db9ccc976aa", "01d956e394157200"),
    "fp32|zstd:5|5": ("a4564fb2728f6747", "48822166501f9167"),
    "fp32|int8|None": ("ef9d4c502c38dbc8", "3b5d183fb5a1525f"),
    "fp32|int8|5": ("94f51c142a1d2b52", "7e41849d44c698d8"),
    "fp32|int8+blosc-zstd:3:bitshuffle|None": ("ef9d4c502c38dbc8", "ab5560751bc14b24"),
    "fp32|int8+blosc-zstd:3:bitshuffle|5": ("94f51c142a1d2b52", "42d1271bcfcbc38b"),
    "fp16|none|None": ("e55fae106db945ee", "f275bc53bda579ac"),
    "fp16|none|5": ("8d6b945dc0b79056", "e931db37f19378dd"),
    "fp16|zstd:5|None": ("e55fae106db945ee", "4d57b06baaa98c6e"),
    "fp16|zstd:5|5": ("8d6b945dc0b79056", "8f363ecc54086f3c"),
    "fp16|int8|None": ("f08d7ed23e0c9f82", "a1e4dc1822a1edd0"),
    "fp16|int8|5": ("c9dfff81b0ae9797", "04c759241bd24b20"),
    "fp16|int8+blosc-zstd:3:bitshuffle|None": ("f08d7ed23e0c9f82", "5f00eebcd491f8c2"),
    "fp16|int8+blosc-zstd:3:bitshuffle|5": ("c9dfff81b0ae9797", "3ea94d1612d69c74"),
    "bf16|none|None": ("fb7b969a47d4cb96", "b7e0afe65dfe757c"),
    "bf16|none|5": ("c6c4d0d96c95f3b5", "7b379fcc5192d74b"),
    "bf16|zstd:5|None": ("fb7b969a47d4cb96", "2606cd583830cd4d"),
    "bf16|zstd:5|5": ("c6c4d0d96c95f3b5", "810df246e34e8319"),
    "bf16|int8|None": ("a976dfc3cda2eb77", "e4d66f08c4d9a512"),
    "bf16|int8|5": ("1fdaeafebf68dac8", "486b1ca23dd51fdf"),
    "bf16|int8+blosc-zstd:3:bitshuffle|None": ("a976dfc3cda2eb77", "21091b5c1b1bd034"),
    "bf16|int8+blosc-zstd:3:bitshuffle|5": ("1fdaeafebf68dac8", "87f5d8f41cc40666"),
    "fp16|bitround:7|None": ("abf3ff2e34388372", "ac7f6ea8fb8f2c69"),
    "fp32|bitround:12+zstd:1|5": ("8334bbc05e818711", "4be6a27b0492e298"),
    "fp16|bitround:10|5": ("8d6b945dc0b79056", "08373a95420d5fb9"),
}


@pytest.mark.parametrize("setting", sorted(GOLDEN))
def test_bytes_and_manifest_match_the_pre_registry_code(setting):
    dtype, codec, topk = setting.split("|")
    storage = {"dtype": dtype, "codec": codec, "topk": None if topk == "None" else int(topk)}
    inputs = _golden_inputs()
    stored = E.encode_targets(inputs, storage)
    h = hashlib.sha256()
    for n in sorted(stored):
        h.update(n.encode())
        h.update(stored[n].dtype.str.encode())
        h.update(str(stored[n].shape).encode())
        h.update(stored[n].tobytes())
    shapes = {k: v.shape[1:] for k, v in inputs.items()}
    sections = json.dumps({"t": E.targets_section(shapes, storage), "a": E.array_specs(shapes, storage)})
    assert (h.hexdigest()[:16], hashlib.sha256(sections.encode()).hexdigest()[:16]) == GOLDEN[setting]


def _round_trip(x: np.ndarray, storage: dict, name: str = "block_0"):
    shapes = {name: x.shape[1:]}
    m = {"targets": E.targets_section(shapes, storage), "arrays": E.array_specs(shapes, storage)}
    stored = E.encode_targets({name: x}, storage)
    assert {k: (v.dtype.name, list(v.shape[1:])) for k, v in stored.items()} == {
        k: (s["dtype"], s["shape"]) for k, s in m["arrays"].items()}
    return E.decode_targets(stored, m)[name], m["targets"][name]["encoding"]


@pytest.mark.parametrize("dtype,keepbits", [("fp16", 4), ("fp16", 7), ("fp16", 10), ("fp32", 6), ("fp32", 12)])
def test_bitround_within_stated_bound(dtype, keepbits):
    x = _vit_like(1)
    x[0, 0, :4] = [1e-6, -3e-5, 0.0, 7e-8]  # fp16 subnormals and zero
    out, enc = _round_trip(x, {"dtype": dtype, "codec": f"bitround:{keepbits}"})
    assert enc["kind"] == "bitround" and enc["keepbits"] == keepbits
    assert (np.abs(out.astype(np.float64) - x) <= E.error_bound(enc, x)).all()
    err = E.measure_error(x, out)
    assert 0 < err["rel_l2"] <= 2.0 ** -(keepbits + 1) + (2.0 ** -11 if dtype == "fp16" else 0)
    if keepbits < 10:  # fewer kept bits compress better once zstd sees the zeroed mantissas
        plain = C.numcodecs_compressor({"name": "zstd", "level": 3})
        stored = E.encode_targets({"block_0": x}, {"dtype": dtype, "codec": f"bitround:{keepbits}"})["block_0"]
        assert len(plain.encode(stored.tobytes())) < len(plain.encode(x.astype(stored.dtype).tobytes()))


def test_bitround_refuses_bf16_and_too_many_bits():
    with pytest.raises(ValueError, match="fp32 or fp16"):
        E.target_encoding("block_0", {"dtype": "bf16", "codec": "bitround:5"})
    with pytest.raises(ValueError, match="1..10"):
        E.target_encoding("block_0", {"dtype": "fp16", "codec": "bitround:11"})


def test_int8_per_channel_within_stated_bound_and_beats_per_token():
    x = _vit_like(2)
    out, enc = _round_trip(x, {"dtype": "fp16", "codec": "int8"})
    assert enc["kind"] == "int8"
    absmax = np.abs(x).max(axis=1, keepdims=True)  # per view and channel
    assert (np.abs(out - x) <= absmax / 254 * (1 + 1e-6)).all()
    assert (np.abs(out - x) <= E.error_bound(enc, x)).all()
    normal = np.setdiff1d(np.arange(x.shape[-1]), [3, 17])
    per_channel = E.measure_error(x[..., normal], out[..., normal])["rel_l2"]
    tok_scale = np.abs(x).max(axis=-1, keepdims=True) / 127  # the rejected alternative: one scale per token
    per_token = np.clip(np.rint(x / tok_scale), -127, 127) * tok_scale
    assert per_channel < 0.01 < E.measure_error(x[..., normal], per_token[..., normal])["rel_l2"]


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
    stored = E.encode_targets({"logits": logits}, storage)
    np.testing.assert_array_equal(stored["logits__topk_indices"], top)
    assert stored["logits__topk_indices"].dtype == np.int16
    values = E.decode_target("logits__topk_values", {"logits__topk_values": stored["logits__topk_values"]},
                             {"encoding": {"kind": "float", "dtype": dtype}})
    p_top, leftover = E.topk_probs(values, stored["logits__topk_indices"])
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


def test_manifest_arrays_match_encoded_arrays():
    for codec, topk in [("none", None), ("int8+zstd", 3), ("bitround:5", 7)]:
        m = toy_manifest("zarr", codec=codec, topk=topk)
        stored = E.encode_targets(toy_targets(m), m["storage"])
        assert sorted(stored) == sorted(m["arrays"]) == sorted(E.stored_names(m))
        assert E.stored_names(m, ["logits"]) == [n for n in m["arrays"] if n.startswith("logits")]


# ---------------------------------------------------------------------------------------------- pca (transform coding)

def _features(seed: int = 0, n: int = 48, tokens: int = 17, dim: int = 64, rank: int = 12) -> np.ndarray:
    """Low-rank tokens + noise, a per-position offset and two outlier channels: the structure of ViT blocks."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, tokens, rank)).astype(np.float32) @ rng.standard_normal((rank, dim)).astype(np.float32)
    x += 0.1 * rng.standard_normal((n, tokens, dim)).astype(np.float32) + rng.standard_normal((tokens, dim))
    x[..., [3, 17]] *= 40.0
    return x.astype(np.float32)


def _pca(x_fit: np.ndarray, step: float, codec: str | None = None) -> E.Encoding:
    spec = E.target_encoding("block_0", {"dtype": "fp16", "codec": codec or f"pca:{step}"})
    section = E.fit_targets({"block_0": {"shape": list(x_fit.shape[1:]), "encoding": spec}}, {"block_0": x_fit})
    return E.encoding(section["block_0"]["encoding"])


def test_pca_parse_and_default_compressor():
    assert E.parse_codec("pca:0.3") == {"lossy": {"name": "pca", "step": 0.3},
                                        "compressor": {"name": "blosc", "cname": "zstd", "clevel": 5,
                                                       "shuffle": "bitshuffle"}}
    assert E.parse_codec("pca:0.5+zstd:9")["compressor"] == {"name": "zstd", "level": 9}
    for bad in ("pca", "pca:0", "pca:-1", "pca:x", "pca:5", "pca:0.3:2", "pca:0.3+int8"):
        with pytest.raises(ConfigError, match="codec"):
            E.parse_codec(bad)
    assert E.target_encoding("logits", {"dtype": "fp16", "codec": "pca:0.3"}) == {"kind": "float", "dtype": "fp16"}


@pytest.mark.parametrize("step", [0.05, 0.2, 0.5, 1.0])
def test_pca_within_stated_bound_and_error_follows_the_step(step):
    x = _features(1)
    enc = _pca(x[:32], step)
    held_out = x[32:]  # views the codebook was not fitted on
    stored = enc.encode("block_0", held_out)
    assert {k: (v.dtype.name, v.shape[1:]) for k, v in stored.items()} == {"block_0": ("uint8", (18, 64))}
    out = enc.decode("block_0", stored, (17, 64))
    assert out.dtype == np.float32 and out.shape == held_out.shape
    assert (np.abs(out.astype(np.float64) - held_out) <= enc.bound(held_out)).all()
    rel = E.measure_error(held_out, out)["rel_l2"]
    assert 0 < rel <= step / np.sqrt(12) * 1.05 and rel <= enc.spec["verify_rtol"]


def test_pca_outlier_view_raises_its_step_instead_of_clipping():
    x = _features(2)
    enc = _pca(x[:32], 0.5)
    odd = x[32:34].copy()
    odd[0, 5] *= 300.0  # far beyond anything in the fit sample
    stored = enc.encode("block_0", odd)
    exponents = stored["block_0"][:, -1]  # the last stored row
    assert exponents[0].max() >= 5 and exponents[1].max() == 0
    out = enc.decode("block_0", stored, (17, 64))
    assert (np.abs(out.astype(np.float64) - odd) <= enc.bound(odd)).all()
    assert E.measure_error(odd[0, 5], out[0, 5])["rel_l2"] < 0.01  # the outlier token itself survives


def test_pca_compresses_where_the_variance_is():
    x = _features(3)
    comp = C.numcodecs_compressor(E.parse_codec("pca:0.3")["compressor"], itemsize=1)
    fp16 = x[0].size * 2
    sizes, errors = [], []
    for step in (0.1, 0.3, 1.0):
        enc = _pca(x[:32], step)
        stored = enc.encode("block_0", x[32:])
        sizes.append(np.mean([len(comp.encode(view.tobytes())) for view in stored["block_0"]]) / fp16)
        errors.append(E.measure_error(x[32:], enc.decode("block_0", stored, (17, 64)))["rel_l2"])
    assert sizes[0] > sizes[1] > sizes[2] and errors[0] < errors[1] < errors[2]
    assert sizes[1] <= 0.125  # rank 12 of 64: most components sit below the step and cost almost nothing


def test_pca_codebook_lives_in_the_manifest_json():
    x = _features(4)
    enc = _pca(x[:32], 0.3)
    spec = json.loads(json.dumps(enc.spec))  # the manifest is plain JSON
    assert spec["fit_rows"] == 32 and spec["mean"]["shape"] == [17, 64] and spec["basis"]["shape"] == [64, 64]
    again = E.encoding(spec)
    stored = enc.encode("block_0", x[32:])
    np.testing.assert_array_equal(again.decode("block_0", stored, (17, 64)), enc.decode("block_0", stored, (17, 64)))
    one_row = again.decode("block_0", {k: v[3] for k, v in stored.items()}, (17, 64))
    np.testing.assert_allclose(one_row, enc.decode("block_0", stored, (17, 64))[3], rtol=1e-6, atol=1e-5)
    basis = again.basis.astype(np.float64)
    assert np.abs(basis.T @ basis - np.eye(64)).max() < 2e-3  # orthonormal up to its fp16 rounding
    assert _pca(x[:32], 0.3).spec == enc.spec  # deterministic fit
    damaged = dict(spec, basis=dict(spec["basis"], shape=[64, 63]))
    with pytest.raises(CacheError, match="damaged"):
        E.encoding(damaged)


def test_pca_unfitted_refuses_to_encode():
    spec = E.target_encoding("block_0", {"dtype": "fp16", "codec": "pca:0.3"})
    assert E.unfitted({"block_0": {"shape": [17, 64], "encoding": spec}}) == ["block_0"]
    with pytest.raises(ConfigError, match="codebook fitted"):
        E.encoding(spec).encode("block_0", _features(5))


def test_fit_sample_rows_skip_invalid_and_spread():
    valid = np.ones(2000, dtype=np.uint8)
    valid[:10] = 0
    rows = E.fit_sample_rows(valid, rows=100)
    assert len(rows) == 100 and rows[0] == 10 and rows[-1] == 1999 and rows == sorted(set(rows))
    assert E.fit_sample_rows(valid[:50]) == list(range(10, 50))


@pytest.mark.parametrize("rank", [8, 150])  # few active components (pruned product) and nearly all of them
def test_pca_large_views_decode_in_torch_like_the_numpy_reference(rank):
    from featcache.stores.lossy import pca_decode

    x = _features(6, n=12, tokens=40, dim=160, rank=rank)
    enc = _pca(x, 0.3)
    stored = enc.encode("block_0", x)["block_0"]
    assert stored[0].size * stored.shape[-1] > E.SMALL_PRODUCT  # one view takes the torch path
    for view in stored[:3]:
        want = pca_decode(view[:-1], view[-1], enc.mean, enc.basis_t, enc.delta)
        got = enc.decode("block_0", {"block_0": view}, (40, 160))
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
