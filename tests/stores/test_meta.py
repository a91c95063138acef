"""Per-sample metadata in bulk arrays (FORMAT_VERSION 2): round trips, refusals, and what a worker is shipped."""
from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest

from featcache.datasets import CachedViewDataset
from featcache.errors import CacheError
from featcache.manifest import FORMAT_VERSION, Manifest
from featcache.sources import source_from_manifest
from featcache.sources.base import SourceItem
from featcache.sources.packed import PackedItems, check_packed, pack_items, packed_file_list_sha256
from featcache.sources.subsets import file_list_sha256
from featcache.stores import create_writer, open_reader
from featcache.stores._meta import META_DIR, MetaArrays, write_arrays
from featcache.stores._units import FileMarkers
from featcache.testing.toystore import FORMATS
from featcache.views import default_recipe

ITEMS = [SourceItem("n01/ünïcødé 画像.JPEG", 3), SourceItem("a#b/c..d.png", 0), SourceItem("x", 999)]


def metadata_cache(root: Path, images: int, views: int = 4, fmt: str = "zarr",
                   relpath: str = "n{c:04d}/n{c:04d}_{i}.JPEG") -> Path:
    """A cache of ``images`` x ``views`` rows holding only metadata (no target arrays), written by the real writer."""
    items = [SourceItem(relpath.format(c=i % 10, i=i), i % 10) for i in range(images)]
    recipe = default_recipe(32)
    (root / "images").mkdir(parents=True, exist_ok=True)
    manifest = Manifest({
        "format_version": FORMAT_VERSION, "teacher": {"name": "none", "num_classes": 10}, "layers": [],
        "img_size": 32, "normalization": {"mean": [0.5] * 3, "std": [0.5] * 3, "interpolation": "bicubic"},
        "data": {"kind": "folder", "root": str(root / "images"), "classes": [f"c{c}" for c in range(10)],
                 "num_files": images, "sources": [[it.relpath, it.label] for it in items],
                 "file_list_sha256": file_list_sha256(items)},
        "subset": {"shots": None}, "views": {"count": views, "seed": 0, "recipe": recipe.to_dict(),
                                             "param_names": list(recipe.param_names)},
        "storage": {"format": fmt, "dtype": "fp16", "shard_size": 1000, "codec": "none", "topk": None},
        "targets": {}, "arrays": {}, "num_samples": images, "num_rows": images * views, "complete": False,
        "skipped": []})
    writer = create_writer(root / "cache", manifest, format=fmt)
    for unit in range(writer.manifest.num_units):
        span = writer.manifest.unit_rows(unit)
        rows = np.arange(span.start, span.stop)
        writer.write_unit(unit, {}, {"sample": rows // views, "view": rows % views, "label": rows // views % 10,
                                     "seed": rows, "params": np.zeros((len(rows), len(recipe.param_names))),
                                     "fingerprint": rows.astype(np.uint32), "valid": (rows % 7 != 3).astype(np.uint8)})
    writer.finalize()
    return root / "cache"


def test_packed_items_round_trip_non_ascii_and_empty(tmp_path):
    for items in (ITEMS, []):
        packed = pack_items(items)
        assert packed_file_list_sha256(packed) == file_list_sha256(items)
        specs = write_arrays(tmp_path, packed)
        back = PackedItems(MetaArrays(tmp_path, specs, tuple(specs)))
        assert list(back) == items and len(back) == len(items) and back[1:] == items[1:] and back[::-1] == items[::-1]
        check_packed(back.arrays, len(items), 1000, b"/#")
    assert all(np.load(p, allow_pickle=False).dtype != object for p in (tmp_path / META_DIR).iterdir())


@pytest.mark.parametrize("bad", ["../x.jpg", "a/../../b.jpg", "/etc/passwd", "a/..", "", "a\\b.jpg", "a\x00b",
                                 "s.tar#../m.jpg"])
def test_unsafe_paths_in_packed_items_are_refused(bad):
    with pytest.raises(CacheError, match="unsafe path"):
        check_packed(pack_items([*ITEMS, SourceItem(bad, 1)]), 4, 1000, b"/#")


def test_dotted_names_are_not_taken_for_parent_components():
    check_packed(pack_items([SourceItem("a/..b/c...jpg", 0), SourceItem("..x", 0), SourceItem("x..", 0)]), 3, 1, b"/")


