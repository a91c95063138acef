"""Unit bookkeeping shared by the backends: markers, claiming a directory, identity, finalize, unit validation."""
from __future__ import annotations

import json

import numpy as np
import pytest

from featcache.errors import CacheError
from featcache.stores import _units as U
from featcache.stores import create_writer
from featcache.stores.encodings import encode_targets
from featcache.stores.zarr_store import ZarrMarkers, markers_of
from featcache.testing.toystore import FORMATS, toy_manifest, toy_records, toy_targets, unit_slice, write_toy


def test_note_is_sorted_json_and_names_its_unit():
    m = toy_manifest("wds")  # 15 rows, units of 4
    note = U.unit_note(m, 3, ["b.png", "a.png"], file="shard-000003.tar")
    assert note == {"unit": 3, "rows": [12, 15], "skipped": ["a.png", "b.png"], "file": "shard-000003.tar"}
    assert U.note_json(note) == json.dumps(note, sort_keys=True)
    assert U.parse_note(U.note_json(note), 3) == note
    for text in ("", '{"unit": 3, "ro', '{"unit": 2}', "[3]"):  # empty, torn, another unit's, not a note
        assert U.parse_note(text, 3) == {}
    assert U.completed([{}, note, {}, {"unit": 3}]) == {1, 3}


def test_file_markers_round_trip(tmp_path):
    markers = U.FileMarkers(tmp_path)
    markers.dir.mkdir(parents=True)
    markers.write(1, {"unit": 1, "rows": [4, 8], "skipped": []})
    markers.path(2).write_text('{"unit": 2, "rows"')  # torn: only unit 2 is redone
    assert markers.read(3) == [{}, {"unit": 1, "rows": [4, 8], "skipped": []}, {}]
    assert sorted(p.name for p in markers.dir.iterdir()) == ["unit-000001.json", "unit-000002.json"]


@pytest.mark.parametrize("fmt", FORMATS)
def test_markers_are_one_file_per_unit(tmp_path, fmt):
    """Every backend marks a unit with its own file, so writers of disjoint units never write the same file."""
    m = toy_manifest(fmt)
    write_toy(tmp_path / "c", m, toy_targets(m), toy_records(m), units=[0, 2], finalize=False)
    assert sorted(p.name for p in U.FileMarkers(tmp_path / "c").dir.iterdir()) == ["unit-000000.json",
                                                                                   "unit-000002.json"]
    notes = U.FileMarkers(tmp_path / "c").read(m.num_units)
    assert [n.get("unit") for n in notes] == [0, None, 2, None] and notes[2]["skipped"] == ["bad_2.png"]
    assert not isinstance(markers_of(tmp_path / "c"), ZarrMarkers)


def test_claim_refuses_files_and_foreign_directories(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(CacheError, match="is a file"):
        U.claim(tmp_path / "file", overwrite=True)
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "notes.txt").write_text("keep")
    with pytest.raises(CacheError, match="not a featcache cache"):
        U.claim(tmp_path / "foreign", overwrite=True)
    (tmp_path / "ours" / U.OWN_DIR).mkdir(parents=True)
    U.claim(tmp_path / "ours", overwrite=False)
    assert (tmp_path / "ours").exists()
    U.claim(tmp_path / "ours", overwrite=True)
    assert not (tmp_path / "ours").exists() and (tmp_path / "foreign" / "notes.txt").exists()
    U.claim(tmp_path / "empty-or-absent", overwrite=False)


def test_identity_and_finalize(tmp_path):
    m = toy_manifest("wds")
    U.check_identity(tmp_path, m, m.copy())
    other = toy_manifest("wds", views=2, dtype="fp32")
    with pytest.raises(CacheError, match=r"storage\.dtype, views\.count differ.*--overwrite"):
        U.check_identity(tmp_path, m, other)
    notes = [U.unit_note(m, u, [f"s{u}"]) for u in range(m.num_units)]
    done = U.finalized(tmp_path, m, notes)
    assert done.complete and done["skipped"] == ["s0", "s1", "s2", "s3"] and not m.complete
    with pytest.raises(CacheError, match=r"units \[1, 3\] of 4 are not written"):
        U.finalized(tmp_path, m, [notes[0], {}, notes[2], {}])


def test_check_unit_names_the_bad_part():
    m = toy_manifest("hdf5", codec="int8")
    stored, records = encode_targets(toy_targets(m), m["storage"]), toy_records(m)
    arrays, recs = unit_slice(m, stored, 3), unit_slice(m, records, 3)
    assert U.check_unit(m, 3, arrays, recs) == 3  # the last unit is short
    with pytest.raises(CacheError, match="out of range"):
        U.check_unit(m, 4, arrays, recs)
    with pytest.raises(CacheError, match="block_0__scale"):
        U.check_unit(m, 3, {k: v for k, v in arrays.items() if k != "block_0__scale"}, recs)
    with pytest.raises(CacheError, match="'block_2' is float32"):
        U.check_unit(m, 3, dict(arrays, block_2=arrays["block_2"].astype(np.float32)), recs)
    with pytest.raises(CacheError, match=r"records \['seed'\] missing"):
        U.check_unit(m, 3, arrays, {k: v for k, v in recs.items() if k != "seed"})
    with pytest.raises(CacheError, match="record 'label' has"):
        U.check_unit(m, 3, arrays, dict(recs, label=recs["label"][:2]))
    assert {k: v.dtype.name for k, v in U.record_arrays(dict(recs, view=[0, 1, 2])).items()}["view"] == "int32"


def test_publish_renames_durably(tmp_path):
    tmp = tmp_path / ".x.tmp"
    tmp.write_bytes(b"data")
    U.publish(tmp, tmp_path / "x")
    assert not tmp.exists() and (tmp_path / "x").read_bytes() == b"data"


@pytest.mark.parametrize("fmt", FORMATS)
def test_writer_surface_is_the_base_one(tmp_path, fmt):
    """Resume, measured errors and finalize go through the base writer for every backend."""
    m = toy_manifest(fmt)
    write_toy(tmp_path / "c", m, toy_targets(m), toy_records(m), units=[0, 1, 2, 3], finalize=False)
    writer = create_writer(tmp_path / "c", m, format=fmt)
    assert writer.completed_units() == {0, 1, 2, 3} and not writer.manifest.complete
    writer.record_measured_error({"block_0": {"rel_l2": 0.5, "max_abs": 1.0, "rows": 15}})
    final = writer.finalize()
    assert final["targets"]["block_0"]["measured_error"]["rel_l2"] == 0.5 and final["storage"]["format"] == fmt
    assert create_writer(tmp_path / "c", m, format=fmt).manifest == final  # a complete cache reopens untouched
