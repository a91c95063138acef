"""``featcache convert``: rewrite a cache into another backend and/or encoding, keeping manifest and records.

Targets whose encoding does not change are copied as stored arrays (no decode), so lossless data stays
byte-identical across zarr -> wds -> hdf5 -> zarr; only the compressor (transparent to readers) may change.
Targets whose encoding changes are decoded to float32 and re-encoded; the error of the new encoding against
the decoded source is measured on every row and recorded in ``manifest["targets"][name]
["measured_error"]`` (``featcache info`` reports it). Encodings with a fitted codebook (``pca``) are fitted first on
:data:`~featcache.stores.encodings.FIT_ROWS` views spread over the source. Conversion is resumable like extraction:
re-running the same command continues an interrupted destination (with the codebook its first run fitted).
"""
from __future__ import annotations

import os
from typing import Any, Mapping

import numpy as np
from tqdm import tqdm

from .errors import CacheError
from .manifest import Manifest
from .storage import same_location
from .stores import StoreReader, create_writer, open_reader
from .stores.encodings import (ErrorMeter, array_specs, decode_targets, encode_target, encoding, fit_sample_rows,
                               fit_targets, parse_codec, stored_names, target_encoding, unfitted)


def metered(spec: Mapping[str, Any]) -> bool:
    """Whether a re-encoded target gets its error measured: element-wise encodings only (top-k drops classes by
    design: its loss is the leftover mass, which ``topk_probs`` recovers, not an error on the logits)."""
    return encoding(spec).elementwise


def convert_manifest(src: Manifest, format: str, dtype: str | None = None, codec: str | None = None,
                     topk: int | None = None, shard_size: int | None = None) -> Manifest:
    """The destination manifest: the source's, with only ``storage``, ``targets`` and ``arrays`` rewritten."""
    m = src.copy()
    storage = dict(m["storage"], format=format)
    if dtype is not None:
        storage["dtype"] = dtype
    if codec is not None:
        storage["codec"] = codec
        if "compressor" in storage:  # the legacy explicit compressor must not override the new codec's
            storage["compressor"] = parse_codec(codec)["compressor"]
    if topk is not None:
        storage["topk"] = topk or None  # --topk 0 restores dense logits (from the decoded top-k)
    if shard_size is not None:
        storage["shard_size"] = int(shard_size)
    shapes = {name: tuple(t["shape"]) for name, t in m["targets"].items()}
    m["storage"] = storage
    m["targets"] = {name: {"shape": list(shapes[name]), "encoding": target_encoding(name, storage)} for name in shapes}
    for name, entry in m["targets"].items():  # an unchanged encoding keeps the error measured when it was made
        old = src["targets"][name]
        if _refits(old["encoding"], entry["encoding"]):  # same settings: keep the codebook (and copy the arrays)
            entry["encoding"] = old["encoding"]
        if old["encoding"] == entry["encoding"] and "measured_error" in old:
            entry["measured_error"] = old["measured_error"]
    m["arrays"] = array_specs(shapes, storage)
    m.pop("num_units", None)
    m["complete"], m["skipped"] = False, []
    return m


def _refits(old: Mapping[str, Any], new: Mapping[str, Any]) -> bool:
    """``new`` is the unfitted spec of a fitted ``old`` with the same settings (fitting adds keys, changes none)."""
    return encoding(new).fitted and all(old.get(k) == v for k, v in new.items()) and "fit_rows" in old


def fit_codebooks(reader: StoreReader, m: Manifest) -> Manifest:
    """``m`` with every unfitted codebook fitted on the source's views (decoded), spread over the cache."""
    names = unfitted(m["targets"])
    if not names:
        return m
    src = reader.manifest
    rows = fit_sample_rows(reader.records()["valid"])
    sample = decode_targets(_read_unit(reader, rows, stored_names(src, names)), src, names)
    out = m.copy()
    out["targets"] = fit_targets(m["targets"], sample)
    return out


