"""Encodings between logical targets (float32 tensors) and the arrays a backend stores.

Backends never see a codec: extraction calls :func:`encode_targets` and hands the resulting named arrays
to the writer; readers return stored arrays and :func:`decode_targets` turns them back into float32.
The manifest records both views:
    ``manifest["targets"][name]  = {"shape": [...per row], "encoding": {...}}``       (logical)
    ``manifest["arrays"][stored] = {"shape": [...per row], "dtype": "float16", "compressor": {...}}`` (stored)
A target may be stored as several arrays named ``<target>__<part>`` (e.g. ``block_0__scale``,
``logits__topk_indices``); ``__`` is the separator because it is legal in Zarr, HDF5 and tar member names
and never appears in a target name.

Float precision (``storage["dtype"]`` applies to every float array):
    ``fp32`` / ``fp16``: stored as that numpy dtype.
    ``bf16``: numpy has no bfloat16; stored as the raw upper 16 bits in ``uint16`` (round-to-nearest-even),
        which numpy/zarr/h5py all read, decoded by shifting back into float32.

Codecs (``storage["codec"]``, the ``--codec`` string; ``+`` joins a lossy and a lossless part):
    ``none``                                   stored as is.
    ``zstd[:level]``                           lossless Zstandard (default level 3).
    ``blosc-zstd[:level][:shuffle|bitshuffle|noshuffle]``  lossless Blosc(zstd) with byte/bit shuffle.
    ``bitround:N``                             lossy (block targets only): numcodecs BitRound keeps N mantissa
        bits, then zstd:3 unless a lossless part is given. Bound: ``|x' - x| <= 2**-(N+1) * |x|`` on top of
        the storage dtype's own rounding (absolute ``2**-(15+N)`` near zero for fp16, where values are
        subnormal). Needs ``fp32`` (N <= 23) or ``fp16`` (N <= 10): BitRound works on
        IEEE floats only and bf16 is stored as uint16 bits.
    ``int8``                                   lossy (block targets only): per-view, per-channel absmax
        quantisation; ``block_i`` int8 [rows, T, D] + ``block_i__scale`` float32 [rows, D] with
        ``scale = absmax_c / 127``. Bound: ``|x' - x| <= scale_c / 2 = absmax_c / 254`` per element.
        One scale per channel (not per token) because ViT features have outlier channels: a per-token
        scale is set by the outliers and crushes the normal channels.
Logits are never lossy-coded by ``--codec``; ``storage["topk"] = K`` stores only the top K as
``logits__topk_values`` (log-softmax values, storage dtype) + ``logits__topk_indices`` (int16/int32), see
:func:`topk_probs` and :func:`topk_dense`.
"""
from __future__ import annotations

import warnings
from typing import Any, Mapping

import numpy as np

FP16_MAX = 65504.0
FP16_HEADROOM = 2.0  # activations must stay below FP16_MAX / FP16_HEADROOM to be cached as fp16
DTYPES = ("fp32", "fp16", "bf16")
MANTISSA_BITS = {"fp32": 23, "fp16": 10}
SHUFFLES = ("shuffle", "bitshuffle", "noshuffle")
VERIFY_RTOL = {"fp32": 1e-4, "fp16": 2e-3, "bf16": 1e-2}  # relative L2 that `featcache verify` accepts per dtype


