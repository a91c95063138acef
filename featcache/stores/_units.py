"""Unit bookkeeping every backend shares: claiming a directory, validating a unit, marking it, resuming, finalizing.

A unit (``shard_size`` consecutive rows) is written whole by one writer, made durable, and only then *marked*: its
marker note ``{"unit", "rows": [start, stop], "skipped": [...], ...backend keys}`` is what resume counts and what
``finalize`` folds into the manifest. A marker that cannot be parsed, or names another unit, counts as absent, so a
torn marker only makes its own unit be redone. Where markers live is the backend's choice:

    zarr       ``PATH/_featcache/units``: a string array, one JSON note per chunk (:class:`~.zarr_store.ZarrMarkers`)
    wds, hdf5  ``PATH/_featcache/units/unit-{u:06d}.json``, one file per unit, beside ``PATH/manifest.json``
               (:class:`FileMarkers`, :class:`JsonManifestLayout`)

Every writer creates ``PATH/_featcache/`` first, so a directory holding it is a featcache cache (or an interrupted
creation of one) and may be resumed or replaced; any other non-empty directory is refused.
"""
from __future__ import annotations

import json
import os
import shutil
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from ..durable import fsync_path, write_atomic
from ..errors import CacheError
from ..manifest import RECORD_DTYPES, Manifest, diff_keys

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


class FileMarkers(Markers):
    """One JSON file per unit, replaced atomically: ``_featcache/units/unit-{u:06d}.json``."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.dir = Path(root) / OWN_DIR / "units"

    def path(self, unit: int) -> Path:
        """The marker file of ``unit``."""
        return self.dir / f"unit-{unit:06d}.json"

    def read(self, num_units: int) -> list[dict[str, Any]]:
        paths = [self.path(u) for u in range(num_units)]
        return [parse_note(p.read_text() if p.is_file() else "", u) for u, p in enumerate(paths)]

    def write(self, unit: int, note: Mapping[str, Any]) -> None:
        write_atomic(self.path(unit), note_json(note).encode())


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
        shutil.rmtree(root)


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
        path = self.path / MANIFEST_JSON
        return Manifest.from_json(path.read_text()) if path.is_file() else None

    def _markers(self) -> Markers:
        return FileMarkers(self.path)


class JsonManifestWriter(JsonManifestLayout):
    """The writing side of :class:`JsonManifestLayout` (the wds and hdf5 writers)."""

    def _save_manifest(self, manifest: Manifest) -> None:
        write_atomic(self.path / MANIFEST_JSON, manifest.to_json().encode())

    def _create(self, manifest: Manifest) -> None:
        FileMarkers(self.path).dir.mkdir(parents=True, exist_ok=True)  # first: marks the directory as ours
        self._save_manifest(manifest)
