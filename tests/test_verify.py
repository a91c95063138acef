"""`featcache verify`: replayed views reproduce the stored targets; tampering and moved data are handled."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from featcache.testing.caches import make_cache
from featcache.verify import format_verify, verify_cache, verify_tolerance


@pytest.fixture(scope="module")
def ref_cache(tmp_path_factory) -> tuple[Path, str]:
    """fp32 zarr cache of 12 images x 2 views = 24 rows (deit3_small, random init, 32 px, blocks 0, 1, 11)."""
    return make_cache(tmp_path_factory.mktemp("ref"), per_class=4, shots=None)


def test_verify_reproduces_the_cache(ref_cache):
    result = verify_cache(ref_cache[1], samples=5, device="cpu")
    assert result["ok"] and len(result["rows"]) == 5 and not result["fingerprint_mismatches"]
    for t in result["targets"].values():
        assert t["rel"] < 1e-5
    text = format_verify(result)
    assert text.startswith("verified 5 views; fingerprint mismatches: 0") and text.endswith("OK")


def test_verify_detects_tampered_cache(tmp_path):
    import zarr

    _, out = make_cache(tmp_path, shots=1)
    arr = zarr.open_array(str(Path(out) / "block_1"), mode="r+")
    arr[:] = arr[:] * 1.5
    result = verify_cache(out, samples=4, device="cpu")
    assert not result["ok"] and not result["targets"]["block_1"]["ok"] and result["targets"]["block_0"]["ok"]
    assert "FAIL" in format_verify(result) and format_verify(result).endswith("replay drift")


def test_verify_finds_moved_images_with_data_root(ref_cache, tmp_path):
    data, cache = ref_cache
    moved = tmp_path / "moved"
    shutil.copytree(data, moved)
    assert verify_cache(cache, samples=3, device="cpu", data_root=str(moved))["ok"]


def test_tolerance_from_encoding_or_dtype():
    assert verify_tolerance({"kind": "float", "dtype": "fp16"}) == 2e-3
    assert verify_tolerance({"kind": "float", "dtype": "bf16"}) == 1e-2
    assert verify_tolerance({"kind": "int8", "verify_rtol": 0.03}) == 0.03
