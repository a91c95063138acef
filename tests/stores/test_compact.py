"""Compact caches: `featcache convert` fits the pca codebook on the source, resumes with it, keeps it across
backends, and `featcache info` reports bytes/view, the ratio to fp16 and the error it measured."""
from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from featcache.cli import main
from featcache.convert import convert
from featcache.info import cache_info, format_info
from featcache.stores import open_reader
from featcache.stores.encodings import error_bound
from featcache.testing.toystore import FORMATS, toy_manifest, toy_records, toy_targets, write_toy


def _low_rank_source(path, fmt: str = "zarr"):
    """An fp16 toy cache (6 units) whose blocks have the low-rank + outlier structure of ViT features."""
    m = toy_manifest(fmt, dtype="fp16", samples=8, views=3, tokens=6, dim=16)
    targets = toy_targets(m)
    rng = np.random.default_rng(7)
    for name in ("block_0", "block_2"):
        mix = rng.standard_normal((3, 16)).astype(np.float32)
        targets[name] = (targets[name][..., :3] @ mix + 0.05 * targets[name]).astype(np.float32)
    write_toy(path, m, targets, toy_records(m))
    return open_reader(path)


def _decoded(reader, name: str) -> np.ndarray:
    return np.stack([reader.read_row(r, [name])[name] for r in range(len(reader))])


@pytest.mark.parametrize("fmt", FORMATS)
def test_convert_fits_codebook_and_stays_within_bound(tmp_path, fmt):
    src = _low_rank_source(tmp_path / "src")
    convert(tmp_path / "src", tmp_path / "dst", fmt, codec="pca:0.3", progress=False)
    dst = open_reader(tmp_path / "dst")
    for name in ("block_0", "block_2"):
        entry = dst.manifest["targets"][name]
        assert entry["encoding"]["kind"] == "pca" and entry["encoding"]["fit_rows"] == len(src)
        reference, decoded = _decoded(src, name), _decoded(dst, name)
        assert (np.abs(decoded.astype(np.float64) - reference) <= error_bound(entry["encoding"], reference)).all()
        err = entry["measured_error"]
        assert err["rows"] == len(src) and 0 < err["rel_l2"] < 0.3 / np.sqrt(12) * 1.05
        assert dst.manifest["arrays"][name]["dtype"] == "uint8"
    np.testing.assert_array_equal(_decoded(dst, "logits"), _decoded(src, "logits"))  # logits are never pca-coded


def test_pca_cache_converts_across_backends_without_refitting(tmp_path):
    _low_rank_source(tmp_path / "src")
    convert(tmp_path / "src", tmp_path / "z", "zarr", codec="pca:0.5", progress=False)
    convert(tmp_path / "z", tmp_path / "w", "wds", progress=False)  # same codec: arrays copied, codebook kept
    z, w = open_reader(tmp_path / "z"), open_reader(tmp_path / "w")
    assert w.manifest["targets"] == z.manifest["targets"]
    for row in range(len(z)):
        for name, value in z.read_stored_row(row).items():
            assert value.tobytes() == w.read_stored_row(row)[name].tobytes(), (row, name)


def test_interrupted_convert_resumes_with_its_codebook(tmp_path):
    _low_rank_source(tmp_path / "src")
    convert(tmp_path / "src", tmp_path / "once", "zarr", codec="pca:0.3", progress=False)
    partial = convert(tmp_path / "src", tmp_path / "twice", "zarr", codec="pca:0.3", progress=False, max_units=2)
    assert not partial.complete and not open_reader(tmp_path / "twice", require_complete=False).manifest.complete
    convert(tmp_path / "src", tmp_path / "twice", "zarr", codec="pca:0.3", progress=False)
    once, twice = open_reader(tmp_path / "once"), open_reader(tmp_path / "twice")
    codebook = ("mean", "basis", "rms", "fit_rows")
    for name in ("block_0", "block_2"):
        a, b = once.manifest["targets"][name]["encoding"], twice.manifest["targets"][name]["encoding"]
        assert {k: a[k] for k in codebook} == {k: b[k] for k in codebook}
    for row in range(len(once)):
        for name, value in once.read_stored_row(row).items():
            assert value.tobytes() == twice.read_stored_row(row)[name].tobytes(), (row, name)


def test_info_reports_bytes_ratio_and_error(tmp_path):
    _low_rank_source(tmp_path / "src")
    result = CliRunner().invoke(main, ["convert", str(tmp_path / "src"), str(tmp_path / "dst"), "--format", "wds",
                                       "--codec", "pca:0.3"])
    assert result.exit_code == 0, result.output
    assert "pca:0.3" in result.output and "relL2" in result.output
    info = cache_info(str(tmp_path / "dst"), measure=0)
    block = info["codecs"]["block_0"]
    assert block["bytes_per_view"] > 0 and block["ratio_to_fp16"] == pytest.approx(block["bytes_per_view"] / 192)
    assert block["measured_error"]["rel_l2"] > 0 and block["bound"].startswith("abs <=")
    view = info["view"]
    assert view["bytes_per_view"] == pytest.approx(sum(r["bytes_per_view"] for r in info["codecs"].values()))
    assert view["fp16_bytes_per_view"] == 2 * (2 * 6 * 16 + 20)
    text = format_info(info)
    assert "per view" in text and "x fp16" in text
    as_json = CliRunner().invoke(main, ["info", str(tmp_path / "dst"), "--json", "--measure", "0"])
    assert json.loads(as_json.output)["codecs"]["block_2"]["encoding"]["kind"] == "pca"
