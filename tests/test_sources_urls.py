"""WebDataset shards named by URL (``pipe:``, ``http://`` on 127.0.0.1, ``s3://`` on moto), brace-expanded, staged
into a local directory and read there; extracted end to end and trained on; stage 2 checks the staged copies and
never runs a command or fetches a URL read from a manifest."""
from __future__ import annotations

import copy
import gzip
import json
import shutil

import numpy as np
import pytest
from click.testing import CliRunner

from featcache.cli import main
from featcache.errors import ConfigError, MissingFileError, SourceError
from featcache.sources import detect_kind, open_source, source_from_manifest, source_manifest_entry
from featcache.stores import open_reader
from featcache.testing.caches import cli_ok, cli_train_steps, tiny_extract_args
from featcache.testing.http import serve_directory
from featcache.testing.images import make_wds_shards
from featcache.testing.s3 import fresh_s3fs, local_s3

pytestmark = pytest.mark.usefixtures("clean_accelerate")
BRACE = "shard-{000000..000002}.tar"


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return make_wds_shards(tmp_path_factory.mktemp("wds") / "shards", per_shard=5)  # 12 samples in 3 shards


@pytest.fixture(scope="module")
def http(shards):
    with serve_directory(shards) as base:
        yield base


@pytest.fixture(scope="module")
def s3(shards):
    with local_s3("shards"):
        fresh_s3fs().put(f"{shards}/*.tar", "shards/train/")
        yield "s3://shards/train"


def one_line_failure(*args: str) -> str:
    res = CliRunner().invoke(main, [str(a) for a in args])
    assert res.exit_code != 0, res.output
    assert len(res.output.strip().splitlines()) == 1, res.output
    return res.output


@pytest.mark.parametrize("transport", ["pipe", "http", "s3", "file", "mixed"])
def test_url_spec_is_staged_and_reads_like_the_local_shards(transport, shards, http, s3, tmp_path):
    spec = {"pipe": f"pipe:cat {shards}/{BRACE}", "http": f"{http}/{BRACE}", "s3": f"{s3}/{BRACE}",
            "file": f"file://{shards}/{BRACE}", "mixed": [f"{shards}/shard-000000.tar", f"{http}/shard-000001.tar",
                                                          f"pipe:cat {shards}/shard-000002.tar"]}[transport]
    assert detect_kind(spec) == "wds"
    source, local = open_source(spec, stage_dir=tmp_path / "stage"), open_source(shards)
    assert source.root == str(tmp_path / "stage") and source.items == local.items
    for i in (0, 6, 11):
        np.testing.assert_array_equal(source.load(i).numpy(), local.load(i).numpy())
    staged = source.recorded["staged"]
    assert [r["shard"] for r in staged] == [p.name for p in sorted(shards.glob("*.tar"))]
    for record in staged:
        assert (tmp_path / "stage" / record["shard"]).read_bytes() == (shards / record["shard"]).read_bytes()


def test_staging_resumes_and_fetches_each_shard_once(shards, tmp_path):
    log = tmp_path / "fetches"
    spec = f"pipe:echo x >> {log}; cat {shards}/{BRACE}"
    (tmp_path / "stage").mkdir()
    (tmp_path / "stage" / ".shard-000000.tar.tmp-123-abcd").write_bytes(b"torn")  # a crash mid-copy
    first = open_source(spec, stage_dir=tmp_path / "stage").recorded["staged"]
    (tmp_path / "stage" / "shard-000001.tar").write_bytes(b"changed")  # a copy that lost its bytes
    second = open_source(spec, stage_dir=tmp_path / "stage").recorded["staged"]
    assert first == second and len(log.read_text().splitlines()) == 4  # 3 shards, then shard-000001 again
    assert sorted(p.name for p in (tmp_path / "stage").glob("*.tar")) == [r["shard"] for r in first]


@pytest.mark.parametrize("spec, error, match", [
    ("ftp://host/{a,b}.tar", ConfigError, r"scheme 'ftp' is not supported; use pipe:CMD, http://"),
    ("http://127.0.0.1:9/a.tar.gz", SourceError, r"gzip-compressed.*pipe:curl -sfL http://127.0.0.1:9/a.tar.gz \| gzip"),
    ("pipe:exit 3; cat a.tar", SourceError, r"exited with status 3; fix the command in --data"),
    ("pipe:echo nothing", ConfigError, "cannot name the shard of this command"),
    (["pipe:cat x/a.tar", "pipe:cat y/a.tar"], ConfigError, "would both be staged as a.tar"),
    ("http://host/{a,b.tar", ConfigError, "unbalanced braces"),
])
def test_bad_specs_are_refused_with_the_fix(spec, error, match, tmp_path):
    with pytest.raises(error, match=match):
        open_source(spec, kind="wds", stage_dir=tmp_path / "stage")
    assert not list(tmp_path.rglob("*.tar"))


def test_manifest_paths_are_checked_and_copies_verified(shards, tmp_path):
    stage = tmp_path / "stage"
    manifest = {"data": source_manifest_entry(open_source(f"pipe:cat {shards}/{BRACE}", stage_dir=stage))}
    assert source_from_manifest(manifest).root == str(stage)
    bad = copy.deepcopy(manifest)
    bad["data"]["staged"][0]["shard"] = "../shard-000000.tar"
    with pytest.raises(SourceError, match=r"staged shard named '../shard-000000.tar'.*manifest is corrupt"):
        source_from_manifest(bad)
    (stage / "shard-000002.tar").write_bytes((shards / "shard-000001.tar").read_bytes())
    with pytest.raises(SourceError, match=r"shard-000002.tar changed since extraction.*URL spec again with --data"):
        source_from_manifest(manifest)
    (stage / "shard-000002.tar").unlink()
    with pytest.raises(MissingFileError, match="shard-000002.tar is missing; pass the shards' URL spec again"):
        source_from_manifest(manifest)
    with pytest.raises(ConfigError, match=r"does not name the shards \['shard-000002.tar'\]"):
        source_from_manifest(manifest, root=f"pipe:cat {shards}/shard-{{000000..000001}}.tar")
    restaged = source_from_manifest(manifest, root=f"pipe:cat {shards}/{BRACE}")
    assert (stage / "shard-000002.tar").read_bytes() == (shards / "shard-000002.tar").read_bytes()
    assert len(restaged) == 12


