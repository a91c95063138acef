"""What every store backend (zarr, wds, hdf5) is: a writer and a reader over the cache schema of
:mod:`featcache.manifest`, registered by format name, plus the entry points that pick one.

A cache holds, for every row (one stored view), the arrays listed in ``manifest["arrays"]`` and the per-view records
(:data:`~featcache.manifest.RECORD_DTYPES`), written in units of ``shard_size`` rows. The base classes hold
everything the backends share, so a backend only says where bytes go:

* :class:`StoreWriter` claims the directory, creates or resumes the cache (refusing one made with other settings),
  validates each unit, has the backend write it durably, marks it, and finalizes (:mod:`._units`).
* :class:`StoreReader` decodes stored arrays into logical float32 targets once, here, for every backend
  (:mod:`.encodings`), and keeps file handles per process: a reader pickles without them and reopens lazily in each
  DataLoader worker, and a forked child drops the ones it inherited.

There are no capability flags: every backend offers the whole surface (random access, unit streaming, notes, sizes).
The backends register on import of :mod:`featcache.stores`, as timm's model files do, so :func:`open_reader` and
:func:`create_writer` find them by name.
"""
from __future__ import annotations

import os
import tarfile
import warnings
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, ClassVar, Iterable, Iterator, Mapping

import numpy as np

from ..errors import CacheError
from ..manifest import FORMAT_VERSION, Manifest
from ..registry import Registry
from ..storage import ObjectPath, ensure_writable, location, rmtree
from . import _meta, _units
from .encodings import Encoding, encoding, stored_names


