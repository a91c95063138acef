"""benchmarks/gpu_check.sh in its CPU form: every part of the GPU check runs end to end and reports its ratios."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_check_runs_on_cpu_at_tiny_sizes(tmp_path):
    env = dict(os.environ, PYTHON=sys.executable, OMP_NUM_THREADS="1")
    run = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "cpu", str(tmp_path / "out")], env=env,
                         capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    res = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    assert set(res["extract"]) == {"deit3_small", "deit3_base"}
    for r in res["extract"].values():
        assert r["extract_img_s"] > 0 and r["bare_img_s"] > 0
    assert set(res["train"]) == {"cached", "online_teacher", "plain_ce"} and min(res["train"].values()) > 0
    assert set(res["read_path"]) == {"workers", "device"} and min(res["read_path"].values()) > 0
    parts = {"target_read", "decode_host", "decode_device", "replay", "host_to_device", "compute"}
    assert set(res["breakdown_ms_per_batch"]) == parts
    assert "extract deit3_small" in run.stdout and "read path (device decode)" in run.stdout
