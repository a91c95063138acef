"""Caches written by featcache v0.1 (before the re-layout) still open and train to the same per-step losses.

``tests/fixtures/v0_1`` holds one tiny cache per backend, extracted by the v0.1 code
(``tests/fixtures/make_v0_1_caches.py``), and the losses the v0.1 trainer logged on each
(``tests/fixtures/make_v0_1_losses.py``, whose TrainConfig is repeated here).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from featcache.testing.toystore import snapshot

from featcache import engine, rundir
from featcache.config import TrainConfig

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "v0_1"
LOSSES = json.loads((FIXTURES / "v0_1_losses.json").read_text())

pytestmark = pytest.mark.usefixtures("clean_accelerate")


def legacy_config(cache: Path, out: Path) -> TrainConfig:
    """The run ``make_v0_1_losses.py`` made with the v0.1 code."""
    return TrainConfig(cache=str(cache), out=str(out), method="vitkd+nkd", student="deit_tiny",
                       student_kwargs={"depth": 2, "embed_dim": 48, "num_heads": 3, "patch_size": 8}, img_size=32,
                       data=str(FIXTURES / "data"), epochs=1, batch_size=4, workers=0, log_every=1, seed=0)


@pytest.mark.parametrize("fmt", sorted(LOSSES))
def test_v0_1_cache_trains_to_the_v0_1_losses(fmt, tmp_path):
    before = snapshot(FIXTURES)
    cache = shutil.copytree(FIXTURES / f"cache_{fmt}", tmp_path / f"cache_{fmt}")
    result = engine.train(legacy_config(cache, tmp_path / "run"))
    losses = [r["loss"] for r in rundir.read_metrics(tmp_path / "run") if "loss" in r]
    assert losses == pytest.approx(LOSSES[fmt], rel=1e-5)
    assert result["steps"] == len(LOSSES[fmt]) and rundir.run_status(tmp_path / "run") == "done"
    assert snapshot(FIXTURES) == before  # the fixture itself is never written
