"""HDF5 backend: chunked datasets mirroring the Zarr layout, one file per writer process, readable with h5py.

Layout::

    PATH/manifest.json                        the manifest (JSON; also kept as attribute ``manifest`` in each file)
    PATH/part-{n:03d}.h5                      one file per writer process (a resumed run opens a new one)
        /<array>            [num_rows, *shape] chunked (1, *shape): block_0, logits, block_0__scale, ...
        /records/<name>     [num_rows(, P)] chunked by unit
        /units              uint8 [num_units], contiguous: 1 where this file holds the unit (set after its rows)
        attrs: manifest (JSON, at creation)
    PATH/_featcache/units/unit-{u:06d}.json   completion markers; ``file`` names the part holding the unit
    PATH/_featcache/meta/<name>.npy           sources and records in bulk arrays (docs/FORMAT.md, Metadata arrays)

HDF5 files are not safe to append to from two processes, so every writer claims a fresh part file (a hard link of
its fully laid-out temp file, which fails on a taken name) and earlier parts are only ever read. Rows of a unit
re-written on resume land in the newer part and its marker points there.

Surviving a kill. Parts are written with ``libver=("earliest", "v108")``: a superblock of version 2 at most, which
has no "file is open for write" flag. With ``libver="latest"`` (superblock 3) a SIGKILL left that flag set and every
later open failed ("file is already open for write"), though the bytes were intact. After creation nothing in a part
is rewritten in place except chunk indexes: no attribute changes (a rewritten root object header was what a kill
could tear), and the per-unit flag lives in the preallocated ``units`` dataset. Each unit is flushed and fsynced
before it is marked. HDF5 does not order the metadata writes of a flush (only its SWMR mode does, at the price of
the flag above), so a kill during the flush that ends a unit can, rarely, damage earlier units of the same part:
that is why a resume reads every unit it keeps back and redoes those whose CRC-32s no longer match
(:meth:`~featcache.stores.base.StoreWriter.completed_units`).

Compression uses HDF5's built-in filters because ``hdf5plugin`` (Zstd/Blosc for HDF5) is not a dependency:
``zstd:L`` and ``blosc-zstd:L`` map to gzip (deflate) level ``min(L, 9)``, with HDF5's byte shuffle for
``shuffle`` and ``bitshuffle`` (HDF5 has no built-in bit shuffle). The stored values are identical; only the
on-disk size differs from the Zarr/wds backends. Each dataset records the filter in attribute ``compressor``.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np

from ..durable import fsync_path, temp_token
from ..errors import CacheError
from ..manifest import RECORD_DTYPES, Manifest, safe_relpath
from ..storage import location, require_local
from . import _units
from .base import READERS, WRITERS, StoreReader, StoreWriter

# Superblock version 2 at most: no file-consistency flags, so a killed writer leaves a part any reader can open.
LIBVER = ("earliest", "v108")
UNITS = "units"
PART_RE = re.compile(r"^part-(\d{3,})\.h5$")


def hdf5_filters(spec: Mapping[str, Any] | None) -> dict[str, Any]:
    """h5py ``create_dataset`` keyword arguments for a compressor spec (built-in filters only)."""
    spec = dict(spec or {"name": "none"})
    if spec["name"] == "none":
        return {}
    level = int(spec.get("level", spec.get("clevel", 3)))
    return {"compression": "gzip", "compression_opts": max(1, min(level, 9)),
            "shuffle": spec.get("shuffle", "noshuffle") != "noshuffle"}


@WRITERS.register("hdf5")
class Hdf5Writer(_units.JsonManifestWriter, StoreWriter):
    """Writes units into this process's own part file, flushed and fsynced before the unit is marked done."""

    def __init__(self, path: str | os.PathLike, manifest: Mapping[str, Any], overwrite: bool = False) -> None:
        require_local(location(path), "an HDF5 cache (--format hdf5)")  # h5py writes through local descriptors
        self._file: Any = None  # this process's part file, claimed on the first unit
        self._part: Path | None = None  # its name
        super().__init__(path, manifest, overwrite)

    def _open(self) -> Any:
        """This process's part: created under a temp name with every dataset and attribute it will ever have,
        flushed and fsynced, and only then given a free ``part-NNN.h5`` name, so every part can be opened."""
        import h5py

        if self._file is None:
            tmp = self.path / f".part.tmp-{temp_token()}"
            f = h5py.File(tmp, "w", libver=LIBVER)
            try:
                self._lay_out(f)
                f.flush()
                fsync_path(tmp)
                self._part = self._claim_name(tmp)
            except BaseException:
                _discard(f)
                tmp.unlink(missing_ok=True)
                raise
            self._file = f
        return self._file

    def _lay_out(self, f: Any) -> None:
        import h5py

        rows = self._manifest.num_rows
        for name, spec in self._manifest["arrays"].items():
            shape = tuple(spec["shape"])
            d = f.create_dataset(name, shape=(rows, *shape), dtype=spec["dtype"], chunks=(1, *shape),
                                 **hdf5_filters(spec.get("compressor")))
            d.attrs["compressor"] = json.dumps(spec.get("compressor") or {"name": "none"})
        self._create_records(f)
        dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
        dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)  # allocated now: setting a flag later is a data write only
        f.create_dataset(UNITS, shape=(self._manifest.num_units,), dtype="u1", fillvalue=0, dcpl=dcpl)
        f.attrs["manifest"] = self._manifest.to_json()

    def _claim_name(self, tmp: Path) -> Path:
        """Link ``tmp`` to the first free ``part-NNN.h5`` (a link never replaces a file: two writers never share a
        part), then drop the temp name."""
        for n in range(10_000):
            path = self.path / f"part-{n:03d}.h5"
            try:
                os.link(tmp, path)
            except FileExistsError:
                continue
            tmp.unlink()
            fsync_path(path)  # the new directory entries
            return path
        raise CacheError(f"{self.path}: no free part-NNN.h5 name left")

    def _create_records(self, f: Any) -> None:
        rows = self._manifest.num_rows
        chunk = min(self._manifest.shard_size, rows)
        params = len(self._manifest["views"]["param_names"])
        for name, dtype in RECORD_DTYPES.items():
            shape = (rows, params) if name == "params" else (rows,)
            chunks = (chunk, *shape[1:]) if all(shape[1:]) else None  # HDF5 cannot chunk a 0-wide axis
            f.create_dataset(f"records/{name}", shape=shape, dtype=dtype, chunks=chunks)

    def _write_data(self, unit: int, targets: Mapping[str, np.ndarray], records: Mapping[str, np.ndarray]
                    ) -> dict[str, Any]:
        f = self._open()
        rows = self._manifest.unit_rows(unit)
        sl = slice(rows.start, rows.stop)
        # Every dataset is held here until the writes are over: a failed write must reach _discard while none has
        # been released (releasing one flushes its chunk cache, which fails again and leaves HDF5 broken).
        datasets = {**{n: f[n] for n in targets}, **{n: f[f"records/{n}"] for n in records}, UNITS: f[UNITS]}
        try:
            for name, value in {**targets, **records}.items():
                datasets[name][sl] = value
            datasets[UNITS][unit] = 1
            f.flush()
            fsync_path(self._part)
        except BaseException:  # a full disk, say: this part takes no more writes (a resume checks what it holds)
            _discard(f)
            self._file = None
            raise
        return {"file": self._part.name}

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