def float_to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit pattern (uint16), rounding to nearest even like torch does."""
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounding = ((bits >> 16) & 1) + np.uint32(0x7FFF)
    return ((bits + rounding) >> 16).astype(np.uint16)


def bf16_bits_to_float(bits: np.ndarray) -> np.ndarray:
    return (np.asarray(bits, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)


def storage_dtype(dtype: str) -> str:
    """numpy dtype name used on disk for a ``--dtype`` value."""
    try:
        return {"fp32": "float32", "fp16": "float16", "bf16": "uint16"}[dtype]
    except KeyError:
        raise ValueError(f"unknown --dtype {dtype!r}; choose one of {', '.join(DTYPES)}") from None


# ------------------------------------------------------------------------------------------------ codec specs

def _parse_lossless(part: str) -> dict[str, Any]:
    fields = part.split(":")
    name, args = fields[0], fields[1:]
    try:
        if name == "none" and not args:
            return {"name": "none"}
        if name == "zstd" and len(args) <= 1:
            return {"name": "zstd", "level": int(args[0]) if args else 3}
        if name == "blosc-zstd" and len(args) <= 2:
            level = next((int(a) for a in args if a.lstrip("-").isdigit()), 5)
            shuffle = next((a for a in args if not a.lstrip("-").isdigit()), "shuffle")
            if shuffle not in SHUFFLES:
                raise ValueError
            return {"name": "blosc", "cname": "zstd", "clevel": level, "shuffle": shuffle}
    except ValueError:
        pass
    raise ValueError(f"bad lossless codec {part!r}; use none, zstd[:level] or "
                     "blosc-zstd[:level][:shuffle|bitshuffle|noshuffle]")


def parse_codec(spec: str | None) -> dict[str, Any]:
    """``--codec`` string -> ``{"lossy": None | {"name": "bitround", "keepbits": N} | {"name": "int8"},
    "compressor": {...}}``.

    Raises:
        ValueError: naming the bad part and the accepted forms.
    """
    lossy, lossless = None, None
    for part in (spec or "none").lower().split("+"):
        if part.startswith("bitround") or part == "int8":
            if lossy is not None:
                raise ValueError(f"--codec {spec!r} has two lossy parts; use one of bitround:N or int8")
            lossy = _parse_lossy(part)
        elif lossless is None:
            lossless = _parse_lossless(part)
        else:
            raise ValueError(f"--codec {spec!r} has two lossless parts; join at most one lossy and one lossless part")
    if lossless is None:
        lossless = {"name": "zstd", "level": 3} if lossy and lossy["name"] == "bitround" else {"name": "none"}
    return {"lossy": lossy, "compressor": lossless}


def _parse_lossy(part: str) -> dict[str, Any]:
    if part == "int8":
        return {"name": "int8"}
    fields = part.split(":")
    if fields[0] != "bitround" or len(fields) != 2 or not fields[1].isdigit():
        raise ValueError(f"bad lossy codec {part!r}; use bitround:N (N kept mantissa bits) or int8")
    return {"name": "bitround", "keepbits": int(fields[1])}


def numcodecs_compressor(spec: Mapping[str, Any] | None, itemsize: int | None = None):
    """A numcodecs codec for a compressor spec (``None`` for ``{"name": "none"}``); used by the wds backend
    per tar member and usable by any backend that compresses bytes itself. ``itemsize``: the element size
    Blosc shuffles by (bytes otherwise count as 1-byte elements and shuffling does nothing)."""
    import numcodecs

    spec = dict(spec or {"name": "none"})
    if spec["name"] == "none":
        return None
    if spec["name"] == "zstd":
        return numcodecs.Zstd(level=int(spec.get("level", 3)))
    if spec["name"] == "blosc":
        shuffle = {"noshuffle": numcodecs.Blosc.NOSHUFFLE, "shuffle": numcodecs.Blosc.SHUFFLE,
                   "bitshuffle": numcodecs.Blosc.BITSHUFFLE}[spec.get("shuffle", "shuffle")]
        return numcodecs.Blosc(cname=spec.get("cname", "zstd"), clevel=int(spec.get("clevel", 5)), shuffle=shuffle,
                               typesize=itemsize)
    raise ValueError(f"unknown compressor {spec!r}; expected none, zstd or blosc")


# ------------------------------------------------------------------------------------------------ manifest

def _is_block(name: str) -> bool:
    return name.startswith("block_")


def target_encoding(name: str, storage: Mapping[str, Any]) -> dict[str, Any]:
    """The encoding recorded for target ``name`` under the storage settings.

    Raises:
        ValueError: for settings that cannot apply (bitround on bf16, too many kept bits, bad codec).
    """
    dtype = storage["dtype"]
    storage_dtype(dtype)
    codec = parse_codec(storage.get("codec"))
    lossy = codec["lossy"]
    if name == "logits" and storage.get("topk"):
        return {"kind": "topk", "dtype": dtype, "k": int(storage["topk"]), "values": "log_softmax"}
    if not _is_block(name) or lossy is None:
        return {"kind": "float", "dtype": dtype}
    if lossy["name"] == "int8":
        return {"kind": "int8", "scale": "absmax_per_channel", "bound": "abs <= scale/2 = absmax_c/254",
                "verify_rtol": 0.03}
    if dtype not in MANTISSA_BITS:
        raise ValueError(f"--codec bitround needs --dtype fp32 or fp16 (numcodecs BitRound rounds IEEE floats; "
                         f"bf16 is stored as uint16 bits), got --dtype {dtype}")
    if not 0 < lossy["keepbits"] <= MANTISSA_BITS[dtype]:
        raise ValueError(f"bitround:{lossy['keepbits']} must keep 1..{MANTISSA_BITS[dtype]} mantissa bits for {dtype}")
    n = lossy["keepbits"]
    return {"kind": "bitround", "dtype": dtype, "keepbits": n, "bound": f"rel <= 2**-{n + 1} (+ dtype rounding)",
            "verify_rtol": 2.0 ** -(n + 1) + VERIFY_RTOL[dtype]}


def _topk_index_dtype(classes: int) -> str:
    return "int16" if classes <= np.iinfo(np.int16).max else "int32"


def array_specs(targets: Mapping[str, tuple[int, ...]], storage: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Stored arrays (name -> shape per row, dtype, compressor) for logical targets of the given shapes."""
    compressor = parse_codec(storage.get("codec"))["compressor"]
    if storage.get("compressor") and compressor["name"] == "none":
        compressor = dict(storage["compressor"])  # legacy: an explicit compressor spec
    specs = {}
    for name, shape in targets.items():
        enc = target_encoding(name, storage)
        shape = [int(s) for s in shape]
        if enc["kind"] == "topk":
            k = min(enc["k"], shape[-1])
            specs[f"{name}__topk_values"] = {"shape": [k], "dtype": storage_dtype(enc["dtype"])}
            specs[f"{name}__topk_indices"] = {"shape": [k], "dtype": _topk_index_dtype(shape[-1])}
        elif enc["kind"] == "int8":
            specs[name] = {"shape": shape, "dtype": "int8"}
            specs[f"{name}__scale"] = {"shape": shape[-1:], "dtype": "float32"}
        else:
            specs[name] = {"shape": shape, "dtype": storage_dtype(enc["dtype"])}
    for spec in specs.values():
        spec["compressor"] = dict(compressor)
    return specs


