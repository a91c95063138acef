"""Backend specifics: each cache read by its plain library alone, wds member validation and shard splitting,
HDF5 part files."""
from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import zarr

from featcache.errors import CacheError
from featcache.stores import create_writer, open_reader
from featcache.stores.encodings import encode_targets
from featcache.stores.wds_store import parse_member
from featcache.stores.wds_stream import split_shards
from featcache.testing.toystore import toy_manifest, toy_records, toy_targets, unit_slice, write_toy


def _cache(tmp_path: Path, fmt: str, **kw):
    m = toy_manifest(fmt, **kw)
    targets, records = toy_targets(m), toy_records(m)
    write_toy(tmp_path / fmt, m, targets, records)
    return tmp_path / fmt, m, encode_targets(targets, m["storage"]), records


def _plain_zarr(path: Path, m) -> tuple[dict, dict]:
    group = zarr.open_group(str(path), mode="r")
    return ({n: group[n][:] for n in m["arrays"]}, {n: group[f"records/{n}"][:] for n in ("sample", "params")})


def _plain_wds(path: Path, m) -> tuple[dict, dict]:
    arrays = {n: [None] * m.num_rows for n in m["arrays"]}
    recs: dict[str, list] = {"sample": [None] * m.num_rows, "params": [None] * m.num_rows}
    k = json.loads((path / "manifest.json").read_text())["views"]["count"]
    for shard in sorted(path.glob("shard-*.tar")):
        with tarfile.open(shard) as tar:
            for info in tar:
                key, array, ext = info.name.split(".", 2)
                row = int(key[1:10]) * k + int(key.split("_v")[1])
                data = tar.extractfile(info).read()
                if ext == "json":
                    rec = json.loads(data)
                    recs["sample"][row], recs["params"][row] = rec["sample"], rec["params"]
                else:
                    assert ext == "npy"
                    arrays[array][row] = np.load(io.BytesIO(data), allow_pickle=False)
    return {n: np.stack(v) for n, v in arrays.items()}, {n: np.asarray(v) for n, v in recs.items()}


def _plain_hdf5(path: Path, m) -> tuple[dict, dict]:
    arrays = {n: np.zeros((m.num_rows, *s["shape"]), s["dtype"]) for n, s in m["arrays"].items()}
    recs = {"sample": np.zeros(m.num_rows, "int64"), "params": np.zeros((m.num_rows, 3))}
    for part in sorted(path.glob("part-*.h5")):
        with h5py.File(part, "r") as f:
            for unit in np.flatnonzero(f["units"][:]):  # the units this part holds
                sl = slice(unit * m.shard_size, min((unit + 1) * m.shard_size, m.num_rows))
                for n in arrays:
                    arrays[n][sl] = f[n][sl]
                for n in recs:
                    recs[n][sl] = f[f"records/{n}"][sl]
    return arrays, recs


@pytest.mark.parametrize("fmt,plain", [("zarr", _plain_zarr), ("wds", _plain_wds), ("hdf5", _plain_hdf5)])
def test_plain_library_reads(tmp_path, fmt, plain):
    path, m, stored, records = _cache(tmp_path, fmt, topk=4)
    arrays, recs = plain(path, m)
    for n, v in stored.items():
        assert arrays[n].dtype == v.dtype and arrays[n].tobytes() == v.tobytes(), n
    np.testing.assert_array_equal(recs["sample"], records["sample"])
    np.testing.assert_array_equal(recs["params"], records["params"])


def _plant(shard: Path, name: str, data: bytes = b"\x80\x04K\x01.") -> None:
    with tarfile.open(shard, "a") as tar:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))


@pytest.mark.parametrize("member", ["s000000000_v0000.evil.pyd", "s000000000_v0000.block_0.pickle",
                                    "s000000000_v0000.block_0.pth", "../x", "s000000000_v0000/../../x.npy",
                                    "/etc/passwd", "notakey.block_0.npy", "s000000000_v0000.other.npy"])
def test_wds_refuses_planted_members(tmp_path, member):
    path, m, _, _ = _cache(tmp_path, "wds")
    _plant(path / "shard-000000.tar", member)
    reader = open_reader(path)
    with pytest.raises(CacheError, match="member|unsafe path"):
        reader.read_row(0)
    with pytest.raises(CacheError, match="member|unsafe path"):
        list(reader.iter_rows())
    reader.read_row(m.num_rows - 1)  # other shards stay readable


def test_wds_refuses_links(tmp_path):
    path, _, _, _ = _cache(tmp_path, "wds")
    with tarfile.open(path / "shard-000001.tar", "a") as tar:
        info = tarfile.TarInfo("s000000001_v0002.block_9.npy")
        info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(info)
    with pytest.raises(CacheError, match="regular file|not in the manifest"):
        open_reader(path).read_row(5)


