"""Durable writes: atomic replace leaves the old or the new file, fsync walks trees, disk usage counts bytes."""
import os

from featcache.durable import disk_bytes, fsync_path, write_atomic


def test_write_atomic_replaces_and_leaves_no_temp(tmp_path):
    target = tmp_path / "manifest.json"
    write_atomic(target, b"old")
    write_atomic(target, b"new contents")
    assert target.read_bytes() == b"new contents"
    assert sorted(os.listdir(tmp_path)) == ["manifest.json"]


def test_fsync_path_and_disk_bytes_walk_a_tree(tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "a" / "x.bin").write_bytes(b"1234")
    (tmp_path / "a" / "b" / "y.bin").write_bytes(b"123456")
    fsync_path(tmp_path)  # must not raise on nested directories
    fsync_path(tmp_path / "a" / "x.bin")
    assert disk_bytes(tmp_path) == 10 and disk_bytes(tmp_path / "a" / "x.bin") == 4
    assert disk_bytes(tmp_path / "missing") == 0
