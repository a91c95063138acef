"""Stage 1 CLI: the issue's done-when example end to end (extract -> plain zarr -> verify -> info), plus errors."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import zarr
from click.testing import CliRunner
from featcache.testing.images import make_image_folder

from featcache.cli import main

EXAMPLE = ["extract", "--teacher", "deit3_small", "--no-pretrained", "--img-size", "32", "--layers", "0,1,11",
           "--views", "2", "--shots", "2"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # the CI box has 2 shared cores; OpenMP spinning under load is ~3x slower
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def example(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    data = make_image_folder(root / "imgs", classes=3, per_class=4)
    cache = root / "cache"
    result = CliRunner().invoke(main, EXAMPLE + ["--data", str(data), "--out", str(cache)])
    assert result.exit_code == 0, result.output
    return data, cache


def test_done_when_example(example):
    data, cache = example
    g = zarr.open_group(str(cache), mode="r")
    for layer in (0, 1, 11):
        assert g[f"block_{layer}"].shape == (12, 5, 384) and g[f"block_{layer}"].dtype == np.float16
    assert g["logits"].shape == (12, 1000)
    m = g.attrs["featcache"]
    assert m["complete"] and m["num_rows"] == 12 and m["views"]["count"] == 2 and m["subset"]["shots"] == 2
    assert m["teacher"]["name"] == "deit3_small" and len(m["teacher"]["weights_sha256"]) == 64
    assert {"timm", "torch"} <= set(m["versions"]) and m["storage"]["dtype"] == "fp16"
    np.testing.assert_array_equal(g["records/label"][:], np.repeat([0, 0, 1, 1, 2, 2], 2))

    result = CliRunner().invoke(main, ["verify", str(cache), "--samples", "6"])
    assert result.exit_code == 0, result.output
    assert "block_11" in result.output and "OK" in result.output

    result = CliRunner().invoke(main, ["info", str(cache)])
    assert result.exit_code == 0, result.output
    assert "[12, 5, 384]" in result.output and "[12, 1000]" in result.output and "complete" in result.output
    summary = json.loads(CliRunner().invoke(main, ["info", str(cache), "--json"]).output)
    assert summary["num_rows"] == 12 and 0.5 < summary["ratio_to_raw_fp32"] < 0.6  # fp16 + shard indices


def test_rerun_complete_and_mismatch(example):
    data, cache = example
    result = CliRunner().invoke(main, EXAMPLE + ["--data", str(data), "--out", str(cache)])
    assert result.exit_code == 0, result.output
    changed = [a if a != "0,1,11" else "0,11" for a in EXAMPLE]
    result = CliRunner().invoke(main, changed + ["--data", str(data), "--out", str(cache), "--dtype", "bf16"])
    assert result.exit_code != 0
    assert "layers" in result.output and "storage.dtype" in result.output and "--overwrite" in result.output


def test_verify_fails_on_tampered_cache(example, tmp_path):
    import shutil

    data, cache = example
    copy = tmp_path / "copy"
    shutil.copytree(cache, copy)
    arr = zarr.open_array(str(copy / "logits"), mode="r+")
    arr[:] = arr[:] + 1
    result = CliRunner().invoke(main, ["verify", str(copy), "--samples", "3"])
    assert result.exit_code == 1 and "FAIL" in result.output


def test_corrupt_image_cli(tmp_path):
    data = make_image_folder(tmp_path / "imgs", classes=2, per_class=1)
    (data / "class_0" / "img_0.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    args = EXAMPLE[:-2] + ["--views", "1", "--data", str(data), "--workers", "0"]
    result = CliRunner().invoke(main, args + ["--out", str(tmp_path / "a")])
    assert result.exit_code != 0 and "class_0/img_0.png" in result.output
    result = CliRunner().invoke(main, args + ["--out", str(tmp_path / "b"), "--skip-corrupt"])
    assert result.exit_code == 0, result.output
    info = CliRunner().invoke(main, ["info", str(tmp_path / "b")]).output
    assert "skipped    1 file(s)" in info and "class_0/img_0.png" in info


def test_teachers_lists_aliases():  # --help of every command: tests/test_cli.py
    result = CliRunner().invoke(main, ["teachers"])
    assert result.exit_code == 0 and "deit3_small" in result.output and "deit3_small_patch16_224" in result.output


def test_pretrained_teacher_without_a_network_fails_fast_with_the_hint(tmp_path):
    """A real `featcache extract` process whose hub endpoint is a closed loopback port and whose hub cache is empty."""
    import os
    import socket
    import subprocess
    import sys
    import time

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    data = make_image_folder(tmp_path / "imgs", classes=2, per_class=1)
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower() and k != "HF_HUB_OFFLINE"}
    env.update(HF_ENDPOINT=f"http://127.0.0.1:{port}", HF_HOME=str(tmp_path / "hf"))
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "featcache.cli", "extract", "--teacher", "deit_tiny", "--data",
                           str(data), "--out", str(tmp_path / "cache"), "--img-size", "32"], env=env,
                          capture_output=True, text=True, timeout=300)
    seconds = time.perf_counter() - start
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    error = proc.stderr.strip().splitlines()[-1]
    assert error.startswith("Error: cannot load the pretrained weights of 'deit_tiny_patch16_224.fb_in1k'")
    for hint in ("--checkpoint PATH", "--no-pretrained", "hub cache", f"127.0.0.1:{port} is unreachable"):
        assert hint in error, (hint, error)
    # v0.1 spent ~50 s in the hub's retries ("Retrying in 8s [Retry 5/5]") before the hub's own message. The wall
    # time here is mostly imports on a loaded box; tests/test_models.py times load_model itself (< 10 s).
    assert "Retrying" not in proc.stderr and seconds < 120, (seconds, proc.stderr)
