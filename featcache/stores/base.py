"""The store protocol every backend (zarr, wds, hdf5) implements, and the cache manifest.

A cache holds, for every stored view (one *row*), a set of named target arrays and a set of per-view
records. Rows are ordered ``row = sample_position * views + view`` and grouped into *units* of
``shard_size`` consecutive rows: a unit is what one writer writes in one go (one Zarr shard, one tar
shard, one HDF5 chunk range) and what resume counts. A unit is marked complete only after its data
is durable, so a killed extraction never leaves a cache that claims data it does not have.

Target arrays (names are the API, shared by all backends):
    ``block_{i}``  teacher block ``i`` output, pre final norm, prefix tokens kept: [rows, tokens, dim]
    ``logits``     teacher logits: [rows, classes] (or ``logits__topk_values``/``logits__topk_indices``)

Per-view records (small, read whole):
    ``sample`` (int64), ``view`` (int32), ``label`` (int64), ``seed`` (int64),
    ``params`` (float64 [rows, P], column names in ``manifest["views"]["param_names"]``),
    ``fingerprint`` (uint32, CRC-32 of the replayed uint8 view), ``valid`` (uint8, 0 for skipped images).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import ClassVar, Iterator, Mapping, Protocol, runtime_checkable

import numpy as np

from ..errors import CacheError
from ..manifest import Manifest
from ..registry import Registry

@runtime_checkable
class StoreWriter(Protocol):
    """Writes one cache. One writer per unit: processes may share a cache only on disjoint units."""

    def completed_units(self) -> set[int]:
        """Units already durable on disk (resume skips them)."""

    def write_unit(self, unit: int, targets: Mapping[str, np.ndarray], records: Mapping[str, np.ndarray],
                   skipped: list[str] | None = None) -> None:
        """Write all rows of ``unit`` (arrays shaped [len(unit_rows), ...]) durably, then mark it complete."""

    def finalize(self) -> Manifest:
        """Check every unit is complete, fold per-unit notes (skipped files) into the manifest, mark it complete."""


@runtime_checkable
class StoreReader(Protocol):
    """Reads one cache. Must be picklable and open files lazily, so DataLoader workers each open their own."""

    manifest: Manifest
    random_access: ClassVar[bool]

    def __len__(self) -> int:
        """Number of rows (stored views)."""

    def records(self) -> dict[str, np.ndarray]:
        """All per-view records, each an array over rows (small: read once)."""

    def read_row(self, row: int, names: list[str] | None = None) -> dict[str, np.ndarray]:
        """Decoded targets of one row (lossy codecs and top-k decoded to dense float arrays)."""

    def iter_rows(self, rows: list[int] | None = None, names: list[str] | None = None
                  ) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
        """Stream ``(row, targets)``; the fast path for streaming backends."""


WRITERS: Registry[type] = Registry("store format")
READERS: Registry[type] = Registry("store format")


def detect_format(path: str | os.PathLike) -> str:
    """Guess a cache's backend from what lies on disk."""
    path = Path(path)
    if (path / "zarr.json").is_file():
        return "zarr"
    if (path / "manifest.json").is_file() and any(path.glob("*.tar")):
        return "wds"
    if path.is_file() and path.suffix in (".h5", ".hdf5") or (path / "manifest.json").is_file() and any(
            path.glob("*.h5")):
        return "hdf5"
    if (path / "manifest.json").is_file():
        return str(json.loads((path / "manifest.json").read_text())["storage"]["format"])
    raise CacheError(f"no featcache cache at {str(path)!r}: expected a Zarr group, tar shards or HDF5 files "
                     "(create one with `featcache extract --out PATH`)")


def _import_backends() -> None:
    # Backends register themselves on import; importing here keeps `open_reader` the one entry point.
    from . import hdf5_store, wds_store, zarr_store  # noqa: F401


def open_reader(path: str | os.PathLike, format: str | None = None, require_complete: bool = True) -> StoreReader:
    """Open a cache for reading, whatever its backend."""
    _import_backends()
    fmt = format or detect_format(path)
    reader = READERS.get(fmt)(str(path))
    if require_complete and not reader.manifest.complete:
        raise CacheError(f"cache {str(path)!r} is incomplete; re-run the same `featcache extract` command to finish it")
    return reader


def create_writer(path: str | os.PathLike, manifest: Manifest, format: str = "zarr", overwrite: bool = False
                  ) -> StoreWriter:
    """Create (or reopen, for resume) a cache for writing.

    Raises:
        CacheError: if a cache already exists at ``path`` whose identity differs from ``manifest``
            (the message names the differing keys; ``overwrite=True`` starts afresh).
    """
    _import_backends()
    return WRITERS.get(format)(str(path), manifest, overwrite=overwrite)