class StoreWriter(ABC):
    """Writes one cache. One writer per unit: processes may share a cache only on disjoint units.

    Backends implement the hooks: ``_load_manifest``, ``_save_manifest``, ``_create``, ``_markers`` and
    ``_write_data``; ``close`` when they hold files open. A full disk, in any of them, ends in one
    :class:`CacheError` naming the cache and the fix (:func:`._units.disk_errors`).
    """

    name: ClassVar[str]

    def __init__(self, path: str | os.PathLike, manifest: Mapping[str, Any], overwrite: bool = False) -> None:
        """Create the cache at ``path``, or reopen it for resume.

        Raises:
            CacheError: when ``path`` holds something else, a damaged or edited cache, or a cache whose identity
                differs from ``manifest`` (the message names the differing keys; ``overwrite=True`` starts afresh).
        """
        self.path: Path | ObjectPath = location(path)
        ensure_writable(self.path)
        self._trusted: set[int] = set()  # units this writer wrote or read back and checked
        self.redone: dict[int, str] = {}  # units un-marked because they could not be trusted -> why
        wanted, meta_files = self._new_manifest(_meta.with_meta(manifest))
        wanted = wanted.sealed()
        with _units.disk_errors(self.path):
            _units.claim(self.path, overwrite)
            existing = self._load_manifest() if self.path.exists() else None
            if existing is None:
                if self.path.exists():  # creation was interrupted before the manifest landed: nothing in it is valid
                    rmtree(self.path)
                _meta.write_files(self.path, meta_files)  # before the layout: the manifest, written last, lists them
                self._create(wanted)
                existing = wanted
            else:
                _meta.check_format(self.path, existing)
                _units.check_identity(self.path, existing, wanted)
        self._manifest = existing
        if existing.complete:
            self._recheck_complete()

    @property
    def manifest(self) -> Manifest:
        """The cache's manifest (the existing one on resume); read it, change it only through the writer."""
        return self._manifest

    def _new_manifest(self, manifest: Manifest) -> tuple[Manifest, dict[str, bytes]]:
        """The manifest this writer stores (its sources moved into bulk arrays) and those arrays' ``.npy`` files."""
        out, sources = _meta.split_sources(manifest)
        files, specs = _meta.encode_arrays(sources)
        out = _meta.with_source_specs(out, specs)
        out.meta = None  # this cache's arrays are its own, not those of a cache it was converted from
        out["format_version"] = FORMAT_VERSION
        for key in ("seal", "records"):  # sealed afresh, records written at finalize: a converted cache's come along
            out.pop(key, None)
        out.setdefault("storage", {})["format"] = self.name
        out["complete"] = False
        return out, files

    def _recheck_complete(self) -> None:
        """A cache that says it is complete must open as a reader opens it; if it does not (a hand-set ``complete``,
        a part a killed writer left unreadable), it is resumed instead: its units are checked and redone."""
        try:
            self._reader(strict=True).close()
        except CacheError as err:
            warnings.warn(f"resuming {str(self.path)!r}, whose manifest says it is complete: {err}", stacklevel=4)
            self._manifest["complete"] = False

    def _reader(self, strict: bool) -> "StoreReader":
        return READERS.get(self.name)(self.path, strict=strict)

    def completed_units(self) -> set[int]:
        """Units already durable on disk and trustworthy (resume skips them).

        Every marked unit this writer did not write itself is read back and checked against its marker note (rows,
        manifest seal, array shapes, CRC-32 of every array and record); one that fails is un-marked, so it is
        redone, and listed in :attr:`redone` with the reason (and a warning).
        """
        notes = self._markers().read(self._manifest.num_units)
        marked = _units.completed(notes)
        self.check_units(sorted(marked - self._trusted), notes)
        return marked & self._trusted

    def marked_units(self) -> set[int]:
        """Units with a marker, trusted or not yet checked (:meth:`check_units`)."""
        return _units.completed(self._markers().read(self._manifest.num_units))

    def check_units(self, units: list[int], notes: list[dict[str, Any]] | None = None) -> set[int]:
        """Read back marked ``units`` and check each against its note, as :meth:`completed_units` does; return those
        that hold, trusted from now on (the others are un-marked and listed in :attr:`redone`). Processes may check
        disjoint units of one cache at once: a multi-process resume shares the reading back."""
        if not units:
            return set()
        notes = self._markers().read(self._manifest.num_units) if notes is None else notes
        reader = self._reader(strict=False)
        try:
            problems = {u: p for u in units if (p := reader.unit_problem(u, notes[u])) is not None}
        finally:
            reader.close()
        good = {u for u in units if u not in problems}
        self._trusted.update(good)
        self._untrust(problems)
        return good

    def _untrust(self, problems: Mapping[int, str]) -> None:
        """Un-mark the units that cannot be trusted (so they are redone), and say which and why in one warning."""
        if not problems:
            return
        with _units.disk_errors(self.path):
            for unit in problems:
                self._markers().clear(unit)
        self.redone.update(problems)
        shown = "; ".join(f"unit {u}: {why}" for u, why in list(problems.items())[:3])
        warnings.warn(f"cache {str(self.path)!r}: {len(problems)} unit(s) cannot be trusted and will be redone "
                      f"({shown}{'; ...' if len(problems) > 3 else ''})", stacklevel=3)

    def adopt(self, units: Iterable[int]) -> None:
        """Trust ``units`` as this writer's own: other processes of the same extraction wrote and marked them (each
        unit by one process), so :meth:`completed_units` and :meth:`finalize` need not read them back."""
        self._trusted.update(int(u) for u in units)

    def write_unit(self, unit: int, targets: Mapping[str, np.ndarray], records: Mapping[str, np.ndarray],
                   skipped: list[str] | None = None) -> None:
        """Write all rows of ``unit`` (stored arrays and records shaped [len(unit_rows), ...]) durably, then mark it.

        Raises:
            CacheError: naming the array or record that does not match the manifest, or a full disk.
        """
        _units.check_unit(self._manifest, unit, targets, records)
        records = _units.record_arrays(records)
        seal = self._manifest.seal_digest()
        with _units.disk_errors(self.path):
            extra = self._write_data(unit, targets, records)
            extra.update(crc32=_units.unit_crc32(targets, records), **({"seal": seal} if seal else {}))
            self._markers().write(unit, _units.unit_note(self._manifest, unit, skipped, **extra))
        self._trusted.add(unit)

    def record_measured_error(self, errors: Mapping[str, Mapping[str, Any]]) -> None:
        """Keep the error measured for re-encoded targets (``targets[name]["measured_error"]``); saved by
        :meth:`finalize`. ``targets`` is not part of the cache identity, so a resume still matches."""
        for name, error in errors.items():
            self._manifest["targets"][name]["measured_error"] = dict(error)

    def finalize(self) -> Manifest:
        """Check every unit is marked and can be trusted, fold their notes (skipped files) into the manifest, delete
        the temp files of killed writers, and mark the cache complete, once it opens as a reader opens it.

        Raises:
            CacheError: naming the units not written yet (or found untrustworthy now: re-running redoes them).
        """
        self.close()
        with _units.disk_errors(self.path):
            done = self.completed_units()
            notes = self._markers().read(self._manifest.num_units)
            trusted = [note if unit in done else {} for unit, note in enumerate(notes)]
            manifest = _units.finalized(self.path, self._manifest, trusted)
            # from the units themselves: bulk records an earlier finalize wrote may predate units redone since
            manifest["records"] = _meta.write_records(self.path, self._reader(strict=False)._records_by_unit())
            self._reader(strict=True).close()  # every marker fits, every part opens: only then claim completion
            _units.sweep_debris(self.path)
            self._save_manifest(manifest)
        self._manifest = manifest
        return self._manifest

    def close(self) -> None:
        """Release open files (a later :meth:`write_unit` reopens what it needs)."""

    @abstractmethod
    def _load_manifest(self) -> Manifest | None:
        """The manifest stored at ``self.path``, None when there is none yet."""

    @abstractmethod
    def _save_manifest(self, manifest: Manifest) -> None:
        """Store the manifest durably (atomically: readers see the old one or the new one)."""

    @abstractmethod
    def _create(self, manifest: Manifest) -> None:
        """Lay out a new, empty cache: ``_featcache/`` first (it marks the directory as ours), the manifest last."""

    @abstractmethod
    def _markers(self) -> _units.Markers:
        """Where this cache keeps its unit markers."""

    @abstractmethod
    def _write_data(self, unit: int, targets: Mapping[str, np.ndarray], records: Mapping[str, np.ndarray]
                    ) -> dict[str, Any]:
        """Write one validated unit and make it durable; return backend keys for its marker note."""


