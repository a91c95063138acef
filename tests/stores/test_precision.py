"""Float precision on disk: bf16 bits as torch rounds them, fp16 decoding, and the range check before encoding."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from featcache.errors import ConfigError
from featcache.stores import precision as P


def _vit_like(seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((6, 17, 64)).astype(np.float32)
    x[..., [3, 17]] *= 40.0
    return x


def test_bf16_matches_torch_rounding():
    x = _vit_like()
    ours = P.bf16_bits_to_float(P.float_to_bf16_bits(x))
    np.testing.assert_array_equal(ours, torch.from_numpy(x).bfloat16().float().numpy())


@pytest.mark.parametrize("dtype", P.DTYPES)
def test_storage_round_trip_within_rounding(dtype):
    x = _vit_like(1)
    stored = P.to_storage(x, dtype)
    assert stored.dtype == np.dtype(P.storage_dtype(dtype))
    back = P.from_storage(stored, dtype)
    assert back.dtype == np.float32 and (np.abs(back.astype(np.float64) - x) <= P.rounding_bound(x, dtype)).all()
    if dtype == "fp16":  # the fast torch cast is bit-identical to numpy's
        np.testing.assert_array_equal(back, stored.astype(np.float32))


def test_unknown_dtype_names_the_choices():
    with pytest.raises(ConfigError, match="fp32, fp16, bf16"):
        P.storage_dtype("fp8")


def test_fp16_range_check():
    ok = {"block_0": np.full((2, 3), 1000.0, np.float32)}
    P.check_storable(ok, "fp16")
    hot = {"block_11": np.array([[1.0, -40000.0]], np.float32)}
    with pytest.raises(ValueError, match=r"block_11.*--dtype bf16"):
        P.check_storable(hot, "fp16")
    P.check_storable(hot, "bf16")
    with pytest.raises(ValueError, match="non-finite"):
        P.check_storable({"logits": np.array([np.inf], np.float32)}, "fp16")
    with pytest.raises(ConfigError, match="non-finite"):  # every dtype refuses inf/nan, not only fp16
        P.check_storable({"logits": np.array([np.nan], np.float32)}, "fp32")