@pytest.mark.parametrize("fmt", FORMATS)
def test_v2_cache_keeps_metadata_out_of_the_manifest(tmp_path, fmt):
    path = metadata_cache(tmp_path, 300, fmt=fmt)
    reader = open_reader(path)
    m = reader.manifest
    assert m["format_version"] == 2 and "sources" not in m["data"] and set(m["records"]) == {
        "sample", "view", "label", "seed", "params", "fingerprint", "valid"}
    assert len(json.dumps(dict(m))) < 12_000  # the recipe and settings, not 300 x 4 rows
    source = source_from_manifest(m)
    assert source.items[299].relpath == "n0009/n0009_299.JPEG" and source.items[299].label == 9
    rec = reader.records()
    np.testing.assert_array_equal(rec["valid"], (np.arange(1200) % 7 != 3).astype(np.uint8))
    np.testing.assert_array_equal(rec["sample"], np.arange(1200) // 4)


def test_tampered_metadata_array_is_refused(tmp_path):
    path = metadata_cache(tmp_path, 50)
    blob = path / META_DIR / "relpaths.npy"
    data = bytearray(blob.read_bytes())
    data[-1] ^= 1  # a changed path, same length: only the hash can tell
    blob.write_bytes(bytes(data))
    with pytest.raises(CacheError, match="relpaths.npy does not match the SHA-256"):
        source_from_manifest(open_reader(path).manifest)
    valid = path / META_DIR / "records.valid.npy"
    valid.write_bytes(valid.read_bytes()[:-1] + b"\x07")
    with pytest.raises(CacheError, match="records.valid.npy does not match"):
        open_reader(path).records()["valid"]


def test_path_escaping_the_root_in_the_arrays_is_refused(tmp_path):
    """The arrays hash correctly (the writer wrote them): only the path check stands between them and a read."""
    path = metadata_cache(tmp_path, 20, relpath="../n{c:04d}_{i}.JPEG")
    with pytest.raises(CacheError, match=r"unsafe path '\.\./n0000_0\.JPEG'"):
        source_from_manifest(open_reader(path).manifest)


def test_pickled_dataset_does_not_grow_with_the_cache(tmp_path):
    """A spawned worker gets the reader and the source by reference: a few KB, whatever the number of samples; it
    rebuilds the same row index from the cache."""
    sizes, manifests = {}, {}
    for images in (500, 4000):
        path = metadata_cache(tmp_path / str(images), images)
        reader = open_reader(path)
        m = reader.manifest
        ds = CachedViewDataset(reader, source_from_manifest(m), default_recipe(32), [], fingerprint_checks=0)
        blob = pickle.dumps(ds)
        sizes[images], manifests[images] = len(blob), (path / "zarr.json").stat().st_size
        worker = pickle.loads(blob)
        assert [int(worker.row_of(i)) for i in range(len(ds))] == [int(ds.row_of(i)) for i in range(len(ds))]
        np.testing.assert_array_equal(worker.labels, ds.labels)
        assert worker.source.items[images - 1] == ds.source.items[images - 1]
    assert sizes[4000] / 4000 < 3 and abs(sizes[4000] - sizes[500]) < 1000, sizes  # bytes per sample, growth
    assert abs(manifests[4000] - manifests[500]) < 1000, manifests


def test_rows_skip_invalid_views(tmp_path):
    reader = open_reader(metadata_cache(tmp_path, 40))
    ds = CachedViewDataset(reader, source_from_manifest(reader.manifest), default_recipe(32), [], max_views=2,
                           fingerprint_checks=0)
    valid = (np.arange(160) % 7 != 3).reshape(40, 4)[:, :2]
    assert len(ds) == int(valid.any(1).sum())
    for i, sample in enumerate(ds.samples):
        assert list(ds.rows_of(i)) == [sample * 4 + v for v in range(2) if valid[sample, v]]


def test_finalize_takes_the_bulk_records_from_the_units(tmp_path):
    """A complete cache resumed after a unit was lost gets bulk records of the unit as rewritten, not the old ones."""
    path = metadata_cache(tmp_path, 300)  # 1200 rows: units of 1000 and 200
    reader = open_reader(path)
    redone = {k: np.array(v) for k, v in reader.unit_records(1).items()}
    redone["valid"][:] = 0
    FileMarkers(path).clear(1)
    with pytest.warns(UserWarning, match="whose manifest says it is complete"):
        writer = create_writer(path, reader.manifest, format="zarr")
    writer.write_unit(1, {}, redone)
    writer.finalize()
    valid = open_reader(path).records()["valid"]
    assert valid[1000:].sum() == 0 and valid[:1000].sum() == (np.arange(1000) % 7 != 3).sum()


def test_changed_mapped_record_column_is_found_by_the_unit_crcs(tmp_path):
    path = metadata_cache(tmp_path, 300)
    open_reader(path).check_records()
    seeds = path / META_DIR / "records.seed.npy"
    data = bytearray(seeds.read_bytes())
    data[-8] ^= 1  # the last row's seed: mapped, so opening does not hash it
    seeds.write_bytes(bytes(data))
    reader = open_reader(path)
    assert reader.records()["seed"][-1] != 1199
    with pytest.raises(CacheError, match=r"records.seed.npy rows 1000-1199 do not match the CRC-32 unit 1's marker"):
        reader.check_records()
