"""Lossless compressors: the --codec parts backends apply to stored bytes."""
from __future__ import annotations

import numpy as np
import pytest

from featcache.errors import ConfigError
from featcache.stores import codecs as C


def test_parse_lossless_forms():
    assert C.parse_lossless("none") == {"name": "none"}
    assert C.parse_lossless("zstd") == {"name": "zstd", "level": 3}
    assert C.parse_lossless("blosc-zstd:3:noshuffle") == {"name": "blosc", "cname": "zstd", "clevel": 3,
                                                          "shuffle": "noshuffle"}
    for bad in ("lz4", "zstd:fast", "zstd:1:2", "blosc-zstd:5:twist", "none:1"):
        with pytest.raises(ConfigError, match="bad lossless codec"):
            C.parse_lossless(bad)


@pytest.mark.parametrize("spec", ["zstd:3", "blosc-zstd:5:shuffle", "blosc-zstd:1:bitshuffle", "blosc-zstd:noshuffle"])
def test_lossless_compressors_are_exact(spec):
    codec = C.numcodecs_compressor(C.parse_lossless(spec))
    x = np.random.default_rng(0).standard_normal((6, 17, 64)).astype(np.float32)
    x[..., [3, 17]] *= 40.0
    data = x.astype(np.float16).tobytes()
    assert bytes(codec.decode(codec.encode(data))) == data


def test_no_compressor_and_unknown_compressor():
    assert C.numcodecs_compressor({"name": "none"}) is None and C.numcodecs_compressor(None) is None
    with pytest.raises(ConfigError, match="unknown compressor"):
        C.numcodecs_compressor({"name": "lz4"})


@pytest.mark.parametrize("part", ["none", "zstd:5", "blosc-zstd:3:bitshuffle", "blosc-zstd:7:noshuffle"])
def test_lossless_label_is_the_codec_part_that_parses_back(part):
    spec = C.parse_lossless(part)
    assert C.lossless_label(spec) == part
    assert C.parse_lossless(C.lossless_label(spec)) == spec
