"""Caches written by featcache v0.1 (before the re-layout) still open, verify and read, in every backend.

``tests/fixtures/v0_1`` holds one tiny extraction per backend (``tests/fixtures/make_v0_1_caches.py``: a random-init
4-block ViT teacher saved as ``teacher.safetensors``, 6 images x 2 views, fp32, units of 4 rows) and the images it was
made from. Each test works on
a copy, so nothing here can change the fixture.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from featcache.convert import convert
from featcache.info import cache_info
from featcache.errors import CacheError
from featcache.manifest import FORMAT_VERSION
from featcache.sources import source_from_manifest
from featcache.stores import create_writer, detect_format, open_reader
from featcache.stores.zarr_store import ZarrMarkers
from featcache.verify import verify_cache

FIXTURES = Path(__file__).parent / "fixtures" / "v0_1"
FORMATS = ("zarr", "wds", "hdf5")
TARGETS = {"block_0": [17, 48], "block_1": [17, 48], "block_3": [17, 48], "logits": [3]}


@pytest.fixture
def legacy(tmp_path) -> Path:
    """A private copy of the fixtures: the caches and the images they were extracted from."""
    shutil.copytree(FIXTURES, tmp_path / "v0_1")
    return tmp_path / "v0_1"


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("fmt", FORMATS)
def test_legacy_cache_opens_and_reads(legacy, fmt):
    path = legacy / f"cache_{fmt}"
    assert detect_format(path) == fmt
    reader = open_reader(path)
    m = reader.manifest
    assert m["format_version"] == 1 < FORMAT_VERSION and m.complete and len(reader) == 12 and m.num_units == 3
    assert {n: t["shape"] for n, t in m["targets"].items()} == TARGETS
    rec = reader.records()
    np.testing.assert_array_equal(rec["sample"], np.repeat(np.arange(6), 2))
    assert (rec["valid"] == 1).all() and rec["params"].shape == (12, len(m["views"]["param_names"]))
    rows = [reader.read_row(r) for r in range(len(reader))]
    for row in rows:
        assert {n: list(v.shape) for n, v in row.items()} == TARGETS
        assert all(v.dtype == np.float32 and np.isfinite(v).all() for v in row.values())
    streamed = dict(reader.iter_rows())
    for r, row in enumerate(rows):
        for name, value in row.items():
            np.testing.assert_array_equal(streamed[r][name], value)
    assert [bool(n) for n in reader.unit_notes()] == [True, True, True]


def test_legacy_backends_hold_the_same_values(legacy):
    readers = {fmt: open_reader(legacy / f"cache_{fmt}") for fmt in FORMATS}
    for row in range(12):
        want = readers["zarr"].read_stored_row(row)
        for fmt in ("wds", "hdf5"):
            got = readers[fmt].read_stored_row(row)
            assert {k: v.tobytes() for k, v in got.items()} == {k: v.tobytes() for k, v in want.items()}, (fmt, row)


@pytest.mark.parametrize("fmt", FORMATS)
def test_legacy_cache_verifies_against_its_images(legacy, fmt):
    result = verify_cache(str(legacy / f"cache_{fmt}"), samples=12, device="cpu", data_root=str(legacy / "data"),
                          checkpoint=str(legacy / "teacher.safetensors"))
    assert result["ok"] and len(result["rows"]) == 12 and not result["fingerprint_mismatches"], result
    assert all(t["rel"] < 1e-5 for t in result["targets"].values())


@pytest.mark.parametrize("fmt", FORMATS)
def test_legacy_cache_info(legacy, fmt):
    info = cache_info(str(legacy / f"cache_{fmt}"), measure=0)
    assert info["complete"] and info["units_done"] == info["num_units"] == 3 and info["format"] == fmt
    assert info["arrays"]["block_3"]["shape"] == [12, 17, 48] and all(a["bytes"] > 0 for a in info["arrays"].values())


INTEGRITY = ("seal", "crc32")  # keys today's writers add to manifests and unit markers (docs/FORMAT.md, Integrity)


def _plain(doc):
    """A manifest or marker note without the integrity keys v0.1 did not write, a format 2 manifest in format 1's
    terms (its sources inline, no bulk records: they are compared as files, :func:`_meta_as_v1`)."""
    out = {k: v for k, v in doc.items() if k not in INTEGRITY + ("records",)}
    if "data" in out:
        out["format_version"] = 1
        out["data"] = {k: v for k, v in out["data"].items() if k not in ("items", "sources")}
    return out


def _json_tree(tree: dict[str, bytes]) -> dict[str, object]:
    """Files as compared across versions: JSON files (manifest, markers) parsed and stripped of integrity keys, the
    format 2 metadata arrays left out (:func:`_meta_as_v1` compares them)."""
    return {k: _plain(json.loads(v)) if k.endswith(".json") else v for k, v in tree.items()
            if not k.startswith("_featcache/meta/")}


def _meta_as_v1(new: Path, old: Path) -> None:
    """A converted cache's bulk arrays hold what its format 1 source kept inline and per unit."""
    got, want = open_reader(new), open_reader(old)
    src = source_from_manifest(got.manifest, root=old.parent / "data")
    assert [[it.relpath, it.label] for it in src.items] == want.manifest["data"]["sources"]
    for name, values in want.records().items():
        np.testing.assert_array_equal(got.records()[name], values)