@READERS.register("hdf5")
class Hdf5Reader(_units.JsonManifestLayout, StoreReader):
    """Opens ``h5py.File`` handles lazily, per process; pickling drops them so DataLoader workers open their own."""

    _pickled = ("path", "manifest", "unit_files")

    def __init__(self, path: str | os.PathLike, strict: bool = True) -> None:
        require_local(location(path, "--cache"), "an HDF5 cache")
        self.unit_files: dict[int, str] | None = None  # unit -> the part its marker names; read with the markers
        super().__init__(path, strict)

    def _parts(self) -> dict[int, str]:
        """Unit -> the part file its marker names (the newest write of that unit); names are checked on open."""
        if self.unit_files is None:
            self.unit_files = {u: str(n.get("file", "")) for u, n in enumerate(self.unit_notes()) if n}
        return self.unit_files

    def _check_layout(self, notes: list[dict[str, Any]]) -> None:
        """Every part a marker names opens, has the datasets the manifest gives, and holds the units marked in it."""
        self.unit_files = {u: str(n.get("file", "")) for u, n in enumerate(notes) if n}
        try:
            for unit, name in sorted(self.unit_files.items()):
                self._check_holds(self._open_part(name), unit)
        finally:  # opened again when read: a DataLoader worker forked now inherits no HDF5 handle
            self._close_handles()

    def _fresh_handles(self) -> None:
        self._files: dict[str, Any] = {}
        self._held: dict[str, set[int]] = {}  # part -> the units it says it holds
        self._datasets: dict[tuple[int, str], Any] = {}  # (unit, array) -> open h5py dataset
        self._records: dict[str, np.ndarray] | None = None

    def _close_handles(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()
        self._datasets.clear()

    def _open_part(self, name: str) -> Any:
        """An open part, checked on first open: a valid name, readable, every dataset shaped as the manifest says.

        Raises:
            CacheError: naming the part and the fix.
        """
        import h5py

        self._own_handles()  # HDF5 handles must not cross a fork
        if name not in self._files:
            if not PART_RE.match(name) or safe_relpath(name) != name:
                raise CacheError(f"a unit marker of {str(self.path)!r} names {name!r}, expected part-NNN.h5")
            try:
                f = h5py.File(self.path / name, "r")
            except OSError as err:
                busy = "unable to lock file" in str(err)
                raise (_units.StoreBusy if busy else CacheError)(_open_failure(self.path / name, err)) from None
            problem = _layout_problem(f, self.manifest)
            if problem:
                f.close()
                raise CacheError(f"part {self.path / name}: {problem} (an edited manifest, or a damaged part); "
                                 "restore the manifest, or re-extract with --overwrite")
            self._files[name], self._held[name] = f, _held_units(f)
        return self._files[name]

    def _check_holds(self, f: Any, unit: int) -> None:
        if unit not in self._held[Path(f.filename).name]:
            raise CacheError(f"part {f.filename} does not hold unit {unit}, though its marker names it; re-run the "
                             "same `featcache extract` command to redo the unit")

    def _file_of(self, unit: int) -> Any:
        if unit not in self._parts():
            raise CacheError(f"unit {unit} of {str(self.path)!r} is not written; re-run `featcache extract` to finish")
        return self._open_part(self._parts()[unit])

    def _dataset(self, unit: int, name: str) -> Any:
        """The open dataset ``name`` of the file holding ``unit``: looking datasets up by name on every read made
        a 4-array row 16x slower (343 vs 21 us measured), so each is looked up once per process."""
        f = self._file_of(unit)  # resets the caches after a fork
        key = (unit, name)
        if key not in self._datasets:
            self._datasets[key] = f[name]
        return self._datasets[key]

    def read_stored_row(self, row: int, names: list[str] | None = None) -> dict[str, np.ndarray]:
        unit = self.unit_of(row)
        return {n: self._dataset(unit, n)[row] for n in names or list(self.manifest["arrays"])}

    def read_unit(self, unit: int, names: list[str] | None = None) -> dict[str, np.ndarray]:
        """Stored arrays of every row of ``unit`` (one read per dataset)."""
        f = self._file_of(unit)
        rows = self.manifest.unit_rows(unit)
        return {n: f[n][rows.start:rows.stop] for n in names or list(self.manifest["arrays"])}

    def iter_stored_unit(self, unit: int, names: list[str] | None = None
                         ) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
        """One read per dataset for the whole unit, then row by row."""
        stored = self.read_unit(unit, names)
        for i, row in enumerate(self.manifest.unit_rows(unit)):
            yield row, {k: v[i] for k, v in stored.items()}

    def read_stored_unit(self, unit: int) -> dict[str, np.ndarray]:
        """Every stored array of ``unit``, from the part its marker names, which must say it holds the unit."""
        self._check_holds(self._file_of(unit), unit)
        return self.read_unit(unit)

    def unit_records(self, unit: int) -> dict[str, np.ndarray]:
        f, rows = self._file_of(unit), self.manifest.unit_rows(unit)
        return {k: f[f"records/{k}"][rows.start:rows.stop] for k in RECORD_DTYPES}

    def _records_by_unit(self) -> dict[str, np.ndarray]:
        if self._records is None:
            parts: dict[str, list[np.ndarray]] = {k: [] for k in RECORD_DTYPES}
            for unit in range(self.manifest.num_units):
                f, rows = self._file_of(unit), self.manifest.unit_rows(unit)
                for k in parts:
                    parts[k].append(f[f"records/{k}"][rows.start:rows.stop])
            self._records = {k: np.concatenate(v) for k, v in parts.items()}
        return dict(self._records)

    def array_nbytes(self) -> dict[str, int]:
        """Bytes each stored array takes on disk, summed over the part files holding written units."""
        out = dict.fromkeys(self.manifest["arrays"], 0)
        first_unit = {name: unit for unit, name in sorted(self._parts().items(), reverse=True)}
        for unit in first_unit.values():
            f = self._file_of(unit)
            for name in out:
                out[name] += f[name].id.get_storage_size()
        return out


def _discard(f: Any) -> None:
    """Close a part whose write failed, leaving its bytes as they are on disk.

    HDF5 flushes dirty metadata when a file closes, and again at interpreter exit; after a failed write (a full disk)
    that flush fails too, and HDF5 then crashed the process (SIGSEGV). So the part's descriptor is first pointed at
    ``/dev/null``: the closing flush succeeds and writes nothing.
    """
    try:
        fd = f.id.get_vfd_handle()
        null = os.open(os.devnull, os.O_RDWR)
        os.dup2(null, fd)
        os.close(null)
        f.close()
    except (OSError, RuntimeError, ValueError):  # nothing more can be done for this part; its units are re-checked
        pass


def _open_failure(path: Path, err: OSError) -> str:
    """Why a part did not open, and the fix: a running writer holds HDF5's file lock; anything else (a part that a
    featcache 0.1 writer left open for write when it was killed, a damaged file) is redone by a resume."""
    reason = " ".join(str(err).split())
    if "unable to lock file" in reason:  # HDF5's message; errno is EAGAIN
        return (f"part {path} is being written by a running extraction (HDF5 file lock: {reason}); wait for it to "
                "finish, or stop it")
    return (f"part {path} cannot be opened ({reason}); re-run the same `featcache extract` command: it redoes the "
            "units of a part it cannot read back")


def _layout_problem(f: Any, m: Manifest) -> str | None:
    """What in part ``f`` differs from the datasets the manifest gives (None when nothing does)."""
    params = len(m["views"]["param_names"])
    want = {name: ((m.num_rows, *spec["shape"]), spec["dtype"]) for name, spec in m["arrays"].items()}
    want.update({f"records/{k}": ((m.num_rows, params) if k == "params" else (m.num_rows,), dtype)
                 for k, dtype in RECORD_DTYPES.items()})
    for name, (shape, dtype) in want.items():
        d = f.get(name)
        if d is None or not hasattr(d, "shape"):
            return f"dataset {name!r} is missing"
        if d.shape != tuple(shape) or d.dtype != np.dtype(dtype):
            return f"dataset {name!r} is {d.dtype}{list(d.shape)}, the manifest gives {dtype}{list(shape)}"
    return None


def _held_units(f: Any) -> set[int]:
    """The units a part says it holds: its ``units`` flags, or (parts of featcache 0.1) its ``units`` attribute."""
    if UNITS in f:
        return {int(u) for u in np.flatnonzero(f[UNITS][:])}
    try:
        return {int(u) for u in json.loads(f.attrs.get("units", "[]"))}
    except (TypeError, ValueError):
        return set()
