"""Zarr v3 backend: one sharded array per stored target, per-view records, the manifest in the group attributes.

Layout (see docs/FORMAT.md), all readable with plain ``zarr.open_group(path, mode="r")``::

    OUT/zarr.json                 group; attributes {"featcache": manifest}
    OUT/<array>/                  one array per manifest["arrays"] entry, shape [rows, *shape],
                                  inner chunk = 1 row (one view), shard = shard_size rows (one unit)
    OUT/records/<name>/           per-view records, chunk = one unit, unsharded, uncompressed; bulk: _featcache/meta/
    OUT/_featcache/zarr.json      a zero-length array (see below); its attributes say where the markers are
    OUT/_featcache/units/unit-{u:06d}.json   one JSON completion note per unit, written once unit u is durable

A unit is written as whole shards (one writer per unit), fsynced, and only then marked by its own marker file, so
processes writing disjoint units never write the same file (multi-process extraction relies on it); the group
attributes say ``complete: true`` only after every unit is marked. ``_featcache`` is declared a Zarr array only so
that plain Zarr's hierarchy traversal does not descend into it: Zarr lists every key of a group as a member and
warns on files that are no Zarr node, but never lists what lies inside an array. Caches written before the markers
became files keep them in the string array ``_featcache/units`` (one vlen-utf8 note per chunk); they are read, and
resumed, in that layout (:func:`markers_of`).

The reader's fast path reads a row with one ``os.pread`` per array: it parses each shard's index (the sharding
codec's trailing table of ``(offset, nbytes)`` uint64 pairs + CRC-32C) once per shard and process. zarr-python's own
read path costs far more per row (``benchmarks/store_speed.py`` compares them: ~1.2k arrays/s warm vs ~30k views/s
for direct preads), and training reads single views in random order. Layouts the fast path does not know (codecs
other than bytes/zstd/blosc/gzip, big-endian bytes, inner chunks other than one row) are read through zarr-python.

On object storage (``s3://``, ``gs://``, ``memory://``; :mod:`featcache.storage`) zarr-python writes through its
``FsspecStore``: every shard is one object, put whole, so a unit is on the store once its PUTs returned, and only then
is it marked. The fast path reads a row with two ranged GETs the first time a process touches a shard (its index:
the object's size, then its tail) and one ranged GET per array afterwards; ``simplecache::``/``blockcache::`` in
front of the URL keeps what was read on local disk.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

from ..errors import CacheError, ConfigError, UnknownNameError
from ..manifest import RECORD_DTYPES, Manifest, check_manifest
from ..storage import ObjectPath, RangeFile, disk_bytes, fsync_path, location, missing_files, read_many, sync_path
from . import _units
from .base import READERS, WRITERS, StoreReader, StoreWriter

MARKERS = "_featcache/units"  # the string array of markers in caches written before markers became files
RECORDS = "records"
_MISSING = np.uint64(0xFFFF_FFFF_FFFF_FFFF)


def zarr_store(path: Path | ObjectPath, read_only: bool = False) -> Any:
    """What zarr-python opens for ``path``: the local path as before, or zarr's ``FsspecStore`` for an object store
    (each chunk or shard one object, written with one PUT)."""
    if not isinstance(path, ObjectPath):
        return str(path)
    from zarr.storage import FsspecStore

    return FsspecStore.from_url(path.target_url(), read_only=read_only)


def read_manifest(path: str | os.PathLike | ObjectPath) -> Manifest | None:
    """The manifest stored in a Zarr cache's group attributes (plain JSON, no zarr needed), validated by
    :func:`~featcache.manifest.check_manifest`; None if absent.

    Raises:
        CacheError: when ``zarr.json`` is not valid JSON, not group metadata, or holds an invalid manifest.
    """
    meta = location(path, "--cache") / "zarr.json"
    if not meta.is_file():
        return None
    attrs = _node_meta(meta, "group").get("attributes", {})
    if not isinstance(attrs, dict):
        raise CacheError(f"{meta}: attributes is a JSON {type(attrs).__name__}, not an object; the cache is damaged: "
                         "re-extract it with --overwrite")
    return check_manifest(attrs["featcache"], f"{meta} (attributes.featcache)") if "featcache" in attrs else None


def _node_meta(meta: Path | ObjectPath, node_type: str) -> dict[str, Any]:
    """A Zarr v3 ``zarr.json`` of a group or an array, checked to be one.

    Raises:
        CacheError: one line naming the file, for anything that is not such metadata (a JSON list, another node).
    """
    doc = _units.read_json(meta)
    if not isinstance(doc, dict) or doc.get("zarr_format") != 3 or doc.get("node_type") != node_type:
        kind = f"a JSON {type(doc).__name__}" if not isinstance(doc, dict) else f"node_type {doc.get('node_type')!r}"
        raise CacheError(f"{meta} is {kind}, not Zarr v3 {node_type} metadata; the cache is damaged: re-extract it "
                         "with --overwrite")
    return doc


def markers_of(path: Path) -> _units.Markers:
    """Where the Zarr cache at ``path`` keeps its unit markers: one file per unit (:class:`~._units.FileMarkers`),
    or, in caches written before that (tests/fixtures/v0_1), the string array ``_featcache/units``
    (:class:`ZarrMarkers`), which a resume goes on writing so that a cache never mixes the two."""
    return ZarrMarkers(path) if (path / MARKERS / "zarr.json").is_file() else _units.FileMarkers(path)


class ZarrMarkers(_units.Markers):
    """Unit markers in the string array ``_featcache/units`` (caches written before markers became files): one
    vlen-utf8 JSON note per chunk.

    Read chunk by chunk (not through zarr-python) so that a damaged marker only un-marks its own unit; written
    through zarr-python, whose LocalStore replaces the chunk file atomically, so plain zarr reads the markers too.
    """

    def __init__(self, path: Path | ObjectPath) -> None:
        self.path = path
        self._array: Any = None

    def read(self, num_units: int) -> list[dict[str, Any]]:
        import numcodecs

        codec, notes = numcodecs.VLenUTF8(), []
        chunks = read_many([self.path / MARKERS / "c" / str(unit) for unit in range(num_units)])
        for unit, raw in enumerate(chunks):
            try:
                text = str(codec.decode(raw)[0]) if raw is not None else ""
            except (ValueError, IndexError):  # torn or foreign bytes: no marker
                text = ""
            notes.append(_units.parse_note(text, unit))
        return notes

    def write(self, unit: int, note: Mapping[str, Any]) -> None:
        self._open()[unit] = _units.note_json(note)
        fsync_path(self.path / MARKERS / "c" / str(unit))

    def clear(self, unit: int) -> None:
        self._open()[unit] = ""  # the fill value: zarr deletes the chunk
        sync_path(self.path / MARKERS / "c")

    def _open(self) -> Any:
        import zarr

        if self._array is None:
            self._array = zarr.open_array(zarr_store(self.path / MARKERS), mode="r+")
        return self._array


def zarr_compressors(spec: Mapping[str, Any] | None) -> list[Any] | None:
    """Compressor spec ``{"name": "none"|"zstd"|"blosc", ...options}`` -> zarr v3 codecs.

    Raises:
        ConfigError: for a compressor the zarr store does not know.
    """
    from zarr.codecs import BloscCodec, ZstdCodec

    spec = dict(spec or {"name": "none"})
    name = spec.pop("name", "none")
    if name in ("none", None):
        return None
    if name == "zstd":
        return [ZstdCodec(**spec)]
    if name == "blosc":
        return [BloscCodec(**spec)]
    raise ConfigError(f"unknown compressor {name!r} for the zarr store; choose none, zstd or blosc")


def _chunk_key(meta: Mapping[str, Any], index: tuple[int, ...]) -> str:
    enc = meta.get("chunk_key_encoding", {"name": "default"})
    sep = enc.get("configuration", {}).get("separator", "/")
    if enc.get("name") == "v2":
        return sep.join(str(i) for i in index)
    return "c" + sep + sep.join(str(i) for i in index)


def _shard_key(ndim: int, unit: int) -> str:
    return "/".join(["c", str(unit)] + ["0"] * (ndim - 1))


@WRITERS.register("zarr")
class ZarrWriter(StoreWriter):
    """Creates (or reopens, for resume) a Zarr cache; writes one unit = one shard of every array at a time."""

    def __init__(self, path: str | os.PathLike, manifest: Mapping[str, Any], overwrite: bool = False) -> None:
        self._arrays: dict[str, Any] = {}  # zarr arrays opened once per writer
        super().__init__(path, manifest, overwrite)
        self._marker_store = markers_of(self.path)

    def _new_manifest(self, manifest: Manifest) -> tuple[Manifest, dict[str, bytes]]:
        out, files = super()._new_manifest(manifest)
        out["num_units"] = out.num_units
        return out, files

    def _load_manifest(self) -> Manifest | None:
        return read_manifest(self.path)

    def _save_manifest(self, manifest: Manifest) -> None:
        import zarr

        zarr.open_group(zarr_store(self.path), mode="r+").update_attributes({"featcache": dict(manifest)})
        fsync_path(self.path / "zarr.json")

    def _markers(self) -> _units.Markers:
        return self._marker_store

    def _create(self, manifest: Manifest) -> None:
        import zarr

        (self.path / _units.OWN_DIR).mkdir(parents=True, exist_ok=True)  # it holds the metadata arrays already
        group = zarr.open_group(zarr_store(self.path), mode="a")
        rows, shard = manifest.num_rows, manifest.shard_size
        for name, spec in manifest["arrays"].items():
            shape = tuple(int(s) for s in spec["shape"])
            group.create_array(name, shape=(rows, *shape), chunks=(1, *shape), shards=(shard, *shape),
                               dtype=spec["dtype"], fill_value=0, compressors=zarr_compressors(spec.get("compressor")),
                               config={"write_empty_chunks": True})
        for name, dtype in RECORD_DTYPES.items():
            extra = (len(manifest["views"]["param_names"]),) if name == "params" else ()
            group.create_array(f"{RECORDS}/{name}", shape=(rows, *extra), chunks=(shard, *extra), dtype=dtype,
                               fill_value=0, compressors=None, config={"write_empty_chunks": True})
        group.create_array(_units.OWN_DIR, shape=(0,), dtype="uint8", compressors=None,
                           attributes={"featcache": {"markers": "units/unit-{unit:06d}.json"}})
        _units.FileMarkers(self.path).dir.mkdir()
        self._save_manifest(manifest)  # last: a cache without the manifest is an interrupted creation

    def _zarr_array(self, name: str) -> Any:
        import zarr

        if name not in self._arrays:
            self._arrays[name] = zarr.open_array(zarr_store(self.path / name), mode="r+")
        return self._arrays[name]

    def _write_data(self, unit: int, targets: Mapping[str, np.ndarray], records: Mapping[str, np.ndarray]
                    ) -> dict[str, Any]:
        rows = self._manifest.unit_rows(unit)
        written = {**targets, **{f"{RECORDS}/{k}": v for k, v in records.items()}}
        for name, value in written.items():
            value = np.ascontiguousarray(value)
            self._zarr_array(name)[rows.start:rows.stop] = value
            fsync_path(self.path / name / _shard_key(value.ndim, unit))  # the file and its directory (temp + rename)
        # zarr writes no chunk equal to the fill value (0), so a unit whose targets are all zeros (every view skipped)
        # has no shard: the note says so, and readers serve those rows as fill instead of calling the shard lost.
        fill_only = sorted(name for name, value in targets.items() if not np.any(value))
        return {"fill_only": fill_only} if fill_only else {}


class _ShardedArray:
    """Where one array's rows live on disk, parsed from its zarr.json; ``fast`` False means "use zarr-python"."""

    def __init__(self, root: Path | ObjectPath, name: str, meta: Mapping[str, Any]) -> None:
        self.root, self.name = root, name
        self.shape = tuple(int(s) for s in meta["shape"])
        self.dtype = np.dtype(meta["data_type"] if meta["data_type"] != "bfloat16" else "uint16")
        self.fill_value = meta.get("fill_value", 0)
        self.meta = meta
        self.fast = self._parse(meta)

    def _parse(self, meta: Mapping[str, Any]) -> bool:
        codecs = meta.get("codecs", [])
        if len(codecs) != 1 or codecs[0]["name"] != "sharding_indexed" or meta["data_type"] in ("string", "bfloat16"):
            return False
        cfg = codecs[0]["configuration"]
        inner = cfg["codecs"]
        if tuple(cfg["chunk_shape"]) != (1, *self.shape[1:]) or inner[0]["name"] != "bytes":
            return False
        if inner[0].get("configuration", {}).get("endian", "little") != "little" and self.dtype.itemsize > 1:
            return False
        self.decompressors = [_decompressor(c) for c in inner[1:]]
        index_names = [c["name"] for c in cfg["index_codecs"]]
        if index_names not in (["bytes"], ["bytes", "crc32c"]) or None in self.decompressors:
            return False
        self.index_crc = index_names[-1] == "crc32c"
        self.index_at_end = cfg.get("index_location", "end") == "end"
        self.shard_rows = int(meta["chunk_grid"]["configuration"]["chunk_shape"][0])
        return True

    def shard_path(self, shard: int) -> Path | ObjectPath:
        """The file holding shard ``shard``."""
        return self.root / self.name / _chunk_key(self.meta, (shard,) + (0,) * (len(self.shape) - 1))

    def read_index(self, shard: int, fill_only: Callable[[], bool] = lambda: False
                   ) -> tuple[RangeFile | None, np.ndarray]:
        """Open shard ``shard``; return it and its index ``[shard_rows, 2]`` of ``(offset, nbytes)``; for a shard
        its unit's note lists as ``fill_only`` (never written), no file and an index of missing chunks.

        Raises:
            CacheError: when the shard is missing, truncated or its index fails its CRC-32C.
        """
        path = self.shard_path(shard)
        try:
            fh = RangeFile(path)
        except FileNotFoundError:
            if fill_only():
                return None, np.full((self.shard_rows, 2), _MISSING, dtype="<u8")
            raise CacheError(f"shard {path} is missing; the cache is incomplete or damaged") from None
        try:
            return fh, self._parse_index(path, fh)
        except CacheError:
            fh.close()
            raise

    def _parse_index(self, path: Path | ObjectPath, fh: RangeFile) -> np.ndarray:
        n = self.shard_rows
        size = n * 16 + (4 if self.index_crc else 0)
        offset = fh.size - size if self.index_at_end else 0
        raw = fh.read(size, max(offset, 0))
        if len(raw) != size or offset < 0:
            raise CacheError(f"shard {path} is truncated (cannot read its {size}-byte index)")
        if self.index_crc:
            import google_crc32c

            if google_crc32c.value(raw[:-4]).to_bytes(4, "little") != raw[-4:]:
                raise CacheError(f"shard {path} has a corrupt index (CRC-32C mismatch)")
        return np.frombuffer(raw[:n * 16], dtype="<u8").reshape(n, 2)

    def read_row(self, fh: RangeFile | None, index: np.ndarray, row: int) -> np.ndarray:
        """One row through the shard index: a ``pread`` (a ranged GET on object storage) of its chunk,
        decompressed."""
        offset, nbytes = index[row % self.shard_rows]
        if offset == _MISSING and nbytes == _MISSING:
            return np.full(self.shape[1:], self.fill_value, dtype=self.dtype)
        buf = fh.read(int(nbytes), int(offset))
        for dec in reversed(self.decompressors):
            buf = dec.decode(buf)
        return np.frombuffer(buf, dtype=self.dtype.newbyteorder("<")).reshape(self.shape[1:])


