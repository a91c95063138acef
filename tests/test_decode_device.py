"""``--decode device``: the loader hands over the stored (compact) arrays and the loop decodes them on its device,
to the same targets as the numpy decode in the workers, for every registered encoding; training gives the same loss
either way."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from featcache import engine
from featcache.build import resolve_decode
from featcache.config import TrainConfig
from featcache.convert import convert
from featcache.datasets import _tensor
from featcache.stores import encodings as E
from featcache.testing.caches import STUDENT, make_cache, reset_accelerate

# One storage per registered kind (pca is fitted on the values below).
SETTINGS = {"float": [{"dtype": "fp16", "codec": "none"}, {"dtype": "bf16", "codec": "none"},
                      {"dtype": "fp32", "codec": "none"}],
            "bitround": [{"dtype": "fp16", "codec": "bitround:5"}], "int8": [{"dtype": "fp16", "codec": "int8"}],
            "pca": [{"dtype": "fp16", "codec": "pca:0.3"}], "topk": [{"dtype": "fp16", "codec": "none", "topk": 3}]}


def test_every_kind_has_a_setting_here():
    assert sorted(SETTINGS) == E.ENCODINGS.names()


@pytest.mark.parametrize("kind,storage", [(k, s) for k, v in SETTINGS.items() for s in v])
def test_device_decode_matches_the_host_decode(kind, storage):
    rng = np.random.default_rng(0)
    name = "logits" if kind == "topk" else "block_0"
    x = (rng.standard_normal((6, 12)) * 3 if kind == "topk" else rng.standard_normal((6, 5, 16)) * 2).astype(np.float32)
    section = {name: {"shape": list(x.shape[1:]), "encoding": E.target_encoding(name, storage)}}
    section = E.fit_targets(section, {n: x for n in E.unfitted(section)})
    enc = E.encoding(section[name]["encoding"])
    assert enc.name == kind
    stored = enc.encode(name, x)
    host = enc.decode(name, stored, x.shape[1:])
    device = enc.decode_torch(name, {k: _tensor(v) for k, v in stored.items()}, x.shape[1:])
    assert device.dtype == torch.float32 and tuple(device.shape) == x.shape
    if kind == "pca":  # torch's and numpy's float32 matrix products round differently
        np.testing.assert_allclose(device.numpy(), host, rtol=1e-5, atol=1e-5 * np.abs(host).max())
    else:
        np.testing.assert_array_equal(device.numpy(), host)


def test_auto_decodes_on_the_device_only_on_cuda():
    cfg = TrainConfig(cache="c")
    assert resolve_decode(cfg, torch.device("cpu")) == "workers"
    assert resolve_decode(cfg, torch.device("cuda")) == "device"
    assert resolve_decode(TrainConfig(cache="c", decode="device"), torch.device("cpu")) == "device"
    with pytest.raises(ValueError, match="--decode 'gpu'"):
        resolve_decode(TrainConfig(cache="c", decode="gpu"), torch.device("cpu"))


@pytest.mark.usefixtures("clean_accelerate")
def test_training_losses_do_not_depend_on_where_targets_are_decoded(tmp_path):
    _, fp32 = make_cache(tmp_path)
    convert(fp32, tmp_path / "int8", "zarr", dtype="fp16", codec="int8", progress=False)
    losses = {}
    for decode in ("workers", "device"):
        reset_accelerate()
        out = tmp_path / f"run_{decode}"
        engine.train(TrainConfig(cache=str(tmp_path / "int8"), out=str(out), method="vitkd+kd", epochs=1,
                                 batch_size=2, workers=0, log_every=1, seed=1, decode=decode, **STUDENT))
        records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        losses[decode] = [r["loss"] for r in records if r["kind"] == "train"]
    assert len(losses["device"]) == 3 and losses["device"] == losses["workers"]