class StoreReader(ABC):
    """Reads one cache. Picklable; files open lazily, once per process (each DataLoader worker opens its own).

    Backends implement ``_load_manifest``, ``_markers``, ``read_stored_row``, ``unit_records``, ``records`` and
    ``array_nbytes``, and ``_check_layout`` (what opening checks of the stored arrays); they keep their handles in
    attributes made by ``_fresh_handles`` and closed by ``_close_handles``, and call :meth:`_own_handles` before
    using one. ``_pickled`` names the attributes that survive pickling.
    """

    name: ClassVar[str]
    _pickled: ClassVar[tuple[str, ...]] = ("path", "manifest")

    def __init__(self, path: str | os.PathLike, strict: bool = True) -> None:
        """Open the cache at ``path``: its manifest is validated (schema, consistency, paths, seal) and, when
        ``strict``, checked against what is stored (unit markers, stored arrays' shapes and dtypes, files).

        Args:
            path: the cache.
            strict: check the markers and the stored layout now; writers open their own cache with ``strict=False``
                and check unit by unit (:meth:`unit_problem`) instead.

        Raises:
            CacheError: when there is no cache of this format at ``path``, or what it says of itself does not hold.
        """
        self.path: Path | ObjectPath = location(path, "--cache")
        manifest = self._load_manifest()
        if manifest is None:
            raise CacheError(f"no featcache {self.name} cache at {str(self.path)!r} (no manifest); make one with "
                             "`featcache extract --out PATH`")
        check_arrays(manifest, str(self.path))
        manifest.meta = _meta.open_meta(self.path, manifest)
        self.manifest = manifest
        self._reset()
        if strict:
            notes = self.unit_notes()
            _units.check_markers(self.path, manifest, notes)
            self._check_layout(notes)

    # -------------------------------------------------------------------------------------------- per process

    def _reset(self) -> None:
        self._pid = os.getpid()
        self._encodings: dict[str, Encoding] = {}
        self._fresh_handles()

    def _own_handles(self) -> None:
        """Call before using a handle: in a forked child, forget the parent's handles and open fresh ones."""
        if self._pid != os.getpid():
            self._reset()

    def _fresh_handles(self) -> None:
        """Start this process's (empty) handle caches."""

    def _close_handles(self) -> None:
        """Close this process's handles."""

    def __getstate__(self) -> dict[str, Any]:
        return {k: self.__dict__[k] for k in self._pickled}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._reset()

    def close(self) -> None:
        """Close the files this process opened (inherited ones belong to the parent)."""
        if getattr(self, "_pid", None) == os.getpid():
            self._close_handles()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # interpreter shutdown: nothing left to close reliably
            pass

    # -------------------------------------------------------------------------------------------- the surface

    def __len__(self) -> int:
        """Number of rows (stored views)."""
        return self.manifest.num_rows

    def unit_of(self, row: int) -> int:
        """The unit holding ``row``.

        Raises:
            IndexError: for a row outside the cache.
        """
        if not 0 <= row < self.manifest.num_rows:
            raise IndexError(f"row {row} out of range: the cache has {self.manifest.num_rows} rows")
        return self.manifest.unit_of(row)

    def unit_notes(self) -> list[dict[str, Any]]:
        """Per-unit marker notes (``{}`` for a unit not written yet)."""
        return self._markers().read(self.manifest.num_units)

    def records(self) -> dict[str, np.ndarray]:
        """All per-view records, each an array over rows: a finalized cache's bulk arrays (memory-mapped locally,
        :mod:`._meta`), else gathered unit by unit."""
        if self.manifest.meta is not None and _meta.record_specs(self.manifest):
            return _meta.bulk_records(self.manifest.meta)
        return self._records_by_unit()

    def check_records(self) -> None:
        """Check the bulk record columns against the units' CRC-32s (``featcache verify``; they are mapped, not
        hashed, on open). Raises CacheError naming the column and unit that differ."""
        _meta.check_bulk_records(self.manifest, self.unit_notes())

    @abstractmethod
    def _records_by_unit(self) -> dict[str, np.ndarray]:
        """All per-view records, read from every unit (an unfinished cache, or FORMAT_VERSION 1)."""

    @abstractmethod
    def unit_records(self, unit: int) -> dict[str, np.ndarray]:
        """The per-view records of one unit's rows, as stored."""

    @abstractmethod
    def read_stored_row(self, row: int, names: list[str] | None = None) -> dict[str, np.ndarray]:
        """Stored (undecoded) arrays of one row, all of ``manifest["arrays"]`` or ``names``."""

    @abstractmethod
    def array_nbytes(self) -> dict[str, int]:
        """Bytes on disk of every stored array (what ``featcache info`` reports)."""

    def iter_stored_unit(self, unit: int, names: list[str] | None = None
                         ) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
        """Stream ``(row, stored arrays)`` over one unit; backends with a faster sequential read override it."""
        for row in self.manifest.unit_rows(unit):
            yield row, self.read_stored_row(row, names)

    def read_stored_unit(self, unit: int) -> dict[str, np.ndarray]:
        """Every stored array of one unit, stacked over its rows; an array some row lacks is left out, and nothing is
        returned when the rows read are not the unit's (what was read back is then compared with the note)."""
        rows = list(self.manifest.unit_rows(unit))
        got = dict(self.iter_stored_unit(unit))
        if sorted(got) != rows:
            return {}
        return {name: np.stack([got[r][name] for r in rows]) for name in self.manifest["arrays"]
                if all(name in got[r] for r in rows)}

    def unit_problem(self, unit: int, note: Mapping[str, Any]) -> str | None:
        """Why unit ``unit``, marked with ``note``, cannot be trusted: its marker does not fit the manifest, it cannot
        be read back, or what it reads back is not what was written (shapes, dtypes, CRC-32s). None when it can."""
        problem = _units.note_problem(self.manifest, unit, note)
        if problem:
            return problem
        try:
            stored, records = self.read_stored_unit(unit), self.unit_records(unit)
        except _units.StoreBusy:  # held by a live writer: not damaged, and not ours to redo
            raise
        except UNREADABLE as err:
            return f"it cannot be read back ({type(err).__name__}: {_one_line(err)})"
        return _units.unit_problem(self.manifest, unit, note, stored, records)

    def decode(self, stored: Mapping[str, np.ndarray], names: list[str] | None = None) -> dict[str, np.ndarray]:
        """Stored arrays of one row (or a batch of rows) -> logical float32 targets (only ``names`` if given)."""
        targets = self.manifest["targets"]
        out = {}
        for name in names or list(targets):
            if name not in self._encodings:
                self._encodings[name] = encoding(targets[name]["encoding"])
            out[name] = self._encodings[name].decode(name, stored, targets[name]["shape"])
        return out

    def read_row(self, row: int, names: list[str] | None = None) -> dict[str, np.ndarray]:
        """Decoded targets of one row (lossy codecs and top-k decoded to dense float32 arrays)."""
        return self.decode(self.read_stored_row(row, stored_names(self.manifest, names)), names)

    def iter_unit(self, unit: int, names: list[str] | None = None) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
        """Stream ``(row, targets)`` over one unit, decoded."""
        for row, stored in self.iter_stored_unit(unit, stored_names(self.manifest, names)):
            yield row, self.decode(stored, names)

    def iter_rows(self, rows: list[int] | None = None, names: list[str] | None = None
                  ) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
        """Stream ``(row, targets)`` over ``rows`` in that order, or over the whole cache unit by unit."""
        if rows is not None:
            for row in rows:
                yield row, self.read_row(row, names)
            return
        for unit in range(self.manifest.num_units):
            yield from self.iter_unit(unit, names)

    @abstractmethod
    def _load_manifest(self) -> Manifest | None:
        """The manifest stored at ``self.path``, None when there is none."""

    @abstractmethod
    def _markers(self) -> _units.Markers:
        """Where this cache keeps its unit markers."""

    @abstractmethod
    def _check_layout(self, notes: list[dict[str, Any]]) -> None:
        """What opening checks of the stored data: every file the marked units rely on is there (and opens), with
        the shape and dtype ``manifest["arrays"]`` gives.

        Raises:
            CacheError: naming the file and the fix.
        """