def _same_dtype(stored: Any, dtype: str) -> bool:
    if dtype == "str":
        return stored == "string"
    try:
        return np.dtype(stored) == np.dtype(dtype)
    except TypeError:
        return False


def _decompressor(spec: Mapping[str, Any]) -> Any:
    import numcodecs

    return {"zstd": numcodecs.Zstd, "blosc": numcodecs.Blosc, "gzip": numcodecs.GZip}.get(spec["name"], lambda: None)()


@READERS.register("zarr")
class ZarrReader(StoreReader):
    """Reads a Zarr cache through per-process shard descriptors and parsed shard indexes."""

    def _load_manifest(self) -> Manifest | None:
        return read_manifest(self.path)

    def _markers(self) -> _units.Markers:
        return markers_of(self.path)

    def _fresh_handles(self) -> None:
        self._layout: dict[str, _ShardedArray] = {}
        self._fds: dict[tuple[str, int], RangeFile] = {}
        self._index: dict[tuple[str, int], np.ndarray] = {}
        self._records: dict[str, np.ndarray] | None = None  # a format 1 cache's records, read once

    def _close_handles(self) -> None:
        for fh in self._fds.values():
            if fh is not None:
                fh.close()
        self._fds, self._index = {}, {}

    def _array_layout(self, name: str) -> _ShardedArray:
        self._own_handles()
        if name not in self._layout:
            if name not in self.manifest["arrays"]:
                raise UnknownNameError(f"no array {name!r} in cache {str(self.path)!r}; it has "
                                       f"{list(self.manifest['arrays'])}")
            spec = self.manifest["arrays"][name]
            meta = self._array_meta(name, [self.manifest.num_rows, *spec["shape"]], spec["dtype"])
            self._layout[name] = _ShardedArray(self.path, name, meta)
        return self._layout[name]

    def _array_meta(self, name: str, shape: list[int], dtype: str) -> dict[str, Any]:
        """An array's ``zarr.json``, checked to hold the shape and dtype the manifest gives it.

        Raises:
            CacheError: naming the file, when it is not array metadata or its shape or dtype differ.
        """
        meta_path = self.path / name / "zarr.json"
        if not meta_path.is_file():
            raise CacheError(f"array {name!r} of cache {str(self.path)!r} is missing ({meta_path}); the cache is "
                             "damaged: re-extract it with --overwrite")
        meta = _node_meta(meta_path, "array")
        stored = meta.get("data_type")
        if meta.get("shape") != shape or stored != "bfloat16" and not _same_dtype(stored, dtype):
            raise CacheError(f"{meta_path} holds {stored}{meta.get('shape')}, but the manifest gives {dtype}{shape} "
                             "(an edited manifest, or a damaged cache): restore the manifest, or re-extract with "
                             "--overwrite")
        return meta

    def _check_layout(self, notes: list[dict[str, Any]]) -> None:
        """Every array's metadata (shape, dtype), the markers' length, and a shard of every array for every marked
        unit."""
        m = self.manifest
        for name in m["arrays"]:
            arr = self._array_layout(name)
            shards = {arr.shard_path(u): u for u in sorted(_units.completed(notes))
                      if name not in notes[u].get("fill_only", ())} if arr.fast else {}
            for path in missing_files(list(shards), self.path / name)[:1]:
                raise CacheError(f"shard {path} of marked unit {shards[path]} is missing; re-run the same "
                                 "`featcache extract` command to redo it")
        params = len(m["views"]["param_names"])
        for name, dtype in RECORD_DTYPES.items():
            self._array_meta(f"{RECORDS}/{name}", [m.num_rows, params] if name == "params" else [m.num_rows], dtype)
        if isinstance(self._markers(), ZarrMarkers):
            self._array_meta(MARKERS, [m.num_units], "str")

    def _shard(self, arr: _ShardedArray, shard: int) -> tuple[RangeFile | None, np.ndarray]:
        key = (arr.name, shard)
        if key not in self._index:
            self._fds[key], self._index[key] = arr.read_index(shard, lambda: self._fill_only(arr.name, shard))
        return self._fds[key], self._index[key]

    def _fill_only(self, name: str, unit: int) -> bool:
        """Whether unit ``unit`` wrote no shard of ``name`` because all its values were the fill value."""
        note = self._markers().read(self.manifest.num_units)[unit]
        return name in note.get("fill_only", ())

    def read_stored_row(self, row: int, names: list[str] | None = None) -> dict[str, np.ndarray]:
        """Stored (undecoded) arrays of one row: one ``pread`` per array on the fast path."""
        self.unit_of(row)  # range check
        out = {}
        for name in names or list(self.manifest["arrays"]):
            arr = self._array_layout(name)
            if arr.fast:
                out[name] = arr.read_row(*self._shard(arr, row // arr.shard_rows), row)
            else:
                out[name] = self._read_zarr(name, row)
        return out

    def _read_zarr(self, name: str, row: int) -> np.ndarray:
        import zarr

        return np.asarray(zarr.open_array(zarr_store(self.path / name, read_only=True), mode="r")[row])

    def read_row_zarr(self, row: int, names: list[str] | None = None) -> dict[str, np.ndarray]:
        """Stored arrays of one row through zarr-python (reference path, for checks and comparisons)."""
        return {n: self._read_zarr(n, row) for n in names or list(self.manifest["arrays"])}

    def _records_by_unit(self) -> dict[str, np.ndarray]:
        import zarr

        if self._records is None:
            group = zarr.open_group(zarr_store(self.path / RECORDS, read_only=True), mode="r")
            self._records = {name: np.asarray(group[name][:]) for name in RECORD_DTYPES}
        return dict(self._records)

    def unit_records(self, unit: int) -> dict[str, np.ndarray]:
        import zarr

        rows = self.manifest.unit_rows(unit)
        group = zarr.open_group(zarr_store(self.path / RECORDS, read_only=True), mode="r")
        return {name: np.asarray(group[name][rows.start:rows.stop]) for name in RECORD_DTYPES}

    def array_nbytes(self) -> dict[str, int]:
        """Bytes of each array's directory (shards, their indexes and the array's zarr.json)."""
        return {name: disk_bytes(self.path / name) for name in self.manifest["arrays"]}
