"""Caches on S3, against a real S3 API: moto's server on 127.0.0.1 (:func:`featcache.testing.s3.local_s3`), s3fs
pointed at it. Extraction to ``s3://`` (zarr and wds) gives the objects a local extraction gives as files; info,
verify, train (random access and streaming) and convert work on it; a SIGKILLed remote extraction resumes to the
same bytes."""
from __future__ import annotations

import json
import random
import shutil
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from featcache.cli import main
from featcache.config import ExtractConfig
from featcache.extract import run_extract
from featcache.storage import location
from featcache.stores import open_reader
from featcache.testing.caches import STUDENT, TINY_VIT_TEACHER, reset_accelerate
from featcache.testing.faults import killed_extraction, tree_bytes
from featcache.testing.images import make_image_folder
from featcache.testing.s3 import count_puts, kill_at_put, local_s3, object_bytes

BUCKET = "featcache"
EXTRACT = ["--teacher", "vit_tiny_patch16_224", "--no-pretrained", "--img-size", "32", "--num-classes", "3",
           "--teacher-kwargs", json.dumps(TINY_VIT_TEACHER), "--layers", "0,-1", "--views", "2", "--shard-size", "2",
           "--batch-size", "4", "--workers", "0", "--device", "cpu", "--codec", "zstd:1"]


@pytest.fixture(scope="module")
def s3():
    with local_s3(BUCKET) as endpoint:
        yield endpoint


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("imgs"), classes=3, per_class=2)


def cli(*args: str) -> str:
    res = CliRunner().invoke(main, list(args))
    assert res.exit_code == 0, res.output
    return res.output


def local_files(path: Path) -> dict[str, bytes]:
    return {k: v for k, v in tree_bytes(path).items() if not k.endswith(".lock")}


def make_cfg(data: Path, out: str, fmt: str) -> ExtractConfig:
    return ExtractConfig(data=str(data), out=out, format=fmt, teacher="vit_tiny_patch16_224", pretrained=False,
                         img_size=32, num_classes=3, teacher_kwargs=dict(TINY_VIT_TEACHER), layers=[0, -1], views=2,
                         shard_size=2, batch_size=4, workers=0, device="cpu", codec="zstd:1")


