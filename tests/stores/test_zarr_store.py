"""Zarr backend specifics: plain-zarr readability, the pread fast path vs zarr-python, markers, damage handling."""
from __future__ import annotations

import json
import os
import warnings

import numpy as np
import pytest
import zarr

from featcache.errors import CacheError
from featcache.stores import create_writer, open_reader
from featcache.stores.encodings import encode_targets
from featcache.stores.zarr_store import ZarrReader, read_manifest
from featcache.testing.toystore import toy_manifest, toy_records, toy_targets, write_toy


def _write(tmp_path, codec="none", dtype="fp16", units=None, finalize=True, **kw):
    m = toy_manifest("zarr", dtype=dtype, codec=codec, **kw)
    path = tmp_path / "cache"
    targets, records = toy_targets(m), toy_records(m)
    write_toy(path, m, targets, records, units=units, finalize=finalize)
    return path, m, encode_targets(targets, m["storage"]), records


def test_plain_zarr_reads_everything(tmp_path):
    path, m, stored, records = _write(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "not recognized as a component" warnings from our extra files
        g = zarr.open_group(str(path), mode="r")
        members = dict(g.members(max_depth=None))
    manifest = g.attrs["featcache"]
    assert manifest["complete"] and manifest["num_rows"] == 15 and manifest["skipped"] == [f"bad_{u}" + ".png"
                                                                                          for u in range(4)]
    for name, value in stored.items():
        arr = members[name]
        assert arr.shape == value.shape and arr.chunks == (1, *value.shape[1:])
        assert arr.shards == (m.shard_size, *value.shape[1:])
        np.testing.assert_array_equal(arr[:], value)
    for name, value in records.items():
        np.testing.assert_array_equal(members[f"records/{name}"][:], value)
    assert members["_featcache"].shape == (0,)  # declared an array so that zarr does not list the markers below it
    notes = [json.loads((path / "_featcache" / "units" / f"unit-{u:06d}.json").read_text()) for u in range(4)]
    assert [n["unit"] for n in notes] == [0, 1, 2, 3] and notes[3]["rows"] == [12, 15]


@pytest.mark.parametrize("codec", ["none", "zstd:5", "blosc-zstd:3:bitshuffle", "int8+zstd"])
def test_fast_reader_equals_zarr_python(tmp_path, codec):
    path, m, stored, _ = _write(tmp_path, codec=codec)
    reader = ZarrReader(str(path))
    for name in m["arrays"]:
        assert reader._array_layout(name).fast, name  # every layout we write takes the pread path
    for row in range(m.num_rows):
        fast, ref = reader.read_stored_row(row), reader.read_row_zarr(row)
        for name, value in stored.items():
            assert fast[name].dtype == ref[name].dtype == value.dtype
            np.testing.assert_array_equal(fast[name], ref[name])
            np.testing.assert_array_equal(fast[name], value[row])


def test_unknown_layout_falls_back_to_zarr_python(tmp_path):
    path, m, stored, _ = _write(tmp_path)
    meta_path = path / "block_0" / "zarr.json"
    meta = json.loads(meta_path.read_text())
    meta["codecs"][0]["configuration"]["codecs"][0]["configuration"]["endian"] = "big"
    meta_path.write_text(json.dumps(meta))  # now the stored bytes read as big-endian: zarr must decode them
    reader = ZarrReader(str(path))
    assert not reader._array_layout("block_0").fast
    got = reader.read_stored_row(3)["block_0"]
    np.testing.assert_array_equal(got, reader.read_row_zarr(3)["block_0"])
    assert not np.array_equal(got, stored["block_0"][3])


def test_partial_cache_and_resume_markers(tmp_path):
    path, m, stored, records = _write(tmp_path, units=[1, 3], finalize=False)
    assert not read_manifest(path)["complete"]
    reader = open_reader(path, require_complete=False)
    assert [bool(n) for n in reader.unit_notes()] == [False, True, False, True]
    np.testing.assert_array_equal(reader.read_stored_row(13)["block_0"], stored["block_0"][13])
    with pytest.raises(CacheError, match="missing"):
        reader.read_stored_row(0)
    writer = create_writer(path, m)
    assert writer.completed_units() == {1, 3}


def test_torn_marker_counts_as_not_done(tmp_path):
    path, m, _, _ = _write(tmp_path, units=[0, 1], finalize=False)
    (path / "_featcache" / "units" / "unit-000001.json").write_text('{"unit": 1, "ro')
    assert create_writer(path, m).completed_units() == {0}


def test_interrupted_creation_starts_afresh(tmp_path):
    path, m, _, _ = _write(tmp_path, units=[0], finalize=False)
    meta = json.loads((path / "zarr.json").read_text())
    del meta["attributes"]["featcache"]  # as if killed before the manifest was written (always written last)
    (path / "zarr.json").write_text(json.dumps(meta))
    assert create_writer(path, m).completed_units() == set()


def test_refuses_foreign_directory(tmp_path):
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "thesis.tex").write_text("precious")
    with pytest.raises(CacheError, match="not a featcache cache"):
        create_writer(tmp_path / "cache", toy_manifest("zarr"), overwrite=True)
    assert (tmp_path / "cache" / "thesis.tex").exists()


def test_truncated_shard_is_reported(tmp_path):
    path, m, _, _ = _write(tmp_path)
    shard = path / "block_2" / "c" / "1" / "0" / "0"
    shard.write_bytes(shard.read_bytes()[:-10])
    reader = open_reader(path)
    with pytest.raises(CacheError, match="block_2"):
        reader.read_stored_row(5)
    reader.read_stored_row(0)  # other shards are fine


def test_forked_reader_reopens_files(tmp_path):
    path, m, stored, _ = _write(tmp_path)
    reader = open_reader(path)
    reader.read_row(0)  # opens shard 0 in the parent
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: must not reuse the parent's descriptors
        ok = np.array_equal(reader.read_stored_row(1)["block_0"], stored["block_0"][1]) and reader._pid == os.getpid()
        os.write(w, b"1" if ok else b"0")
        os._exit(0)
    os.waitpid(pid, 0)
    assert os.read(r, 1) == b"1"


def test_a_unit_of_zeros_has_no_shard_but_reads_and_verifies_as_zeros(tmp_path):
    """zarr writes no chunk equal to the fill value: a unit whose views were all skipped (targets zeroed) leaves no
    shard. Its note says so; a lost shard of any other unit is still an error."""
    m = toy_manifest("zarr", dtype="fp32")
    path = tmp_path / "cache"
    targets = toy_targets(m)
    rows = m.unit_rows(1)
    for value in targets.values():
        value[rows.start:rows.stop] = 0
    write_toy(path, m, targets, toy_records(m))
    name = next(iter(m["arrays"]))
    assert not (path / name / "c" / "1" / "0" / "0").exists() and (path / name / "c" / "0" / "0" / "0").exists()
    reader = open_reader(path)  # strict: every marked unit's shards checked
    assert reader.unit_notes()[1]["fill_only"] == sorted(m["arrays"])
    for row in (rows.start, rows.stop - 1):
        assert all(not np.any(v) for v in reader.read_row(row).values())
    np.testing.assert_array_equal(reader.read_row(0)[name], open_reader(path).read_row_zarr(0)[name])
    (path / name / "c" / "0" / "0" / "0").unlink()
    with pytest.raises(CacheError, match="shard .* of marked unit 0 is missing"):
        open_reader(path)
