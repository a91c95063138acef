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


ALL_BF16 = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)  # every bfloat16 bit pattern, NaNs included


def _torch_bf16_bits(x: np.ndarray) -> np.ndarray:
    return torch.from_numpy(np.ascontiguousarray(x, np.float32).reshape(-1)).bfloat16().view(torch.int16).numpy(
        ).view(np.uint16)


def _v01_float_to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """The hand-written encoder of featcache <= 0.2 (copied verbatim): the bytes existing bf16 caches hold."""
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounding = ((bits >> 16) & 1) + np.uint32(0x7FFF)
    return ((bits + rounding) >> 16).astype(np.uint16)


def test_bf16_round_trip_is_bit_exact_with_torch_for_all_65536_patterns():
    values = P.bf16_bits_to_float(ALL_BF16)
    torch_values = torch.from_numpy(ALL_BF16.view(np.int16)).view(torch.bfloat16).float().numpy()
    np.testing.assert_array_equal(values.view(np.uint32), torch_values.view(np.uint32))  # NaN payloads too
    back = P.float_to_bf16_bits(values)
    np.testing.assert_array_equal(back, _torch_bf16_bits(values))
    nan = np.isnan(values)
    assert nan.sum() == 2 * 127  # sign x (2^7 - 1) mantissas with the exponent all ones
    np.testing.assert_array_equal(back[~nan], ALL_BF16[~nan])  # every number (and +-inf, -0.0) comes back as is
    assert np.isnan(P.bf16_bits_to_float(back[nan])).all()  # and a NaN stays a NaN


def _float32_patterns() -> np.ndarray:
    """Random float32 bit patterns, every rounding tie and near-tie, the extremes, and a stride over all NaNs."""
    rng = np.random.default_rng(0)
    high = np.arange(1 << 16, dtype=np.uint32) << 16
    ties = (high[:, None] | np.array([0x7FFF, 0x8000, 0x8001, 0xFFFF, 0x0001], np.uint32)).reshape(-1)
    nans = np.concatenate([np.arange(0x7F800001, 0x80000000, 7, dtype=np.uint32),
                           np.arange(0xFF800001, 0xFFFFFFFF, 7, dtype=np.uint32)])
    return np.concatenate([rng.integers(0, 1 << 32, 1 << 20, dtype=np.uint32), ties, nans])


def test_bf16_encoding_matches_torch_for_any_float32_and_keeps_the_old_bytes_of_numbers():
    x = _float32_patterns().view(np.float32)
    ours = P.float_to_bf16_bits(x)
    np.testing.assert_array_equal(ours, _torch_bf16_bits(x))
    nan = np.isnan(x)
    np.testing.assert_array_equal(ours[~nan], _v01_float_to_bf16_bits(x[~nan]))  # existing caches' bytes unchanged
    assert np.isnan(P.bf16_bits_to_float(ours[nan])).all()
    old = P.bf16_bits_to_float(_v01_float_to_bf16_bits(x[nan]))
    assert not np.isnan(old).all()  # the defect fixed: the old encoder turned some NaNs into -0.0


@pytest.mark.parametrize("shape", [(), (1,), (3, 5, 7)])
def test_bf16_keeps_the_shape(shape):
    x = np.full(shape, np.nan, np.float32)
    bits = P.float_to_bf16_bits(x)
    assert bits.shape == shape and bits.dtype == np.uint16
    np.testing.assert_array_equal(bits.reshape(-1), _torch_bf16_bits(x.reshape(-1)))  # 0-d: the same NaN bits
    assert P.bf16_bits_to_float(bits).shape == shape