def _hdf5_content(root: Path) -> dict[str, object]:
    """An HDF5 cache as h5py reads it: every dataset's bytes and the manifest attribute of the part holding each
    unit (v0.1 parts were written with libver="latest", today's with a kill-safe superblock, so the files differ)."""
    import h5py

    out = {k: v for k, v in _json_tree(_tree(root)).items() if not k.endswith(".h5")}
    for part in sorted(root.glob("part-*.h5")):
        with h5py.File(part, "r") as f:
            f.visititems(lambda name, d: out.__setitem__(name, d[()].tobytes()) if name != "units" and
                         isinstance(d, h5py.Dataset) else None)
            out["manifest attribute"] = _plain(json.loads(f.attrs["manifest"]))
    return out


def test_todays_writers_reproduce_the_legacy_bytes(legacy):
    """Rewriting the v0.1 zarr cache as wds and hdf5 gives the v0.1 wds and hdf5 caches' data byte for byte (and wds
    back to zarr differs only in the manifest's key order in zarr.json): the layout on disk did not change. Manifests
    and unit markers gain only the integrity keys (``seal``, ``crc32``); HDF5 parts are compared as h5py reads them,
    since today's are written with a superblock that survives a kill."""
    convert(legacy / "cache_zarr", legacy / "w", "wds", progress=False)
    convert(legacy / "cache_zarr", legacy / "h", "hdf5", progress=False)
    convert(legacy / "cache_wds", legacy / "z", "zarr", progress=False)
    assert _json_tree(_tree(legacy / "w")) == _json_tree(_tree(legacy / "cache_wds"))
    assert _hdf5_content(legacy / "h") == _hdf5_content(legacy / "cache_hdf5")
    for new, old in (("w", "cache_zarr"), ("h", "cache_zarr"), ("z", "cache_wds")):
        _meta_as_v1(legacy / new, legacy / old)
    z, old = _tree(legacy / "z"), _tree(legacy / "cache_zarr")
    data = [k for k in old if k != "zarr.json" and not k.startswith("_featcache/")]  # markers: compared as notes
    assert sorted(k for k in z if k != "zarr.json" and not k.startswith("_featcache/")) == sorted(data)
    assert sorted(k for k in z if k.startswith("_featcache/units/")) == [f"_featcache/units/unit-{u:06d}.json"
                                                                           for u in range(3)]
    assert {k: z[k] for k in data} == {k: old[k] for k in data}
    meta, old_meta = json.loads(z["zarr.json"]), json.loads(old["zarr.json"])
    meta["attributes"]["featcache"] = _plain(meta["attributes"]["featcache"])
    old_meta["attributes"]["featcache"] = _plain(old_meta["attributes"]["featcache"])
    assert meta == old_meta
    notes = [open_reader(legacy / name).unit_notes() for name in ("z", "cache_zarr")]
    assert [_plain(n) for n in notes[0]] == notes[1]


def test_legacy_cache_is_not_resumed_by_a_newer_format(legacy):
    """An unfinished format 1 cache is refused before anything is written, naming the fixes (its units and format 2's
    bulk metadata would mix two layouts); a complete one still converts to format 2."""
    path = legacy / "cache_zarr"
    before = _tree(path)
    reader = open_reader(path)
    ZarrMarkers(path).clear(1)
    with pytest.raises(CacheError, match=r"cache format 1, this featcache writes format 2; re-extract it with "
                                         r"--overwrite.*featcache convert"):
        create_writer(path, reader.manifest, format="zarr")
    after = _tree(path)
    assert {k: after[k] for k in before if k != "_featcache/units/c/1"} == {k: before[k] for k in before
                                                                             if k != "_featcache/units/c/1"}
