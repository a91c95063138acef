"""Toy caches for the store tests: a small manifest, random targets with outlier channels, records.

A plugin backend's tests can reuse them: register the backend, then loop over :data:`FORMATS` (read at import).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from featcache.manifest import Manifest
from featcache.stores import WRITERS, create_writer
from featcache.stores.encodings import array_specs, encode_targets, targets_section

FORMATS = WRITERS.names()


def toy_manifest(fmt: str = "zarr", dtype: str = "fp16", codec: str = "none", topk: int | None = None,
                 samples: int = 5, views: int = 3, shard_size: int = 4, tokens: int = 5, dim: int = 8,
                 classes: int = 20) -> Manifest:
    storage = {"format": fmt, "dtype": dtype, "shard_size": shard_size, "codec": codec, "topk": topk}
    shapes = {"block_0": (tokens, dim), "block_2": (tokens, dim), "logits": (classes,)}
    return Manifest({
        "format_version": 1, "teacher": {"name": "toy", "num_classes": classes}, "layers": [0, 2], "img_size": 32,
        "normalization": {"mean": [0.5] * 3, "std": [0.5] * 3, "interpolation": "bicubic"},
        "data": {"kind": "folder", "root": "/nowhere"}, "subset": {"shots": None},
        "views": {"count": views, "seed": 0, "param_names": ["top", "left", "flip"]},
        "storage": storage, "targets": targets_section(shapes, storage), "arrays": array_specs(shapes, storage),
        "num_samples": samples, "num_rows": samples * views, "complete": False, "skipped": [],
    })


def toy_targets(m: Manifest, seed: int = 0) -> dict[str, np.ndarray]:
    """float32 targets for every row; block features get a few outlier channels like real ViTs."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, entry in m["targets"].items():
        x = rng.standard_normal((m.num_rows, *entry["shape"])).astype(np.float32)
        if name.startswith("block_"):
            x[..., :2] *= 40.0
        else:
            x *= 3.0
        out[name] = x
    return out


def toy_records(m: Manifest) -> dict[str, np.ndarray]:
    rows = np.arange(m.num_rows)
    k = m.views_per_sample
    rng = np.random.default_rng(1)
    return {"sample": rows // k, "view": rows % k, "label": (rows // k) % 3, "seed": rows * 7919 + 11,
            "params": rng.random((m.num_rows, len(m["views"]["param_names"]))),
            "fingerprint": rng.integers(0, 2**32, m.num_rows, dtype=np.uint64).astype(np.uint32),
            "valid": np.ones(m.num_rows, dtype=np.uint8)}


def unit_slice(m: Manifest, arrays: dict[str, np.ndarray], unit: int) -> dict[str, np.ndarray]:
    rows = m.unit_rows(unit)
    return {k: v[rows.start:rows.stop] for k, v in arrays.items()}


def write_toy(path: str | Path, m: Manifest, targets: dict, records: dict, units: list[int] | None = None,
              finalize: bool = True):
    """Encode and write ``units`` (default all) through ``create_writer``; finalize if asked."""
    writer = create_writer(path, m, format=m["storage"]["format"])
    stored = encode_targets(targets, m["storage"])
    for u in range(m.num_units) if units is None else units:
        writer.write_unit(u, unit_slice(m, stored, u), unit_slice(m, records, u), skipped=[f"bad_{u}.png"])
    if finalize:
        writer.finalize()
    return writer


class RowDataset:
    """Map-style dataset over a reader, as training uses it: row -> decoded targets (for DataLoader tests)."""

    def __init__(self, reader):
        self.reader = reader

    def __len__(self) -> int:
        return len(self.reader)

    def __getitem__(self, row: int) -> dict[str, np.ndarray]:
        return {"row": row, **self.reader.read_row(row)}


def snapshot(root: str | Path) -> dict[str, tuple[bytes, int]]:
    """Bytes and mtime of every file under ``root`` (read-only checks)."""
    return {str(p): (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(Path(root).rglob("*")) if p.is_file()}
