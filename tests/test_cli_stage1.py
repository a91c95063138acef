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
