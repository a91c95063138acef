"""Pieces shared by the directory backends (wds, hdf5): ``manifest.json`` beside the data files and one
completion marker per unit, written only after the unit's data is durable.

Layout::

    PATH/manifest.json                         the manifest (``complete`` flips to true in ``finalize``)
    PATH/_featcache/units/unit-{u:06d}.json    {"unit", "rows": [start, stop], "skipped": [...], ...backend keys}
"""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from ..manifest import Manifest, RECORD_DTYPES, diff_keys

from ..errors import CacheError

from ..durable import write_atomic

MARKER_RE = re.compile(r"^unit-(\d{6})\.json$")


def marker_dir(root: str | Path) -> Path:
    return Path(root) / "_featcache" / "units"


def read_manifest(root: str | Path) -> Manifest:
    path = Path(root) / "manifest.json"
    if not path.is_file():
        raise CacheError(f"no manifest.json in {str(root)!r}: not a featcache cache "
                         "(make one with `featcache extract`)")
    return Manifest.from_json(path.read_text())


def write_manifest(root: str | Path, manifest: Manifest) -> None:
    write_atomic(Path(root) / "manifest.json", manifest.to_json().encode())


def open_dir(root: str | Path, manifest: Manifest, format: str, overwrite: bool) -> Manifest:
    """Create the cache directory, or reopen it for resume after checking the identity matches.

    Raises:
        CacheError: naming the differing identity keys when an existing cache was made differently.
    """
    root = Path(root)
    manifest = manifest.copy()
    manifest.setdefault("storage", {})["format"] = format
    manifest["complete"] = False
    _check_is_cache_or_empty(root)
    if overwrite and root.exists():
        shutil.rmtree(root)
    if (root / "manifest.json").is_file():
        old = read_manifest(root)
        diff = diff_keys(old.identity(), manifest.identity())
        if diff:
            raise CacheError(f"cache {str(root)!r} was made with different settings ({', '.join(diff)}); use the same "
                             "options to resume, another --out, or --overwrite to start afresh")
        old["complete"] = False
        manifest = old
    marker_dir(root).mkdir(parents=True, exist_ok=True)
    write_manifest(root, manifest)
    return manifest


def _check_is_cache_or_empty(root: Path) -> None:
    # Never write into (or --overwrite) a directory that holds something else than a featcache cache.
    if root.is_file():
        raise CacheError(f"{str(root)!r} is a file; choose a directory for the cache")
    if root.is_dir() and not (root / "manifest.json").is_file() and {p.name for p in root.iterdir()} - {"_featcache"}:
        raise CacheError(f"{str(root)!r} exists and is not a featcache cache; choose another --out")


def completed_units(root: str | Path) -> dict[int, dict[str, Any]]:
    """Unit -> its marker contents, for every unit marked complete."""
    out = {}
    for path in sorted(marker_dir(root).glob("unit-*.json")):
        m = MARKER_RE.match(path.name)
        if m:
            out[int(m.group(1))] = json.loads(path.read_text())
    return out


def unit_notes(root: str | Path, manifest: Manifest) -> list[dict[str, Any]]:
    """Per-unit completion notes ({} for a unit not yet written), as the zarr reader reports them."""
    done = completed_units(root)
    return [done.get(u, {}) for u in range(manifest.num_units)]


def mark_unit(root: str | Path, manifest: Manifest, unit: int, skipped: list[str] | None, **extra: Any) -> None:
    rows = manifest.unit_rows(unit)
    marker = {"unit": unit, "rows": [rows.start, rows.stop], "skipped": list(skipped or []), **extra}
    write_atomic(marker_dir(root) / f"unit-{unit:06d}.json", json.dumps(marker, sort_keys=True).encode())


def finalize_dir(root: str | Path, manifest: Manifest) -> Manifest:
    """Check every unit is complete, fold skipped files into the manifest, mark it complete."""
    done = completed_units(root)
    missing = sorted(set(range(manifest.num_units)) - set(done))
    if missing:
        raise CacheError(f"cannot finalize {str(root)!r}: units {missing[:10]} of {manifest.num_units} are not written "
                         "yet; re-run the same `featcache extract` command to finish them")
    manifest = manifest.copy()
    manifest["skipped"] = sorted({s for m in done.values() for s in m.get("skipped", [])})
    manifest["complete"] = True
    write_manifest(root, manifest)
    return manifest


def unit_of(manifest: Manifest, row: int) -> int:
    if not 0 <= row < manifest.num_rows:
        raise IndexError(f"row {row} out of range: the cache has {manifest.num_rows} rows")
    return row // manifest.shard_size


def check_unit(manifest: Manifest, unit: int, arrays: Mapping[str, np.ndarray],
               records: Mapping[str, np.ndarray]) -> int:
    """Validate a unit's stored arrays and records against the manifest; return its row count.

    Raises:
        CacheError: naming the array whose name, shape or dtype does not match ``manifest["arrays"]``.
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
    missing = set(RECORD_DTYPES) - set(records)
    if missing:
        raise CacheError(f"unit {unit}: records {sorted(missing)} missing")
    return n


def record_arrays(records: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Records cast to their contract dtypes (``RECORD_DTYPES``)."""
    return {k: np.asarray(records[k], dtype=RECORD_DTYPES[k]) for k in RECORD_DTYPES}