def test_parse_member_messages():
    m = toy_manifest("wds")
    assert parse_member("s000000002_v0001.block_0.npy", m) == (7, "block_0", "npy")
    with pytest.raises(CacheError, match=r"\.pyd/\.pickle/\.pth members are refused"):
        parse_member("s000000002_v0001.block_0.pyd", m)


def test_wds_shards_split_across_nodes_and_workers(tmp_path):
    path, m, _, _ = _cache(tmp_path, "wds", samples=8, views=2, shard_size=2)  # 8 shards
    reader = open_reader(path)
    seen = []
    for rank in range(2):
        stream = reader.iterable_dataset(names=["logits"], rank=rank, world_size=2, shuffle_shards=True, seed=3)
        loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=2)
        seen += [int(row) for row, _ in loader]
    assert sorted(seen) == list(range(m.num_rows))
    assert split_shards(list(range(8)), 1, 2, 1, 2) == [3, 7]
    with pytest.raises(CacheError, match="cannot feed"):
        split_shards([0, 1, 2], 0, 2, 0, 2)


def test_wds_temp_shards_never_final(tmp_path):
    m = toy_manifest("wds")
    writer = create_writer(tmp_path / "c", m, format="wds")
    assert not list((tmp_path / "c").glob("*.tar"))
    stored, records = encode_targets(toy_targets(m), m["storage"]), toy_records(m)
    writer.write_unit(1, unit_slice(m, stored, 1), unit_slice(m, records, 1))
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == ["_featcache", "manifest.json", "shard-000001.tar"]


def test_hdf5_resume_writes_a_new_part(tmp_path):
    m = toy_manifest("hdf5")
    targets, records = toy_targets(m), toy_records(m)
    write_toy(tmp_path / "c", m, targets, records, units=[0, 1], finalize=False)
    write_toy(tmp_path / "c", m, targets, records, units=[1, 2, 3], finalize=True)  # unit 1 re-written
    assert sorted(p.name for p in (tmp_path / "c").glob("*.h5")) == ["part-000.h5", "part-001.h5"]
    reader = open_reader(tmp_path / "c")
    assert reader.unit_files == {0: "part-000.h5", 1: "part-001.h5", 2: "part-001.h5", 3: "part-001.h5"}
    np.testing.assert_array_equal(reader.records()["seed"], records["seed"])


def test_wds_shards_are_reproducible(tmp_path):
    m = toy_manifest("wds", codec="blosc-zstd:3:shuffle")
    for name in ("a", "b"):
        write_toy(tmp_path / name, m, toy_targets(m), toy_records(m))
    for shard in sorted((tmp_path / "a").glob("*.tar")):
        assert shard.read_bytes() == (tmp_path / "b" / shard.name).read_bytes()


@pytest.mark.parametrize("fmt", ["wds", "hdf5"])
def test_refuses_foreign_directory(tmp_path, fmt):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("precious")
    with pytest.raises(CacheError, match="not a featcache cache"):
        create_writer(tmp_path / "mine", toy_manifest(fmt), format=fmt, overwrite=True)
    assert (tmp_path / "mine" / "thesis.tex").read_text() == "precious"


@pytest.mark.parametrize("fmt,debris", [("wds", ".shard-000001.tar.tmp"), ("hdf5", "part-001.h5")])
def test_debris_of_a_killed_writer_is_ignored(tmp_path, fmt, debris):
    """A kill mid-unit leaves a torn temp tar / HDF5 part without a marker: resume redoes that unit."""
    m = toy_manifest(fmt)
    targets, records = toy_targets(m), toy_records(m)
    write_toy(tmp_path / "c", m, targets, records, units=[0], finalize=False)
    (tmp_path / "c" / debris).write_bytes(b"\x00torn" * 100)
    writer = create_writer(tmp_path / "c", m, format=fmt)
    assert writer.completed_units() == {0}
    stored = encode_targets(targets, m["storage"])
    for u in range(1, m.num_units):
        writer.write_unit(u, unit_slice(m, stored, u), unit_slice(m, records, u))
    writer.finalize()
    reader = open_reader(tmp_path / "c")
    for row in range(m.num_rows):
        assert reader.read_stored_row(row)["block_0"].tobytes() == stored["block_0"][row].tobytes()


def test_no_code_path_unpickles():
    """Static guard: nothing in the package imports pickle or asks numpy/torch to unpickle."""
    import featcache

    banned = ("import pickle", "from pickle", "allow_pickle=True", "weights_only=False", "cloudpickle", "import dill")
    root = Path(featcache.__file__).parent
    hits = [f"{p.relative_to(root)}: {b}" for p in root.rglob("*.py") for b in banned if b in p.read_text()]
    assert not hits, hits
