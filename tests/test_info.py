"""`featcache info`: bytes, ratios and per-target encodings of any cache, complete or not, in every backend."""
from __future__ import annotations

import pytest

from featcache.info import cache_info, codec_report, format_info, format_report
from featcache.testing.caches import make_cache
from featcache.testing.toystore import FORMATS, toy_manifest, toy_records, toy_targets, write_toy


def test_info_of_an_extracted_cache(tmp_path):
    _, cache = make_cache(tmp_path, per_class=4, shots=None)  # fp32 zarr, 12 images x 2 views
    info = cache_info(cache)
    assert info["arrays"]["block_11"]["shape"] == [24, 5, 384] and info["arrays"]["logits"]["shape"] == [24, 1000]
    assert info["raw_fp32_bytes"] == 24 * (3 * 5 * 384 + 1000) * 4
    assert 1.0 <= info["ratio_to_raw_fp32"] < 1.2  # fp32 + shard indexes
    assert info["teacher"]["name"] == "deit3_small" and info["units_done"] == info["num_units"] == 6
    text = format_info(info)
    assert "deit3_small" in text and "complete, units 6/6" in text and "codecs" in text and "float fp32" in text


@pytest.mark.parametrize("fmt", FORMATS)
def test_info_of_a_partial_cache_in_every_backend(tmp_path, fmt):
    m = toy_manifest(fmt, codec="int8+zstd", topk=4)
    write_toy(tmp_path / "c", m, toy_targets(m), toy_records(m), units=[0, 2], finalize=False)
    info = cache_info(str(tmp_path / "c"), measure=0)
    assert not info["complete"] and info["units_done"] == 2 and info["num_units"] == 4
    assert info["arrays"]["block_0__scale"]["bytes"] > 0 and info["target_bytes"] > 0
    report = info["codecs"]
    assert set(report["block_0"]["arrays"]) == {"block_0", "block_0__scale"}
    assert report["logits"]["encoding"]["kind"] == "topk" and report["logits"]["measured_error"] is None
    assert "INCOMPLETE, units 2/4" in format_info(info)


def test_report_without_reference_says_why(tmp_path):
    m = toy_manifest("wds", codec="int8", topk=4)
    write_toy(tmp_path / "c", m, toy_targets(m), toy_records(m))
    report = codec_report(tmp_path / "c", measure=4)
    assert report["block_0"]["measured_error"]["error"].startswith("not measured")
    left = report["logits"]["measured_error"]
    assert left["rows"] == 4 and 0 < left["leftover_mean"] <= left["leftover_max"] < 1
    assert "leftover mass" in format_report(report) and "not measured" in format_report(report)


def test_report_without_teacher_rerun(tmp_path):
    m = toy_manifest("hdf5", dtype="fp16", codec="bitround:5")
    write_toy(tmp_path / "c", m, toy_targets(m), toy_records(m))
    report = codec_report(tmp_path / "c", rerun_teacher=False)
    assert report["block_0"]["measured_error"] is None and report["block_0"]["bound"].startswith("rel <= 2**-6")
    assert "bitround:5 fp16" in format_report(report)
