"""Cache locations: plain paths and file:// stay local, object-store URLs go through fsspec, anything else is refused
before a byte is written (it used to become a local folder ``./s3:/bucket/c``)."""
from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest

from featcache import storage
from featcache.config import ExtractConfig, TrainConfig
from featcache.errors import ConfigError, FeatcacheError
from featcache.stores import create_writer, open_reader
from featcache.stores.encodings import encode_targets
from featcache.testing.faults import tree_bytes
from featcache.testing.toystore import toy_manifest, toy_records, toy_targets, write_toy

REFUSED = ["gopher://x", "ftp://host/c", "s3:/bucket/c", "s3:bucket", "http://host/c", "hdfs://nn/c", "S4://b/c",
           "simplecache::gopher://x", "nocache::s3://b/c", "simplecache::caches/c", "memory://", "s3://"]


@pytest.mark.parametrize("spec", REFUSED)
def test_unsupported_locations_are_refused_in_one_line_and_write_nothing(tmp_path, monkeypatch, spec):
    monkeypatch.chdir(tmp_path)
    m = toy_manifest("zarr")
    with pytest.raises(ConfigError) as err:
        create_writer(spec, m, format="zarr")
    assert "\n" not in str(err.value) and spec in str(err.value)
    with pytest.raises(ConfigError):
        ExtractConfig(data="d", out=spec).validate()
    with pytest.raises(FeatcacheError):
        open_reader(spec)
    assert list(tmp_path.iterdir()) == []  # the bug this guards: ./s3:/bucket/c


def test_plain_paths_and_file_urls_are_local_paths(tmp_path):
    assert storage.location("caches/c") == Path("caches/c")
    assert storage.location("./a:b") == Path("a:b")
    assert storage.location(f"file://{tmp_path}/c") == tmp_path / "c"
    remote = storage.location("simplecache::s3://bucket/c")
    assert isinstance(remote, storage.ObjectPath) and remote.target_url() == "s3://bucket/c"
    assert str(remote / "a/b.json") == "simplecache::s3://bucket/c/a/b.json"
    assert pickle.loads(pickle.dumps(remote / "x")) == remote / "x"
    assert storage.same_location("s3://bucket/c", "blockcache::s3://bucket/c/")


def test_a_file_url_cache_is_the_plain_path_cache_byte_for_byte(tmp_path):
    m = toy_manifest("wds")
    targets, records = toy_targets(m), toy_records(m)
    write_toy(tmp_path / "plain", m, targets, records)
    write_toy(f"file://{tmp_path}/url", m, targets, records)
    assert tree_bytes(tmp_path / "plain") == tree_bytes(tmp_path / "url")


def test_hdf5_and_the_run_directory_must_be_local():
    with pytest.raises(ConfigError, match="HDF5 cache .* must be a local path.*--format zarr or --format wds"):
        create_writer("memory://h5/c", toy_manifest("hdf5"), format="hdf5")
    with pytest.raises(ConfigError, match="run directory"):
        TrainConfig(cache="s3://bucket/c", out="s3://bucket/run").validate()
    with pytest.raises(ConfigError, match="cache layer .* is for reading"):
        ExtractConfig(data="d", out="simplecache::s3://bucket/c").validate()
    with pytest.raises(ConfigError, match="cache layer .* is for reading"):
        create_writer("simplecache::memory://c", toy_manifest("zarr"), format="zarr")


@pytest.mark.parametrize("fmt", ["zarr", "wds"])
def test_memory_cache_reads_back_what_a_local_cache_holds(tmp_path, fmt):
    m = toy_manifest(fmt, codec="zstd:3")
    targets, records = toy_targets(m), toy_records(m)
    write_toy(tmp_path / "local", m, targets, records)
    url = f"memory://featcache-test/{fmt}-{os.getpid()}"
    write_toy(url, m, targets, records)
    local, remote = open_reader(tmp_path / "local"), open_reader(url)
    assert dict(remote.manifest) == dict(local.manifest)
    for row in range(m.num_rows):
        a, b = remote.read_stored_row(row), local.read_stored_row(row)
        assert {k: v.tobytes() for k, v in a.items()} == {k: v.tobytes() for k, v in b.items()}
    for k, v in local.records().items():
        np.testing.assert_array_equal(remote.records()[k], v)
    stored = encode_targets(targets, m["storage"])
    np.testing.assert_array_equal(remote.read_stored_row(5)["logits"], stored["logits"][5])
    storage.location(url).rmtree()
