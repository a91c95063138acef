"""Unit bookkeeping every backend shares: claiming a directory, validating a unit, marking it, resuming, finalizing.

A unit (``shard_size`` consecutive rows) is written whole by one writer, made durable, and only then *marked*: its
marker note ``{"unit", "rows": [start, stop], "skipped": [...], ...backend keys}`` is what resume counts and what
``finalize`` folds into the manifest. A marker that cannot be parsed, or names another unit, counts as absent, so a
torn marker only makes its own unit be redone. Every backend keeps them as :class:`FileMarkers`, one file per unit,
``PATH/_featcache/units/unit-{u:06d}.json`` (wds and hdf5 beside ``PATH/manifest.json``, :class:`JsonManifestLayout`),
so processes writing disjoint units never write the same file. Zarr caches written before that keep them in a string
array, one JSON note per chunk (:class:`~.zarr_store.ZarrMarkers`), read and resumed as they are.

Every writer creates ``PATH/_featcache/`` first, so a directory holding it is a featcache cache (or an interrupted
creation of one) and may be resumed or replaced; any other non-empty directory is refused.

Nothing is claimed that cannot be read back. A note also records the CRC-32 of every array and record the unit
holds (``crc32``) and the digest of the manifest's seal (``seal``); before a resume relies on a unit an earlier run
wrote, the unit is read back and checked against its note (:func:`unit_problem`), and a unit that fails is un-marked
and redone. A reader checks every note against the manifest when it opens a cache (:func:`check_markers`).
"""
from __future__ import annotations

import errno
import json
import os
import re
import shutil
import zlib
from abc import ABC, abstractmethod
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np

from ..durable import fsync_path
from ..errors import CacheError, FeatcacheError
from ..manifest import RECORD_DTYPES, Manifest, check_manifest, diff_keys
from ..storage import ObjectPath, is_local, location, read_many, rmtree, sync_path, write_atomic

OWN_DIR = "_featcache"
MANIFEST_JSON = "manifest.json"


# ------------------------------------------------------------------------------------------------ markers

class Markers(ABC):
    """Where a cache keeps its unit markers."""

    @abstractmethod
    def read(self, num_units: int) -> list[dict[str, Any]]:
        """The note of every unit, ``{}`` where the unit is not (validly) marked."""

    @abstractmethod
    def write(self, unit: int, note: Mapping[str, Any]) -> None:
        """Mark ``unit`` durably (its data must already be durable)."""

    @abstractmethod
    def clear(self, unit: int) -> None:
        """Un-mark ``unit`` durably (its data cannot be trusted; it will be redone)."""


class FileMarkers(Markers):
    """One JSON file per unit, replaced atomically: ``_featcache/units/unit-{u:06d}.json`` (one object per unit
    on object storage, fetched concurrently)."""

    def __init__(self, root: str | os.PathLike | ObjectPath) -> None:
        self.dir = location(root) / OWN_DIR / "units"

    def path(self, unit: int) -> Path | ObjectPath:
        """The marker file of ``unit``."""
        return self.dir / f"unit-{unit:06d}.json"

    def read(self, num_units: int) -> list[dict[str, Any]]:
        texts = read_many([self.path(u) for u in range(num_units)])
        return [parse_note(_text(raw), u) for u, raw in enumerate(texts)]

    def write(self, unit: int, note: Mapping[str, Any]) -> None:
        write_atomic(self.path(unit), note_json(note).encode())

    def clear(self, unit: int) -> None:
        self.path(unit).unlink(missing_ok=True)
        sync_path(self.dir)


def _text(raw: bytes | None) -> str:
    try:
        return raw.decode("utf-8") if raw else ""
    except UnicodeDecodeError:  # foreign bytes: no marker
        return ""


def unit_note(manifest: Manifest, unit: int, skipped: list[str] | None, **extra: Any) -> dict[str, Any]:
    """The marker note of a written unit; ``extra`` holds backend keys (which file holds it)."""
    rows = manifest.unit_rows(unit)
    return {"unit": unit, "rows": [rows.start, rows.stop], "skipped": sorted(skipped or []), **extra}