# Errors that reading a damaged unit raises (h5py and tarfile raise OSError/KeyError/ValueError subclasses; zarr
# and numcodecs ValueError/RuntimeError); a TypeError or AttributeError is a bug and propagates.
UNREADABLE = (OSError, ValueError, KeyError, IndexError, RuntimeError, EOFError, tarfile.TarError)


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split())[:200]


def check_arrays(manifest: Manifest, where: str) -> None:
    """The stored arrays the manifest lists are the ones its targets' encodings store (names, shapes, dtypes).

    Raises:
        CacheError: naming the array that differs.
    """
    want: dict[str, dict[str, Any]] = {}
    for name, target in manifest["targets"].items():
        spec = target.get("encoding")
        try:
            want.update(encoding(spec).arrays(name, list(target["shape"])))
        except (AttributeError, KeyError, TypeError, ValueError) as err:  # a spec lacking keys or of wrong types
            raise CacheError(f"cache {where!r}: targets.{name}.encoding {spec!r} is not an encoding featcache can "
                             f"read ({type(err).__name__}: {err}); the manifest is damaged or was edited: restore "
                             "it, or re-extract with --overwrite") from None
    have = manifest["arrays"]
    for name in sorted(set(want) | set(have)):
        w, h = want.get(name), have.get(name)
        if w is None or h is None or list(h.get("shape", [])) != list(w["shape"]) or h.get("dtype") != w["dtype"]:
            raise CacheError(f"cache {where!r}: manifest arrays.{name} is {_spec(h)}, but its targets store "
                             f"{_spec(w)}; the manifest is damaged or was edited: restore it, or re-extract with "
                             "--overwrite")


