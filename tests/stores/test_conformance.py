"""One conformance suite, run against every registered store backend (zarr, wds, hdf5)."""
from __future__ import annotations

from multiprocessing.reduction import ForkingPickler

import numpy as np
import pytest
import torch

from featcache.errors import CacheError
from featcache.stores import create_writer, open_reader
from featcache.stores.encodings import decode_targets, encode_targets
from featcache.testing.toystore import (FORMATS, RowDataset, snapshot, toy_manifest, toy_records, toy_targets,
                                        unit_slice, write_toy)

SETTINGS = [("fp16", "none", None), ("bf16", "blosc-zstd:5:bitshuffle", 5), ("fp32", "int8+zstd", None)]


@pytest.fixture(params=FORMATS)
def fmt(request) -> str:
    return request.param


def _toy(tmp_path, fmt, dtype="fp16", codec="none", topk=None):
    m = toy_manifest(fmt, dtype=dtype, codec=codec, topk=topk)
    return tmp_path / f"cache_{fmt}", m, toy_targets(m), toy_records(m)


def _assert_same(a: dict, b: dict) -> None:
    assert set(a) == set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert a[k].tobytes() == b[k].tobytes(), k


@pytest.mark.parametrize("dtype,codec,topk", SETTINGS)
def test_round_trip(tmp_path, fmt, dtype, codec, topk):
    path, m, targets, records = _toy(tmp_path, fmt, dtype, codec, topk)
    write_toy(path, m, targets, records)
    reader = open_reader(path)
    stored = encode_targets(targets, m["storage"])
    for row in range(m.num_rows):
        _assert_same(reader.read_stored_row(row), {k: v[row] for k, v in stored.items()})
    decoded = decode_targets(stored, m)
    for row, got in reader.iter_rows():
        _assert_same(got, {k: v[row] for k, v in decoded.items()})
    assert [r for r, _ in reader.iter_rows(rows=[4, 1])] == [4, 1]
    _assert_same(reader.read_row(7, ["block_2"]), {"block_2": decoded["block_2"][7]})
    got = reader.records()
    for k, v in records.items():
        np.testing.assert_array_equal(got[k], v)


def test_manifest_round_trip(tmp_path, fmt):
    path, m, targets, records = _toy(tmp_path, fmt, codec="zstd:5", topk=4)
    write_toy(path, m, targets, records)
    got = open_reader(path).manifest
    assert got.identity() == m.identity() and got["targets"] == m["targets"] and got["arrays"] == m["arrays"]
    assert got.complete and got.num_rows == m.num_rows
    assert got["skipped"] == sorted(f"bad_{u}.png" for u in range(m.num_units))
    assert open_reader(path, format=fmt).manifest == got


def test_resume_and_incomplete(tmp_path, fmt):
    path, m, targets, records = _toy(tmp_path, fmt)
    write_toy(path, m, targets, records, units=[0, 2], finalize=False)
    with pytest.raises(CacheError, match="incomplete"):
        open_reader(path)
    partial = open_reader(path, require_complete=False)
    assert not partial.manifest.complete
    writer = create_writer(path, m, format=fmt)
    assert writer.completed_units() == {0, 2}
    with pytest.raises(CacheError, match="not written"):
        writer.finalize()
    stored = encode_targets(targets, m["storage"])
    for u in sorted(set(range(m.num_units)) - {0, 2}):
        writer.write_unit(u, unit_slice(m, stored, u), unit_slice(m, records, u))
    writer.finalize()
    reader = open_reader(path)
    for row in range(m.num_rows):
        _assert_same(reader.read_stored_row(row), {k: v[row] for k, v in stored.items()})


def test_identity_mismatch_names_keys(tmp_path, fmt):
    path, m, targets, records = _toy(tmp_path, fmt)
    write_toy(path, m, targets, records, units=[0], finalize=False)
    other = toy_manifest(fmt, dtype="fp32")
    with pytest.raises(CacheError, match=r"storage\.dtype"):
        create_writer(path, other, format=fmt)
    assert create_writer(path, other, format=fmt, overwrite=True).completed_units() == set()