def targets_section(targets: Mapping[str, tuple[int, ...]], storage: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """``manifest["targets"]`` for logical targets of the given per-row shapes."""
    return {name: {"shape": [int(s) for s in shape], "encoding": target_encoding(name, storage)}
            for name, shape in targets.items()}


def stored_names(manifest: Mapping[str, Any], names: list[str] | None = None) -> list[str]:
    """Which stored arrays must be read to decode the targets ``names``."""
    wanted = names or list(manifest["targets"])
    return [n for n in manifest["arrays"] if n.split("__")[0] in wanted]


# ------------------------------------------------------------------------------------------------ lossy codecs

def bitround(x: np.ndarray, keepbits: int) -> np.ndarray:
    """Round float mantissas to ``keepbits`` bits (numcodecs BitRound, round-to-nearest-even)."""
    from numcodecs import BitRound

    x = np.ascontiguousarray(x)
    return BitRound(keepbits).encode(x).view(x.dtype).reshape(x.shape)


def int8_encode(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """[n, T, D] float -> (int8 [n, T, D], float32 scale [n, D]) with one absmax scale per view and channel."""
    x = np.asarray(x, dtype=np.float32)
    scale = (np.abs(x).max(axis=-2) / 127.0).astype(np.float32)
    safe = np.where(scale > 0, scale, np.float32(1.0))
    q = np.clip(np.rint(x / safe[..., None, :]), -127, 127).astype(np.int8)
    return q, scale


def int8_decode(q: np.ndarray, scale: np.ndarray) -> np.ndarray:
    return np.asarray(q, dtype=np.float32) * np.asarray(scale, dtype=np.float32)[..., None, :]


def topk_encode(logits: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """[n, C] logits -> (log-softmax values [n, k] float32, class indices [n, k] int64), largest first."""
    logits = np.asarray(logits, dtype=np.float64)
    k = min(k, logits.shape[-1])
    idx = np.argsort(-logits, axis=-1, kind="stable")[..., :k]
    lse = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) + logits.max(-1, keepdims=True)
    return (np.take_along_axis(logits, idx, -1) - lse).astype(np.float32), idx


def topk_probs(values: np.ndarray, indices: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Top-k probabilities and the leftover probability mass (FKD): ``(exp(values), 1 - sum)``.

    Args:
        values: stored log-softmax values of the top-k classes [..., k].
        indices: their class indices (unused; accepted so callers can pass both stored arrays).
    """
    probs = np.exp(np.asarray(values, dtype=np.float64))
    leftover = np.clip(1.0 - probs.sum(-1), 0.0, 1.0)
    return probs.astype(np.float32), leftover.astype(np.float32)


def topk_dense(values: np.ndarray, indices: np.ndarray, classes: int) -> np.ndarray:
    """Dense [..., C] logits whose softmax (T=1) gives the stored top-k probabilities exactly and spreads the
    leftover mass uniformly over the other ``C - k`` classes (FKD's soft-label recovery).

    At temperatures other than 1 this is an approximation: the non-top-k logits are gone.
    """
    probs, leftover = topk_probs(values)
    k = probs.shape[-1]
    rest = classes - k
    fill = np.log(np.maximum(leftover.astype(np.float64) / max(rest, 1), 1e-30)) if rest else np.zeros_like(leftover)
    out = np.repeat(fill[..., None], classes, axis=-1)
    log_probs = np.log(np.maximum(probs.astype(np.float64), 1e-30))
    np.put_along_axis(out, np.asarray(indices, dtype=np.int64), log_probs, axis=-1)
    return out.astype(np.float32)


# ------------------------------------------------------------------------------------------------ encode/decode

def _to_dtype(x: np.ndarray, dtype: str) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return float_to_bf16_bits(x) if dtype == "bf16" else x.astype(storage_dtype(dtype))


def _from_dtype(x: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "bf16":
        return bf16_bits_to_float(x)
    if x.dtype == np.float16:
        return _half_to_float(x)
    return np.asarray(x, dtype=np.float32)


def _half_to_float(x: np.ndarray) -> np.ndarray:
    """float16 -> float32, bit-identical to numpy's cast but ~8x faster on CPU (421 vs 54 us for one
    deit3_small view's targets): this runs for every training item of an fp16 cache."""
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # read-only pread/mmap buffers: only read here
        return torch.from_numpy(np.ascontiguousarray(x)).float().numpy()


def encode_target(name: str, value: np.ndarray, enc: Mapping[str, Any], classes: int | None = None
                  ) -> dict[str, np.ndarray]:
    """One logical target [n, ...] -> its stored arrays, under encoding ``enc``."""
    kind = enc["kind"]
    if kind == "float":
        return {name: _to_dtype(value, enc["dtype"])}
    if kind == "bitround":
        return {name: bitround(_to_dtype(value, enc["dtype"]), enc["keepbits"])}
    if kind == "int8":
        q, scale = int8_encode(value)
        return {name: q, f"{name}__scale": scale}
    if kind == "topk":
        vals, idx = topk_encode(value, enc["k"])
        classes = classes or np.asarray(value).shape[-1]
        return {f"{name}__topk_values": _to_dtype(vals, enc["dtype"]),
                f"{name}__topk_indices": idx.astype(_topk_index_dtype(classes))}
    raise ValueError(f"unknown encoding {enc!r} for target {name!r}")


def encode_targets(targets: Mapping[str, np.ndarray], storage: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Logical float32 targets [n, ...] -> stored arrays [n, ...]."""
    out = {}
    for name, value in targets.items():
        out.update(encode_target(name, value, target_encoding(name, storage)))
    return out


def decode_target(name: str, stored: Mapping[str, np.ndarray], entry: Mapping[str, Any]) -> np.ndarray:
    """Stored arrays -> one logical float32 target; ``entry`` is ``manifest["targets"][name]``."""
    enc = entry["encoding"]
    kind = enc["kind"]
    if kind in ("float", "bitround"):
        return _from_dtype(stored[name], enc["dtype"])
    if kind == "int8":
        return int8_decode(stored[name], stored[f"{name}__scale"])
    if kind == "topk":
        values = _from_dtype(stored[f"{name}__topk_values"], enc["dtype"])
        return topk_dense(values, stored[f"{name}__topk_indices"], int(entry["shape"][-1]))
    raise ValueError(f"unknown encoding {enc!r} for target {name!r}; is this cache from a newer featcache?")


def verify_reference(name: str, fresh: np.ndarray, entry: Mapping[str, Any]) -> np.ndarray:
    """What a freshly recomputed target should decode to, for ``featcache verify``: the fresh value itself,
    except for top-k logits, whose dense decode keeps only the top-k (so compare with the fresh top-k decoded)."""
    enc = entry["encoding"]
    if enc["kind"] != "topk":
        return np.asarray(fresh, dtype=np.float32)
    return decode_target(name, encode_target(name, fresh, enc, int(entry["shape"][-1])), entry)


def decode_targets(stored: Mapping[str, np.ndarray], manifest: Mapping[str, Any],
                   names: list[str] | None = None) -> dict[str, np.ndarray]:
    """Stored arrays -> logical float32 targets (only ``names`` if given)."""
    return {name: decode_target(name, stored, manifest["targets"][name])
            for name in names or list(manifest["targets"])}


# ------------------------------------------------------------------------------------------------ checks

def check_fp16_range(arrays: Mapping[str, np.ndarray], dtype: str, headroom: float = FP16_HEADROOM) -> None:
    """Refuse to cache activations as fp16 unless they stay well inside its range.

    Called by extraction on every batch before encoding. Values must be finite and below
    ``FP16_MAX / headroom`` (32,752 by default), so that a later view with a larger outlier does not
    overflow to inf.

    Raises:
        ValueError: naming the array and its largest magnitude, suggesting ``--dtype bf16``.
    """
    if dtype != "fp16":
        return
    limit = FP16_MAX / headroom
    for name, value in arrays.items():
        value = np.asarray(value)
        if not np.isfinite(value).all():
            raise ValueError(f"teacher output {name!r} has non-finite values; cannot cache it (check the teacher)")
        peak = float(np.abs(value).max()) if value.size else 0.0
        if peak > limit:
            raise ValueError(f"teacher output {name!r} reaches |x| = {peak:.6g}, beyond fp16's safe range "
                             f"(|x| <= {limit:.0f}, max {FP16_MAX:.0f}); re-run with --dtype bf16 (same size, "
                             f"fp32 range) or --dtype fp32")


def error_bound(enc: Mapping[str, Any], reference: np.ndarray, stored: Mapping[str, np.ndarray] | None = None,
                name: str | None = None) -> np.ndarray:
    """The stated per-element absolute error bound of a lossy encoding for ``reference`` values."""
    ref = np.abs(np.asarray(reference, dtype=np.float64))
    if enc["kind"] == "int8":
        scale = np.abs(ref).max(axis=-2) / 127.0
        return scale[..., None, :] / 2 * (1 + 1e-6) + 1e-30
    dtype_err = {"fp32": 2.0 ** -24, "fp16": 2.0 ** -11, "bf16": 2.0 ** -8}[enc["dtype"]]
    # Near zero the error is absolute: half the spacing at the smallest normal exponent (subnormals share it).
    min_exp = -14 if enc["dtype"] == "fp16" else -126
    floor = 2.0 ** (min_exp - 11) if enc["dtype"] == "fp16" else 1e-38
    if enc["kind"] != "bitround":
        return ref * dtype_err + floor
    keep = enc["keepbits"]
    return ref * ((1 + dtype_err) * (1 + 2.0 ** -(keep + 1)) - 1) + floor + 2.0 ** (min_exp - keep - 1)


class ErrorMeter:
    """Relative L2 error ``||x' - x|| / ||x||`` and max absolute error per target, accumulated over batches of
    rows (``convert`` and ``verify`` measure whole caches this way; :func:`measure_error` one array)."""

    def __init__(self, names: list[str]):
        self.stats = {n: {"sq_err": 0.0, "sq_ref": 0.0, "max_abs": 0.0, "rows": 0} for n in names}

    def add(self, name: str, reference: np.ndarray, decoded: np.ndarray) -> None:
        ref = np.asarray(reference, dtype=np.float64)
        diff = np.asarray(decoded, dtype=np.float64) - ref
        s = self.stats[name]
        s["sq_err"] += float((diff ** 2).sum())
        s["sq_ref"] += float((ref ** 2).sum())
        s["max_abs"] = max(s["max_abs"], float(np.abs(diff).max()) if diff.size else 0.0)
        s["rows"] += len(ref)

    def report(self) -> dict[str, dict[str, float]]:
        # max(.., 1e-30): an error against an all-zero reference must still show, not read as 0.
        return {n: {"rel_l2": float(np.sqrt(s["sq_err"] / max(s["sq_ref"], 1e-30))),
                    "max_abs": s["max_abs"], "rows": s["rows"]} for n, s in self.stats.items()}


def measure_error(reference: np.ndarray, decoded: np.ndarray) -> dict[str, float]:
    """Relative L2 error ``||x' - x|| / ||x||`` and max absolute error of a decoded target."""
    meter = ErrorMeter(["x"])
    meter.add("x", reference, decoded)
    out = meter.report()["x"]
    return {"rel_l2": out["rel_l2"], "max_abs": out["max_abs"]}