def test_compressed_shard_is_refused_in_one_line_from_the_cli(shards, tmp_path):
    with open(shards / "shard-000000.tar", "rb") as src, gzip.open(tmp_path / "s.tar.gz", "wb") as dst:
        shutil.copyfileobj(src, dst)
    out = one_line_failure("extract", "--data", tmp_path / "s.tar.gz", "--out", tmp_path / "c", *tiny_extract_args())
    assert "gzip-compressed" in out and "decompress it" in out, out
    out = one_line_failure("extract", "--data", "gopher://host/s.tar", "--out", tmp_path / "c", *tiny_extract_args())
    assert "scheme 'gopher' is not supported" in out, out
    assert not (tmp_path / "c").exists()


@pytest.mark.slow
def test_extract_from_http_and_train(http, tmp_path):
    cache = tmp_path / "cache"
    cli_ok("extract", "--data", f"{http}/{BRACE}", "--out", cache, *tiny_extract_args())
    data = open_reader(str(cache)).manifest["data"]
    assert data["root"] == f"{cache}.shards" and [r["url"] for r in data["staged"]][0] == f"{http}/shard-000000.tar"
    assert cli_train_steps(cache, tmp_path / "run") == 3  # an epoch: one of 2 views of 12 samples, batches of 4


@pytest.mark.slow
def test_train_never_runs_the_recorded_command(shards, tmp_path):
    """The staged copies are read at train time; without them, the URL spec must be typed again."""
    marker, cache, stage = tmp_path / "ran", tmp_path / "cache", tmp_path / "stage"
    spec = f"pipe:touch {marker}; cat {shards}/{BRACE}"
    cli_ok("extract", "--data", spec, "--out", cache, "--data-stage-dir", stage, *tiny_extract_args())
    assert json.loads(json.dumps(open_reader(str(cache)).manifest["data"]["staged"]))[0]["url"].startswith("pipe:")
    marker.unlink()
    assert cli_train_steps(cache, tmp_path / "run1") == 3
    shutil.rmtree(stage)
    out = one_line_failure("train", "--cache", cache, "--out", tmp_path / "run2", "--method", "kd", "--student",
                           "deit_tiny", "--student-kwargs", '{"depth": 1}', "--workers", "0")
    assert "does not exist; pass the shards' URL spec again with --data" in out, out
    assert not marker.exists()  # neither run executed the command recorded in the manifest
    assert cli_train_steps(cache, tmp_path / "run3", "--data", spec) == 3  # typed by the user: staged anew
    assert marker.exists() and (stage / "shard-000000.tar").is_file()


def test_only_rank_0_fetches_before_a_multi_process_extraction(shards, tmp_path):
    from featcache.config import ExtractConfig
    from featcache.distributed import Ranks
    from featcache.extract import _stage_as_rank

    log = tmp_path / "fetches"
    cfg = ExtractConfig(data=f"pipe:echo x >> {log}; cat {shards}/{BRACE}", out=str(tmp_path / "c"))
    _stage_as_rank(cfg, Ranks(1, 2, 1))
    assert not log.exists()
    _stage_as_rank(cfg, Ranks(0, 2, 0))
    assert len(log.read_text().splitlines()) == 3 and len(list((tmp_path / "c.shards").glob("*.tar"))) == 3


def test_a_remote_cache_needs_a_stage_dir(tmp_path):
    out = one_line_failure("extract", "--data", "http://127.0.0.1:9/a.tar", "--out", "memory://bucket/c",
                           *tiny_extract_args())
    assert "pass --data-stage-dir DIR" in out, out


@pytest.mark.parametrize("flag", ["--val", "--data"])
def test_commands_reading_in_place_refuse_url_specs_with_the_fix(flag):
    from featcache.sources import open_local_source

    with pytest.raises(ConfigError, match=f"{flag} 'pipe:cat a.tar' names shards by URL.*--data-stage-dir DIR"):
        open_local_source("pipe:cat a.tar", flag)


@pytest.mark.parametrize("where", ["s3://bucket/stage", "memory://stage", "file:///tmp/stage"])
def test_a_url_stage_dir_is_refused_before_anything_is_written(shards, where, tmp_path, monkeypatch):
    from featcache.sources.urls import stage

    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match="--data-stage-dir .* is a URL.*pass a local path"):
        stage(f"pipe:cat {shards}/shard-000000.tar", where)
    assert list(tmp_path.iterdir()) == []  # no ./s3:/bucket/stage


def test_signatures_and_credentials_in_a_url_are_not_recorded(http, tmp_path):
    from featcache.sources.urls import stage

    authed = http.replace("http://", "http://user:secret@")
    records = stage(f"{authed}/shard-000000.tar?X-Amz-Signature=secret#frag", tmp_path / "stage")
    assert records[0]["url"] == f"{http}/shard-000000.tar" and records[0]["size"] > 0
    written = "".join(p.read_text() for p in (tmp_path / "stage").glob(".*.sha256"))
    assert "secret" not in written and "frag" not in written and f"{http}/shard-000000.tar" in written