def note_json(note: Mapping[str, Any]) -> str:
    """A note as stored: sorted keys, so markers are byte-identical however the unit was produced."""
    return json.dumps(note, sort_keys=True)


def parse_note(text: str, unit: int) -> dict[str, Any]:
    """A stored note, or ``{}`` when it is empty, torn or names another unit."""
    try:
        note = json.loads(text) if text else {}
    except ValueError:
        return {}
    return note if isinstance(note, dict) and note.get("unit") == unit else {}


def completed(notes: list[dict[str, Any]]) -> set[int]:
    """Units whose note is present."""
    return {u for u, note in enumerate(notes) if note}


def unit_crc32(arrays: Mapping[str, np.ndarray], records: Mapping[str, np.ndarray]) -> dict[str, int]:
    """CRC-32 of the bytes of every stored array and record of a unit (``records/<name>`` for records)."""
    named = {**arrays, **{f"records/{k}": v for k, v in records.items()}}
    return {name: zlib.crc32(np.ascontiguousarray(named[name]).data) for name in sorted(named)}


# ------------------------------------------------------------------------------------------------ integrity

class StoreBusy(CacheError):
    """A file of the cache is held by a running writer (HDF5's file lock): nothing is wrong with it, so a resume
    must not redo its units; the message says to wait."""


def note_problem(manifest: Manifest, unit: int, note: Mapping[str, Any]) -> str | None:
    """Why a unit's marker does not fit the manifest (None when it does)."""
    rows = manifest.unit_rows(unit)
    if note.get("rows") != [rows.start, rows.stop]:
        return (f"its marker covers rows {note.get('rows')}, but the manifest puts rows [{rows.start}, {rows.stop}] "
                "there")
    seal = manifest.seal_digest()
    if "seal" in note and note["seal"] != seal:
        return f"its marker was written under another manifest (seal {note['seal']}, the manifest's is {seal})"
    return None


def unit_problem(manifest: Manifest, unit: int, note: Mapping[str, Any], stored: Mapping[str, np.ndarray],
                 records: Mapping[str, np.ndarray]) -> str | None:
    """Why a unit read back (``stored`` arrays and ``records``, each [rows, ...]) does not match its marker note."""
    n = len(manifest.unit_rows(unit))
    for name, spec in manifest["arrays"].items():
        value, want = stored.get(name), (n, *spec["shape"])
        if value is None or value.shape != want or value.dtype != np.dtype(spec["dtype"]):
            got = "missing" if value is None else f"{value.dtype}{list(value.shape)}"
            return f"array {name!r} reads back {got}, expected {spec['dtype']}{list(want)}"
    if any(np.shape(records.get(k))[:1] != (n,) for k in RECORD_DTYPES):
        return f"its records do not cover its {n} rows"
    crc = note.get("crc32")
    if crc is not None and not isinstance(crc, dict):
        return f"its marker's crc32 is {type(crc).__name__}, not a mapping of CRC-32s"
    if crc is not None:
        now = unit_crc32(stored, record_arrays(records))
        bad = sorted(k for k in set(crc) | set(now) if crc.get(k) != now.get(k))
        if bad:
            return f"{', '.join(bad)} read back other bytes than were written (CRC-32 mismatch)"
    return None


def check_markers(root: Path, manifest: Manifest, notes: list[dict[str, Any]]) -> None:
    """What a reader checks on open: every marker fits the manifest, and a complete cache has every unit marked.

    Raises:
        CacheError: naming the unit and the fix.
    """
    for unit, note in enumerate(notes):
        problem = note and note_problem(manifest, unit, note)
        if problem:
            raise CacheError(f"cache {str(root)!r}, unit {unit}: {problem}; the manifest was edited or the cache is "
                             "damaged: restore the manifest, or re-extract with --overwrite")
    missing = [u for u, note in enumerate(notes) if not note]
    if manifest.complete and missing:
        raise CacheError(f"cache {str(root)!r} says it is complete, but units {missing[:10]} of {len(notes)} have no "
                         "completion marker (an edited manifest, or a cache copied in part); re-run the same "
                         "`featcache extract` command to write them")


