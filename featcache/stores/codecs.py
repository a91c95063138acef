"""Encodings between logical targets (float32 tensors) and the arrays a backend stores.

Backends never see a codec: extraction calls :func:`encode_targets` and hands the resulting named arrays
to the writer; readers return stored arrays and :func:`decode_targets` turns them back into float32.
The manifest records both views:
    ``manifest["targets"][name]  = {"shape": [...per row], "encoding": {...}}``       (logical)
    ``manifest["arrays"][stored] = {"shape": [...per row], "dtype": "float16", "compressor": {...}}`` (stored)
A target may be stored as several arrays named ``<target>__<part>`` (e.g. ``block_0__scale``,
``logits__topk_indices``); ``__`` is the separator because it is legal in Zarr, HDF5 and tar member names
and never appears in a target name.

Encodings (``storage["dtype"]`` applies to every float target):
    ``fp32`` / ``fp16``: stored as that numpy dtype.
    ``bf16``: numpy has no bfloat16; stored as the raw upper 16 bits in ``uint16`` (round-to-nearest-even),
        which numpy/zarr/h5py all read, decoded by shifting back into float32.
"""
from __future__ import annotations

from typing import Any, Mapping

import numpy as np

FP16_MAX = 65504.0
DTYPES = ("fp32", "fp16", "bf16")


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


def target_encoding(name: str, storage: Mapping[str, Any]) -> dict[str, Any]:
    """The encoding recorded for target ``name`` under the storage settings."""
    return {"kind": "float", "dtype": storage["dtype"]}


def array_specs(targets: Mapping[str, tuple[int, ...]], storage: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Stored arrays (name -> shape per row, dtype, compressor) for logical targets of the given shapes."""
    specs = {}
    for name, shape in targets.items():
        specs[name] = {"shape": list(shape), "dtype": storage_dtype(storage["dtype"]),
                       "compressor": dict(storage.get("compressor") or {"name": "none"})}
    return specs


def encode_targets(targets: Mapping[str, np.ndarray], storage: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Logical float32 targets [n, ...] -> stored arrays [n, ...]."""
    out = {}
    for name, value in targets.items():
        value = np.asarray(value, dtype=np.float32)
        dtype = storage["dtype"]
        if dtype == "bf16":
            out[name] = float_to_bf16_bits(value)
        else:
            out[name] = value.astype(storage_dtype(dtype))
    return out


def decode_targets(stored: Mapping[str, np.ndarray], manifest: Mapping[str, Any],
                   names: list[str] | None = None) -> dict[str, np.ndarray]:
    """Stored arrays -> logical float32 targets (only ``names`` if given)."""
    out = {}
    for name in names or list(manifest["targets"]):
        enc = manifest["targets"][name]["encoding"]
        value = stored[name]
        out[name] = bf16_bits_to_float(value) if enc["dtype"] == "bf16" else np.asarray(value, dtype=np.float32)
    return out


def stored_names(manifest: Mapping[str, Any], names: list[str] | None = None) -> list[str]:
    """Which stored arrays must be read to decode the targets ``names``."""
    wanted = names or list(manifest["targets"])
    return [n for n in manifest["arrays"] if n.split("__")[0] in wanted]