def _spec(spec: Mapping[str, Any] | None) -> str:
    return "absent" if spec is None else f"{spec.get('dtype')}{list(spec.get('shape', []))}"


WRITERS: Registry[type[StoreWriter]] = Registry("store format")
READERS: Registry[type[StoreReader]] = Registry("store format")


def detect_format(path: str | os.PathLike) -> str:
    """Guess a cache's backend from what lies on disk.

    Raises:
        CacheError: when nothing at ``path`` looks like a featcache cache.
    """
    path = location(path, "--cache")
    if (path / "zarr.json").is_file():
        return "zarr"
    if (path / "manifest.json").is_file() and any(path.glob("*.tar")):
        return "wds"
    if path.is_file() and path.suffix in (".h5", ".hdf5") or (path / "manifest.json").is_file() and any(
            path.glob("*.h5")):
        return "hdf5"
    manifest = _units.load_manifest_json(path / _units.MANIFEST_JSON)  # validated: a damaged one says so
    if manifest is not None:
        return str(manifest["storage"]["format"])
    raise CacheError(f"no featcache cache at {str(path)!r}: expected a Zarr group, tar shards or HDF5 files "
                     "(create one with `featcache extract --out PATH`)")


def open_reader(path: str | os.PathLike, format: str | None = None, require_complete: bool = True) -> StoreReader:
    """Open a cache for reading, whatever its backend.

    Raises:
        CacheError: when there is no cache at ``path``, or it is incomplete and ``require_complete`` is set.
    """
    reader = READERS.get(format or detect_format(path))(str(path))
    if require_complete and not reader.manifest.complete:
        raise CacheError(f"cache {str(path)!r} is incomplete; re-run the same `featcache extract` command to finish it")
    return reader


def create_writer(path: str | os.PathLike, manifest: Manifest, format: str = "zarr", overwrite: bool = False
                  ) -> StoreWriter:
    """Create (or reopen, for resume) a cache for writing in backend ``format``.

    Raises:
        CacheError: if a cache already exists at ``path`` whose identity differs from ``manifest``
            (the message names the differing keys; ``overwrite=True`` starts afresh).
    """
    return WRITERS.get(format)(str(path), manifest, overwrite=overwrite)