def read_json(path: Path) -> Any:
    """The JSON document in ``path``.

    Raises:
        CacheError: when it is not valid JSON (one line naming the file).
    """
    try:
        return json.loads(path.read_bytes())
    except (ValueError, UnicodeDecodeError) as err:
        raise CacheError(f"{path} is not valid JSON ({err}); the cache is damaged: re-extract it with "
                         "--overwrite") from None


def load_manifest_json(path: Path) -> Manifest | None:
    """A ``manifest.json`` (None if there is none), validated by :func:`~featcache.manifest.check_manifest`.

    Raises:
        CacheError: when the file is not JSON, or not a valid manifest.
    """
    return check_manifest(read_json(path), str(path)) if path.is_file() else None


# ------------------------------------------------------------------------------------------------ disk full

DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
_DISK_FULL_TEXT = re.compile(r"errno = (28|122)\b|No space left on device|Disk quota exceeded")


def is_disk_full(err: BaseException) -> bool:
    """True when ``err`` (or an error it was raised from) says the disk or quota is full; h5py only says so in
    its message text."""
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if getattr(err, "errno", None) in DISK_FULL or _DISK_FULL_TEXT.search(str(err)):
            return True
        err = err.__cause__ or err.__context__
    return False


@contextmanager
def disk_errors(root: Path) -> Iterator[None]:
    """Turn a full disk, whatever library hit it, into one :class:`CacheError` naming the cache and the fix.

    Anything else propagates untouched (a bug keeps its traceback).
    """
    try:
        yield
    except FeatcacheError:
        raise
    except Exception as err:
        if not is_disk_full(err):
            raise
        if not is_local(root):  # a local staging file of an upload filled the temp disk
            raise CacheError(f"disk full while staging a shard of {str(root)!r} in the local temp directory; free "
                             "space there (or point TMPDIR elsewhere), then re-run the same command") from None
        where = next((p for p in (root, *root.parents) if p.exists()), Path("/"))
        free = shutil.disk_usage(where).free
        raise CacheError(f"disk full while writing the cache {str(root)!r} ({free / 2**20:.1f} MiB left on its "
                         "filesystem); free space there or choose another --out, then re-run the same command: the "
                         "units already written are kept") from None


# Temp files of killed writers: ours (".<name>.tmp-<token>", ".<name>.<token>.tmp", with durable.temp_token()'s
# "<pid>-<hex>") and zarr-python's ("<key>.<uuid4 hex>.partial").
_DEBRIS = re.compile(r"^\..+\.tmp(-[0-9a-f-]+)?$|\.[0-9a-f]{32}\.partial$")


def sweep_debris(root: Path) -> list[Path]:
    """Delete the temp files killed writers left under ``root`` (called when the cache is finalized, when no unit is
    being written); returns what was deleted. Object stores have none: a PUT leaves no temp object behind."""
    if not is_local(root):
        return []
    debris = [p for p in root.rglob("*") if _DEBRIS.search(p.name) and p.is_file()]
    for p in debris:
        p.unlink(missing_ok=True)
    return debris


# ------------------------------------------------------------------------------------------------ lifecycle

def claim(root: Path, overwrite: bool) -> None:
    """Make ``root`` ours to write: refuse a file or a foreign directory; with ``overwrite``, delete our cache there.

    Raises:
        CacheError: when ``root`` is a file or a non-empty directory that is not a featcache cache.
    """
    if root.is_file():
        raise CacheError(f"{str(root)!r} is a file; choose a directory for the cache")
    if root.is_dir() and not (root / OWN_DIR).is_dir() and any(root.iterdir()):
        raise CacheError(f"{str(root)!r} exists and is not a featcache cache; choose another --out")
    if overwrite and root.exists():
        rmtree(root)