def test_unknown_schemes_are_refused_by_every_command(tmp_path, monkeypatch, s3):
    monkeypatch.chdir(tmp_path)
    for args in (["extract", "--data", "d", "--out", "gopher://x"], ["info", "ftp://host/c"],
                 ["verify", "s3:/bucket/c"], ["train", "--cache", "gopher://x"]):
        res = CliRunner().invoke(main, args)
        assert res.exit_code != 0 and ("is not supported" in res.output or "not a s3 URL" in res.output), res.output
        assert len(res.output.strip().splitlines()) == 1, res.output
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["zarr", "wds"])
def test_extract_info_verify_train_convert_on_s3(s3, data, tmp_path, fmt):
    url = f"s3://{BUCKET}/cli/{fmt}"
    cli("extract", "--data", str(data), "--out", url, "--format", fmt, *EXTRACT)
    cli("extract", "--data", str(data), "--out", str(tmp_path / "local"), "--format", fmt, *EXTRACT)
    assert object_bytes(url) == local_files(tmp_path / "local")  # the same bytes, as objects
    assert not Path("s3:").exists()

    info = cli("info", url)
    assert url in info and "complete" in info
    assert "ok" in cli("verify", url, "--samples", "2", "--device", "cpu").lower()

    back = tmp_path / "back"
    cli("convert", url, str(back), "--format", fmt)
    cli("convert", str(back), f"s3://{BUCKET}/cli/{fmt}-again", "--format", fmt)
    for path in (str(back), f"s3://{BUCKET}/cli/{fmt}-again"):
        a, b = open_reader(path), open_reader(url)
        assert all(a.read_stored_row(r)["logits"].tobytes() == b.read_stored_row(r)["logits"].tobytes()
                   for r in range(len(b)))

    # random access; for wds also the default (a stream) and a stream through a local cache layer
    runs = [(url, ["--no-stream"])] + ([(url, []), (f"simplecache::{url}", ["--stream"])] if fmt == "wds" else [])
    for i, (cache, flags) in enumerate(runs):
        reset_accelerate()
        out = tmp_path / f"run{i}"
        log = cli("train", "--cache", cache, "--out", str(out), "--method", "kd", "--epochs", "1", "--batch-size",
                  "2", "--workers", "0", "--student", STUDENT["student"], "--student-kwargs",
                  json.dumps(STUDENT["student_kwargs"]), *flags)
        assert json.loads((out / "final.json").read_text())["steps"] == 3
        assert ("streamed" in log) == (fmt == "wds" and flags != ["--no-stream"]), log


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["zarr", "wds"])
def test_sigkilled_remote_extraction_resumes_to_the_same_bytes(s3, data, tmp_path, fmt):
    ref = tmp_path / "ref"
    run_extract(make_cfg(data, str(ref), fmt), progress=False)
    start = time.monotonic()
    puts = count_puts(lambda: run_extract(make_cfg(data, f"s3://{BUCKET}/count/{fmt}", fmt), progress=False))
    seconds = time.monotonic() - start
    rng, killed = random.Random(f"s3-kill-{fmt}"), 0
    for trial in range(2):
        url = f"s3://{BUCKET}/kill/{fmt}/{trial}"
        run = lambda: run_extract(make_cfg(data, url, fmt), progress=False)  # noqa: E731
        if trial % 2:
            killed += killed_extraction(run, arm=kill_at_put(rng.randint(1, puts)))
        else:
            killed += killed_extraction(run, delay=rng.uniform(0.0, seconds))
        run_extract(make_cfg(data, url, fmt), progress=False)
        assert object_bytes(url) == local_files(ref), f"trial {trial}"
        location(url).rmtree()
    assert killed >= 1, "neither run was killed before it finished"
    shutil.rmtree(ref)


@pytest.mark.slow
def test_two_processes_stream_a_remote_wds_cache_with_equal_steps(s3, data, tmp_path):
    """torchrun, 2 CPU processes (gloo), each streaming its own half of the shards from S3: the same number of steps
    on both (a rank with more batches would hang the other in its all-reduce)."""
    import os
    import subprocess
    import sys

    url = f"s3://{BUCKET}/ddp/wds"
    cli("extract", "--data", str(data), "--out", url, "--format", "wds", *EXTRACT)
    out = tmp_path / "ddp"
    env = dict(os.environ, ACCELERATE_USE_CPU="true", OMP_NUM_THREADS="1")  # the S3 endpoint: the fixture's
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "featcache.cli", "train",
           "--cache", url, "--out", str(out), "--method", "kd", "--epochs", "2", "--batch-size", "2", "--workers", "0",
           "--log-every", "1", "--student", STUDENT["student"], "--student-kwargs", '{"depth": 2}']
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "streamed" in done.stdout + done.stderr
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    # 6 samples / 2 processes = 3 items per rank per epoch -> ceil(3 / 2) = 2 batches per rank
    assert [r["step"] for r in records if r["kind"] == "train"] == [1, 2, 3, 4]


@pytest.mark.slow
def test_two_processes_extract_to_s3_the_bytes_of_one(s3, data, tmp_path, fmt="zarr"):
    """torchrun, 2 CPU processes (gloo), one S3 cache: the objects equal a 1-process local extraction's files (wds:
    the same code path; its 2-process run is tested on local disk in test_extract_multiprocess.py)."""
    import os
    import subprocess
    import sys

    url = f"s3://{BUCKET}/mp/{fmt}"
    cli("extract", "--data", str(data), "--out", str(tmp_path / "ref"), "--format", fmt, *EXTRACT)
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")  # the S3 endpoint: the fixture's
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2", "--master_addr",
           "127.0.0.1", "--master_port", str(free_port()), "-m", "featcache.cli", "extract", "--data", str(data),
           "--out", url, "--format", fmt, *EXTRACT]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert object_bytes(url) == local_files(tmp_path / "ref")


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
