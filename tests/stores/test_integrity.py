"""The integrity pieces the stores share: the manifest seal, manifest validation, unit CRC-32s, marker clearing,
the disk-full translation and the sweep of killed writers' temp files."""
from __future__ import annotations

import errno

import numpy as np
import pytest

from featcache.errors import CacheError, ConfigError
from featcache.manifest import Manifest, check_manifest, seal_entries
from featcache.stores import _units as U
from featcache.stores import create_writer
from featcache.testing.toystore import FORMATS, toy_manifest, toy_records, toy_targets, write_toy


def test_seal_names_entries_and_leaves_out_what_may_change():
    m = toy_manifest("wds")
    seal = seal_entries(m)
    assert {"layers", "num_rows", "teacher.name", "data.kind", "targets.block_0", "storage.dtype"} <= set(seal)
    assert not {"complete", "skipped", "data.root", "seal"} & set(seal)
    moved = m.copy()
    moved.update(complete=True, skipped=["x.png"])
    moved["data"]["root"] = "/elsewhere"
    moved["targets"]["block_0"]["measured_error"] = {"rel_l2": 0.1}
    assert seal_entries(moved) == seal
    moved["teacher"]["num_classes"] = 7
    assert [k for k in seal if seal[k] != seal_entries(moved)[k]] == ["teacher.num_classes"]


def test_sealed_manifest_round_trips_and_checks():
    m = toy_manifest("hdf5").sealed()
    assert m.seal_digest() and Manifest.from_json(m.to_json()).seal_digest() == m.seal_digest()
    assert check_manifest(Manifest.from_json(m.to_json()), "here") == m
    assert toy_manifest("hdf5").seal_digest() is None
    with pytest.raises(CacheError, match="here holds a JSON list, not a featcache manifest"):
        check_manifest([1, 2], "here")
    bad = m.copy()
    bad["layers"] = [0, 1]
    with pytest.raises(CacheError, match=r"^here: block targets \['block_0', 'block_2'\] do not match layers \[0, "
                                         r"1\]; the manifest is damaged or was edited"):
        check_manifest(bad, "here")


def test_unit_crc32_covers_arrays_and_records():
    arrays = {"b": np.arange(6, dtype=np.float16).reshape(2, 3), "a": np.zeros((2, 1), np.int8)}
    records = {"sample": np.array([0, 1], np.int64)}
    crc = U.unit_crc32(arrays, records)
    assert list(crc) == ["a", "b", "records/sample"]
    assert crc == U.unit_crc32({k: v.copy() for k, v in arrays.items()}, records)
    arrays["b"][1, 2] = 9
    assert U.unit_crc32(arrays, records)["b"] != crc["b"]


@pytest.mark.parametrize("fmt", FORMATS)
def test_markers_clear_one_unit(tmp_path, fmt):
    m = toy_manifest(fmt)
    write_toy(tmp_path / "c", m, toy_targets(m), toy_records(m), finalize=False)
    markers = U.FileMarkers(tmp_path / "c")  # every backend's, one file per unit
    markers.clear(2)
    assert [bool(n) for n in markers.read(m.num_units)] == [True, True, False, True]
    assert create_writer(tmp_path / "c", m, format=fmt).completed_units() == {0, 1, 3}


def test_notes_carry_crc_and_seal(tmp_path):
    m = toy_manifest("wds")
    writer = write_toy(tmp_path / "c", m, toy_targets(m), toy_records(m), finalize=False)
    note = U.FileMarkers(tmp_path / "c").read(m.num_units)[1]
    assert note["seal"] == writer.manifest.seal_digest() and set(note["crc32"]) >= {"block_0", "records/seed"}
    assert U.note_problem(writer.manifest, 1, note) is None
    assert "rows" in U.note_problem(writer.manifest, 2, dict(note, unit=2))
    assert "another manifest" in U.note_problem(writer.manifest, 1, dict(note, seal="0" * 16))


@pytest.mark.parametrize("err", [OSError(errno.ENOSPC, "No space left on device"),
                                 OSError(errno.EDQUOT, "Disk quota exceeded"),
                                 RuntimeError("Can't write data (file write failed: ..., errno = 28, error message = "
                                              "'No space left on device', ...)")])
def test_disk_full_becomes_one_cache_error(tmp_path, err):
    with pytest.raises(CacheError, match=r"^disk full while writing the cache '.*/c' \(.* MiB left on its "
                                         r"filesystem\); free space there or choose another --out") as got:
        with U.disk_errors(tmp_path / "c"):
            raise err
    assert "\n" not in str(got.value) and got.value.__suppress_context__


@pytest.mark.parametrize("err", [OSError(errno.EACCES, "Permission denied"), ValueError("a bug"),
                                 ConfigError("a user error with its own message")])
def test_other_errors_pass_through(tmp_path, err):
    with pytest.raises(type(err)) as got:
        with U.disk_errors(tmp_path):
            raise err
    assert got.value is err


def test_sweep_debris_removes_only_temp_files(tmp_path):
    keep = ["manifest.json", "shard-000001.tar", "part-000.h5", "block_0/c/1/0/0", "_featcache/units/unit-000001.json"]
    debris = [".shard-000002.tar.4242-0a1b2c3d.tmp", ".manifest.json.tmp-4242-9f8e7d6c", ".part.tmp-17-00ff00ff",
              "_featcache/units/.unit-000003.json.tmp-9-12345678", ".shard-000001.tar.tmp",
              "block_0/c/2/0/0.0123456789abcdef0123456789abcdef.partial",
              "zarr.0123456789abcdef0123456789abcdef.partial"]
    for name in keep + debris:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    assert sorted(str(p.relative_to(tmp_path)) for p in U.sweep_debris(tmp_path)) == sorted(debris)
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file()) == sorted(keep)