def check_identity(root: Path, existing: Manifest, wanted: Manifest) -> None:
    """Refuse to continue a cache made with different settings.

    Raises:
        CacheError: naming the differing identity keys and the three ways out.
    """
    keys = diff_keys(existing.identity(), wanted.identity())
    if keys:
        raise CacheError(f"cache {str(root)!r} was made with different settings ({', '.join(keys)} differ); re-run "
                         "with the original options to resume it, choose another --out, or pass --overwrite to start "
                         "afresh")


def finalized(root: Path, manifest: Manifest, notes: list[dict[str, Any]]) -> Manifest:
    """The complete manifest: every unit must be marked; the files their notes skipped are folded in.

    Raises:
        CacheError: naming the units not written yet.
    """
    missing = [u for u, note in enumerate(notes) if not note]
    if missing:
        raise CacheError(f"cannot finalize {str(root)!r}: units {missing[:10]} of {len(notes)} are not written yet; "
                         "re-run the same `featcache extract` command to finish them")
    out = manifest.copy()
    out["skipped"] = sorted({s for note in notes for s in note.get("skipped", [])})
    out["complete"] = True
    return out


def publish(tmp: Path, final: Path) -> None:
    """Give a fully written temp file its final name durably: the data, then the rename itself."""
    fsync_path(tmp)
    os.replace(tmp, final)
    fsync_path(final)  # the file again (cheap: clean) and, what matters, its directory entry


# ------------------------------------------------------------------------------------------------ validation

def check_unit(manifest: Manifest, unit: int, arrays: Mapping[str, np.ndarray],
               records: Mapping[str, np.ndarray]) -> int:
    """Validate a unit's stored arrays and records against the manifest; return its row count.

    Raises:
        CacheError: naming the array or record whose name, shape or dtype does not match the manifest.
    """
    if not 0 <= unit < manifest.num_units:
        raise CacheError(f"unit {unit} out of range: the cache has {manifest.num_units} units")
    n = len(manifest.unit_rows(unit))
    specs = manifest["arrays"]
    if set(arrays) != set(specs):
        raise CacheError(f"unit {unit}: got arrays {sorted(arrays)}, manifest['arrays'] lists {sorted(specs)}")
    for name, value in arrays.items():
        want = (n, *specs[name]["shape"])
        if value.shape != want or value.dtype != np.dtype(specs[name]["dtype"]):
            raise CacheError(f"unit {unit}: array {name!r} is {value.dtype}{list(value.shape)}, "
                             f"expected {specs[name]['dtype']}{list(want)}")
    _check_records(unit, n, records)
    return n


def _check_records(unit: int, n: int, records: Mapping[str, np.ndarray]) -> None:
    missing = set(RECORD_DTYPES) - set(records)
    if missing:
        raise CacheError(f"unit {unit}: records {sorted(missing)} missing")
    for name in RECORD_DTYPES:
        if np.shape(records[name])[:1] != (n,):
            raise CacheError(f"unit {unit}: record {name!r} has {np.shape(records[name])[:1]} rows, expected {n}")


def record_arrays(records: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Records cast to their contract dtypes (``RECORD_DTYPES``), in contract order."""
    return {k: np.asarray(records[k], dtype=RECORD_DTYPES[k]) for k in RECORD_DTYPES}


# ------------------------------------------------------------------------------------------------ json layout

class JsonManifestLayout:
    """``manifest.json`` beside the data plus :class:`FileMarkers`: what the wds and hdf5 readers share.

    A mixin for backends that set ``self.path``; :class:`JsonManifestWriter` adds the writing side.
    """

    path: Path

    def _load_manifest(self) -> Manifest | None:
        return load_manifest_json(self.path / MANIFEST_JSON)

    def _markers(self) -> Markers:
        return FileMarkers(self.path)


class JsonManifestWriter(JsonManifestLayout):
    """The writing side of :class:`JsonManifestLayout` (the wds and hdf5 writers)."""

    def _save_manifest(self, manifest: Manifest) -> None:
        write_atomic(self.path / MANIFEST_JSON, manifest.to_json().encode())

    def _create(self, manifest: Manifest) -> None:
        FileMarkers(self.path).dir.mkdir(parents=True, exist_ok=True)  # first: marks the directory as ours
        self._save_manifest(manifest)
