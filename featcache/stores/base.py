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

import copy
import json
import os
from pathlib import Path, PurePosixPath
from typing import Any, ClassVar, Iterator, Mapping, Protocol, runtime_checkable

import numpy as np

from ..registry import Registry

FORMAT_VERSION = 1

RECORD_DTYPES: dict[str, str] = {
    "sample": "int64",
    "view": "int32",
    "label": "int64",
    "seed": "int64",
    "params": "float64",
    "fingerprint": "uint32",
    "valid": "uint8",
}

# Keys of the manifest that define *what* is cached. Re-running extraction with a different value for
# any of them against an existing cache is refused, with the differing keys named.
IDENTITY_KEYS = ("teacher", "layers", "img_size", "normalization", "data", "subset", "views", "storage")


def block_name(index: int) -> str:
    """Name of the target array holding teacher block ``index``'s output."""
    return f"block_{index}"


class CacheError(RuntimeError):
    """A cache is missing, incomplete, corrupt or does not match what was asked of it."""


class Manifest(dict):
    """The cache's self-description: a JSON-serialisable dict with a few typed accessors.

    Kept as a plain dict so every backend stores it the same way (Zarr group attributes, a JSON file
    beside tar shards, an HDF5 attribute holding JSON) and so users can read it without featcache.

    Expected top-level keys (see docs/FORMAT.md for the full list):
        format_version, featcache_version, teacher{name, timm_name, pretrained_tag, checkpoint,
        weights_sha256, num_classes, embed_dim, num_blocks, num_prefix_tokens, patch_size, grid_size,
        final_norm{type, eps, weight, bias}}, versions{timm, torch, torchvision, ...}, layers[int],
        img_size, normalization{mean, std, interpolation}, data{kind, root, file_list_sha256, classes,
        num_files, sources[[relpath, label], ...]}, subset{shots, fraction, subset_seed},
        views{count, seed, recipe, param_names}, targets{name: {shape, encoding}} (logical),
        arrays{name: {shape, dtype, compressor}} (stored), storage{format, dtype, shard_size, codec, topk},
        num_samples, num_rows, complete, skipped[...].
    """

    @property
    def layers(self) -> list[int]:
        return list(self["layers"])

    @property
    def num_rows(self) -> int:
        return int(self["num_rows"])

    @property
    def views_per_sample(self) -> int:
        return int(self["views"]["count"])

    @property
    def shard_size(self) -> int:
        return int(self["storage"]["shard_size"])

    @property
    def num_units(self) -> int:
        return -(-self.num_rows // self.shard_size)

    @property
    def target_names(self) -> list[str]:
        return list(self["targets"])

    @property
    def complete(self) -> bool:
        return bool(self.get("complete", False))

    def unit_rows(self, unit: int) -> range:
        start = unit * self.shard_size
        return range(start, min(start + self.shard_size, self.num_rows))

    def to_json(self) -> str:
        return json.dumps(self, sort_keys=True, indent=1)

    @classmethod
    def from_json(cls, text: str) -> "Manifest":
        return cls(json.loads(text))

    def copy(self) -> "Manifest":
        return Manifest(copy.deepcopy(dict(self)))

    def identity(self) -> dict[str, Any]:
        """The keys that define what is cached. The data root is left out: the file-list hash already pins the
        images, and a dataset that moved (or is mounted elsewhere) is still the same dataset."""
        ident = {k: copy.deepcopy(self.get(k)) for k in IDENTITY_KEYS}
        if isinstance(ident.get("data"), dict):
            ident["data"].pop("root", None)
        return ident


def diff_keys(a: Mapping[str, Any], b: Mapping[str, Any], prefix: str = "") -> list[str]:
    """Dotted paths of the keys whose values differ between two nested mappings."""
    out: list[str] = []
    for key in sorted(set(a) | set(b)):
        path = f"{prefix}{key}"
        va, vb = a.get(key), b.get(key)
        if isinstance(va, Mapping) and isinstance(vb, Mapping):
            out += diff_keys(va, vb, prefix=path + ".")
        elif va != vb:
            out.append(path)
    return out


def safe_relpath(path: str) -> str:
    """Validate a relative path that came from a manifest or a shard; return it unchanged.

    Raises:
        CacheError: for absolute paths, ``..`` components, NUL bytes or backslashes.
    """
    p = PurePosixPath(path)
    if not path or "\x00" in path or "\\" in path or p.is_absolute() or ".." in p.parts:
        raise CacheError(f"unsafe path {path!r} in cache or shard: paths must be relative and stay inside the root")
    return path


def fsync_path(path: str | os.PathLike) -> None:
    """fsync a file, or a directory and every file below it, so a unit is durable before it is marked done."""
    path = Path(path)
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    dirs = {f.parent for f in files} | ({path} if path.is_dir() else set())
    for d in dirs:
        fd = os.open(d, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see either the old or the new file, never a torn one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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
