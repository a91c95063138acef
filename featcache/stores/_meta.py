"""Per-sample metadata as bulk ``.npy`` arrays, the same for every backend (FORMAT_VERSION 2).

A cache of a million images keeps its source list and its per-view records out of the manifest, in
``PATH/_featcache/meta/<name>.npy``: plain NumPy files (``allow_pickle=False``; strings as a UTF-8 blob + offsets),
each written atomically (temp + rename locally, one PUT on object storage) and read with one read per array. The
manifest lists each array with its SHA-256, dtype and shape (``data.items`` for the sources, sealed; ``records``
for the records, added when the cache is finalized), so the JSON stays a few kilobytes at any size.

Reading: an array read whole is checked against its SHA-256 before use (the sources, ``records.valid``). The other
record columns (params, seeds, fingerprints, ...: ~70 B per row, 1.4 GB at 20 M rows) are memory-mapped on local
disk, so a process pays only for the rows it touches; their header (dtype, shape) is checked on open and their
bytes against the units' CRC-32s by ``featcache verify`` (:func:`check_bulk_records`). On object storage every
array is fetched whole.
"""
from __future__ import annotations

import hashlib
import io
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np

from ..errors import CacheError
from ..manifest import FORMAT_VERSION, RECORD_DTYPES, Manifest
from ..sources.packed import pack_items, packed_file_list_sha256
from ..sources.base import SourceItem
from ..storage import ObjectPath, is_local, write_atomic
from ._units import OWN_DIR, unit_crc32

META_DIR = f"{OWN_DIR}/meta"
RECORD_PREFIX = "records."
VERIFIED_RECORDS = ("valid",)  # read whole and hashed on open; the other columns are mapped (module docstring)


def npy_bytes(array: np.ndarray) -> bytes:
    """The ``.npy`` file of ``array`` (no pickles: object arrays are refused)."""
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


def spec_of(data: bytes, array: np.ndarray) -> dict[str, Any]:
    return {"sha256": hashlib.sha256(data).hexdigest(), "dtype": array.dtype.str, "shape": list(array.shape)}


def encode_arrays(arrays: Mapping[str, np.ndarray]) -> tuple[dict[str, bytes], dict[str, dict[str, Any]]]:
    """The ``.npy`` bytes of each array and the specs the manifest records for them."""
    files = {name: npy_bytes(array) for name, array in arrays.items()}
    return files, {name: spec_of(files[name], np.asarray(arrays[name])) for name in arrays}


def write_files(root: Path | ObjectPath, files: Mapping[str, bytes]) -> None:
    """Write each ``.npy`` file to ``root/_featcache/meta/<name>.npy`` atomically."""
    folder = root / META_DIR
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        write_atomic(folder / f"{name}.npy", data)


def write_arrays(root: Path | ObjectPath, arrays: Mapping[str, np.ndarray]) -> dict[str, dict[str, Any]]:
    """Write each array to ``root/_featcache/meta/<name>.npy`` atomically; return their specs for the manifest."""
    specs = {}
    for name, array in arrays.items():  # one column at a time: a column of 20 M rows is copied once, not all
        files, spec = encode_arrays({name: array})
        write_files(root, files)
        specs.update(spec)
    return specs


class MetaArrays(Mapping[str, np.ndarray]):
    """A cache's metadata arrays by name, opened on first use and then kept for the process.

    Pickles as the cache location and the specs only: a DataLoader worker reopens (maps) the arrays itself instead
    of unpickling their contents.
    """

    def __init__(self, root: Path | ObjectPath, specs: Mapping[str, Mapping[str, Any]],
                 verified: tuple[str, ...] = ()) -> None:
        self.root, self.specs, self.verified = root, dict(specs), tuple(verified)
        self._loaded: dict[str, np.ndarray] = {}

    def __getstate__(self) -> dict[str, Any]:
        return {"root": self.root, "specs": self.specs, "verified": self.verified}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["root"], state["specs"], state["verified"])

    def __len__(self) -> int:
        return len(self.specs)

    def __iter__(self) -> Iterator[str]:
        return iter(self.specs)

    def __getitem__(self, name: str) -> np.ndarray:
        if name not in self._loaded:
            if name not in self.specs:
                raise KeyError(name)
            self._loaded[name] = self._open(name)
        return self._loaded[name]

    def _open(self, name: str) -> np.ndarray:
        path, spec = self.root / META_DIR / f"{name}.npy", self.specs[name]
        if not path.is_file():
            raise CacheError(f"metadata array {path} is missing; the cache is incomplete or damaged: re-extract it "
                             "with --overwrite")
        if is_local(path) and name not in self.verified:
            array = np.load(path, mmap_mode="r", allow_pickle=False)
        else:
            data = path.read_bytes()
            if hashlib.sha256(data).hexdigest() != spec.get("sha256"):
                raise CacheError(f"metadata array {path} does not match the SHA-256 its manifest records: it was "
                                 "changed or damaged after extraction; restore it, or re-extract with --overwrite")
            array = np.load(io.BytesIO(data), allow_pickle=False)
        if array.dtype.str != spec.get("dtype") or list(array.shape) != spec.get("shape"):
            raise CacheError(f"metadata array {path} holds {array.dtype.str}{list(array.shape)}, its manifest says "
                             f"{spec.get('dtype')}{spec.get('shape')}; restore it, or re-extract with --overwrite")
        return array