def test_reader_is_read_only(tmp_path, fmt):
    path, m, targets, records = _toy(tmp_path, fmt, codec="zstd")
    write_toy(path, m, targets, records)
    before = snapshot(path)
    reader = open_reader(path)
    list(reader.iter_rows())
    reader.records(), reader.read_row(3)
    del reader
    assert snapshot(path) == before


def _check_loader(dataset, expected: list[dict], context: str) -> None:
    loader = torch.utils.data.DataLoader(dataset, batch_size=None, shuffle=False, num_workers=2,
                                         multiprocessing_context=context)
    items = list(loader)
    assert len(items) == len(expected)
    for item, want in zip(items, expected):
        for k, v in want.items():
            np.testing.assert_array_equal(np.asarray(item[k]), v)


def test_pickled_reader_in_forked_workers(tmp_path, fmt):
    path, m, targets, records = _toy(tmp_path, fmt)
    write_toy(path, m, targets, records)
    fresh = ForkingPickler.loads(ForkingPickler.dumps(open_reader(path)))  # pickled before any use
    reader = open_reader(path)
    expected = [{"row": r, **reader.read_row(r)} for r in range(m.num_rows)]  # handles now open in this process
    _check_loader(RowDataset(fresh), expected, "fork")
    clone = ForkingPickler.loads(ForkingPickler.dumps(reader))
    _assert_same(clone.read_row(5), {k: v for k, v in expected[5].items() if k != "row"})
    _check_loader(RowDataset(clone), expected, "fork")
    _check_loader(RowDataset(reader), expected, "fork")  # inherited handles are dropped, not shared


def test_spawned_workers_every_backend(tmp_path):
    """spawn pickles each reader into the workers; one loader over all backends keeps the test cheap."""
    datasets, expected = [], []
    for fmt in FORMATS:
        path, m, targets, records = _toy(tmp_path, fmt)
        write_toy(path, m, targets, records)
        reader = open_reader(path)
        expected += [{"row": r, **reader.read_row(r)} for r in range(m.num_rows)]
        datasets.append(RowDataset(reader))
    _check_loader(torch.utils.data.ConcatDataset(datasets), expected, "spawn")


def test_bad_unit_is_refused(tmp_path, fmt):
    path, m, targets, records = _toy(tmp_path, fmt)
    writer = create_writer(path, m, format=fmt)
    stored = unit_slice(m, encode_targets(targets, m["storage"]), 0)
    stored["block_0"] = stored["block_0"][:, :2]
    with pytest.raises((CacheError, ValueError), match="block_0"):
        writer.write_unit(0, stored, unit_slice(m, records, 0))


def test_reader_surface(tmp_path, fmt):
    """Every backend offers the whole base surface: unit streaming, notes, sizes, range checks, close and reopen."""
    path, m, targets, records = _toy(tmp_path, fmt, codec="int8+zstd", topk=4)
    write_toy(path, m, targets, records)
    reader = open_reader(path)
    assert [n["rows"] for n in reader.unit_notes()] == [[0, 4], [4, 8], [8, 12], [12, 15]]
    sizes = reader.array_nbytes()
    assert set(sizes) == set(m["arrays"]) and all(v > 0 for v in sizes.values())
    streamed = list(reader.iter_unit(3, ["block_2"]))
    assert [r for r, _ in streamed] == [12, 13, 14]
    for row, got in streamed:
        _assert_same(got, reader.read_row(row, ["block_2"]))
    stored = dict(reader.iter_stored_unit(1, ["logits__topk_values"]))
    assert list(stored) == [4, 5, 6, 7] and set(stored[5]) == {"logits__topk_values"}
    with pytest.raises(IndexError, match="out of range"):
        reader.read_stored_row(m.num_rows)
    reader.close()
    _assert_same(reader.read_row(2), decode_targets({k: v[2] for k, v in encode_targets(targets, m["storage"]).items()},
                                                    m))