def copied_targets(src: Manifest, dst: Manifest) -> list[str]:
    """Targets whose stored arrays can be copied unchanged (same encoding, same stored dtypes and shapes)."""
    def layout(m: Mapping[str, Any], name: str) -> list[tuple]:
        return [(n, m["arrays"][n]["shape"], m["arrays"][n]["dtype"]) for n in stored_names(m, [name])]

    return [name for name in dst["targets"] if src["targets"][name]["encoding"] == dst["targets"][name]["encoding"]
            and layout(src, name) == layout(dst, name)]


def _read_unit(reader: StoreReader, rows: range, names: list[str]) -> dict[str, np.ndarray]:
    got = [reader.read_stored_row(r, names) for r in rows]
    return {n: np.stack([g[n] for g in got]) for n in names}


def _unit_arrays(reader: StoreReader, src: Manifest, dst: Manifest, rows: range, copy: list[str],
                 meter: ErrorMeter) -> dict[str, np.ndarray]:
    out = _read_unit(reader, rows, stored_names(src, copy)) if copy else {}
    recode = [n for n in dst["targets"] if n not in copy]
    if recode:
        decoded = decode_targets(_read_unit(reader, rows, stored_names(src, recode)), src, recode)
        for name in recode:
            enc = dst["targets"][name]["encoding"]
            stored = encode_target(name, decoded[name], enc, classes=int(dst["targets"][name]["shape"][-1]))
            out.update(stored)
            if metered(enc):
                meter.add(name, decoded[name], decode_targets(stored, dst, [name])[name])
    return out


def convert(src: str | os.PathLike, dst: str | os.PathLike, format: str, dtype: str | None = None,
            codec: str | None = None, topk: int | None = None, shard_size: int | None = None,
            overwrite: bool = False, progress: bool = True, max_units: int | None = None) -> Manifest:
    """Rewrite cache ``src`` as ``dst`` in backend ``format`` (and optionally another dtype/codec/top-k).

    Args:
        max_units: stop after writing this many units in this call, unfinalized (tests simulate interruptions).

    Returns:
        The destination's final manifest (its current one when ``max_units`` stopped it early).

    Raises:
        CacheError: if ``src`` is incomplete, ``dst`` is ``src``, or ``dst`` holds a different cache.
    """
    if same_location(src, dst):
        raise CacheError(f"convert needs a new destination; {str(dst)!r} is the source cache")
    reader = open_reader(src)
    m_src = reader.manifest
    m_dst = fit_codebooks(reader, convert_manifest(m_src, format, dtype, codec, topk, shard_size))
    writer = create_writer(dst, m_dst, format=format, overwrite=overwrite)
    m_dst = writer.manifest  # on resume: the codebooks the units already written were encoded with
    copy = copied_targets(m_src, m_dst)
    meter = ErrorMeter([n for n in m_dst["targets"] if n not in copy and metered(m_dst["targets"][n]["encoding"])])
    records = reader.records()
    todo = sorted(set(range(m_dst.num_units)) - writer.completed_units())
    stopped = max_units is not None and len(todo) > max_units
    todo = todo[:max_units]
    for unit in tqdm(todo, desc=f"convert -> {format}", unit="unit", disable=not progress):
        rows = m_dst.unit_rows(unit)
        arrays = _unit_arrays(reader, m_src, m_dst, rows, copy, meter)
        recs = {k: v[rows.start:rows.stop] for k, v in records.items()}
        writer.write_unit(unit, arrays, recs, skipped=list(m_src.get("skipped", [])) if unit == 0 else [])
    if stopped:
        writer.close()
        return writer.manifest
    if todo:  # measured on the units written now (all of them, unless this run resumed an interrupted one)
        writer.record_measured_error({n: dict(e, reference="decoded source cache") for n, e in meter.report().items()})
    return writer.finalize()