# ------------------------------------------------------------------------------------------------ manifest side

def with_meta(manifest: Mapping[str, Any]) -> Manifest:
    """``manifest`` as a :class:`Manifest`, keeping the arrays a reader attached to it."""
    out = Manifest(manifest)
    out.meta = getattr(manifest, "meta", None)  # a converted cache's source arrays
    return out


def check_format(path: Path | ObjectPath, existing: Manifest) -> None:
    """A cache in an older format is not resumed: its units and this writer's would mix two layouts."""
    if existing["format_version"] < FORMAT_VERSION:
        raise CacheError(f"cache {str(path)!r} is in cache format {existing['format_version']}, this featcache writes "
                         f"format {FORMAT_VERSION}; re-extract it with --overwrite, or finish it with the featcache that "
                         "started it (a complete one is still read, and `featcache convert` rewrites it)")


def split_sources(manifest: Manifest) -> tuple[Manifest, dict[str, np.ndarray]]:
    """The manifest without its inline ``data.sources`` list, and that list as packed arrays.

    A manifest built in memory lists ``[relpath, label]`` pairs (:func:`~featcache.sources.source_manifest_entry`);
    a converted cache's manifest carries its source cache's arrays instead (``manifest.meta``); a synthetic store's
    lists none (no arrays). The result records the arrays' specs under ``data.items`` (:func:`with_source_specs`).

    Raises:
        CacheError: when the packed list does not hash to the manifest's ``data.file_list_sha256``.
    """
    sources = manifest["data"].get("sources")
    # Copy everything but the list (1.28 M pairs at ImageNet scale): it is packed, not kept.
    shallow = Manifest({**manifest, "data": {k: v for k, v in manifest["data"].items() if k != "sources"}})
    shallow.meta = manifest.meta
    out = shallow.copy()
    data = out["data"]
    if sources is not None:
        arrays = pack_items([SourceItem(str(rel), int(label)) for rel, label in sources])
    elif isinstance(data.get("items"), Mapping) and manifest.meta is not None:
        arrays = {name: np.asarray(manifest.meta[name]) for name in data["items"]["arrays"]}
    else:
        return out, {}
    if packed_file_list_sha256(arrays) != data.get("file_list_sha256"):
        raise CacheError("the packed source list does not hash to data.file_list_sha256; the manifest's sources were "
                         "edited: rebuild it from the source")
    return out, arrays


def with_source_specs(manifest: Manifest, specs: Mapping[str, Any]) -> Manifest:
    if not specs:
        return manifest
    out = manifest.copy()
    out["data"]["items"] = {"count": int(manifest["num_samples"]), "arrays": dict(specs)}
    return out


def record_specs(manifest: Mapping[str, Any]) -> dict[str, Any]:
    """The record columns' specs a finalized cache lists (``{}`` before finalize, and in FORMAT_VERSION 1)."""
    return dict(manifest.get("records") or {})


def write_records(root: Path | ObjectPath, records: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """Write every record column as ``records.<name>.npy``; return the specs the manifest's ``records`` key holds."""
    arrays = {f"{RECORD_PREFIX}{k}": np.asarray(records[k], dtype=RECORD_DTYPES[k]) for k in RECORD_DTYPES}
    return {name[len(RECORD_PREFIX):]: spec for name, spec in write_arrays(root, arrays).items()}


def open_meta(root: Path | ObjectPath, manifest: Mapping[str, Any]) -> MetaArrays | None:
    """The metadata arrays a FORMAT_VERSION 2 manifest lists (None for version 1, which keeps them inline)."""
    items = manifest["data"].get("items")
    specs = dict(items.get("arrays") or {}) if isinstance(items, Mapping) else {}
    specs.update({f"{RECORD_PREFIX}{k}": v for k, v in record_specs(manifest).items()})
    if not specs:
        return None
    mapped = {f"{RECORD_PREFIX}{k}" for k in RECORD_DTYPES if k not in VERIFIED_RECORDS}
    return MetaArrays(root, specs, tuple(sorted(specs.keys() - mapped)))


def bulk_records(meta: MetaArrays) -> dict[str, np.ndarray]:
    """Every record column of a finalized cache, by record name."""
    return {k: meta[f"{RECORD_PREFIX}{k}"] for k in RECORD_DTYPES}


def check_bulk_records(manifest: Manifest, notes: list[dict[str, Any]]) -> None:
    """The bulk record columns hold, unit by unit, the bytes whose CRC-32 each unit's marker recorded: the check of
    the columns that are mapped rather than hashed on open (one pass over every column).

    Raises:
        CacheError: naming the column, the rows and the unit.
    """
    if manifest.meta is None or not record_specs(manifest):
        return
    for name, column in bulk_records(manifest.meta).items():
        for unit, note in enumerate(notes):
            rows = manifest.unit_rows(unit)
            want = (note.get("crc32") or {}).get(f"records/{name}")
            got = unit_crc32({}, {name: column[rows.start:rows.stop]})[f"records/{name}"]
            if want is not None and got != want:
                raise CacheError(f"{META_DIR}/{RECORD_PREFIX}{name}.npy rows {rows.start}-{rows.stop - 1} do not match "
                                 f"the CRC-32 unit {unit}'s marker recorded: the bulk records were changed or damaged; "
                                 "restore them, or re-extract with --overwrite")
