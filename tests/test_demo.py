"""The demo end to end, reduced (``--quick``): digits -> teacher -> one extraction -> sweep -> report."""
from __future__ import annotations

import csv

import pytest
from click.testing import CliRunner

from featcache.cli import main
from featcache.demo import DemoConfig, demo_runs, digits_arrays, verdict, write_digits


def test_digits_are_real_upsampled_rgb(tmp_path):
    images, labels = digits_arrays(32)
    assert images.shape == (1797, 32, 32, 3) and images.dtype.name == "uint8" and set(labels) == set(range(10))
    assert (images[..., 0] == images[..., 2]).all() and images.max() > 200
    info = write_digits(tmp_path, 32, test_fraction=0.2, seed=0)
    train = sorted((tmp_path / "train").rglob("*.png"))
    test = sorted((tmp_path / "test").rglob("*.png"))
    assert (info["train"], info["test"]) == (len(train), len(test)) == (1437, 360)
    assert not {p.name for p in train} & {p.name for p in test}
    assert sorted(p.name for p in (tmp_path / "train").iterdir()) == [str(d) for d in range(10)]


def test_verdict_is_computed_from_the_numbers():
    rows = [{"run": "ce-only", "top1": 20.0}, {"run": "kd", "top1": 35.5, "train_time_s": 10.0},
            {"run": "nkd", "top1": 19.0}, {"run": "kd-online-teacher", "top1": 35.0, "train_time_s": 25.0}]
    lines = verdict(rows)
    assert lines[0] == "verdict: 2 of 3 distilled run(s) beat the CE-only baseline: kd, kd-online-teacher"
    assert "nkd: 19.0 % (-1.0 points vs ce-only 20.0 %)" in lines[2]
    assert "online: 35.00 % vs 35.50 % from the cache (not identical); training took 25 s vs 10 s" in lines[-1]
    assert verdict([{"run": "ce-only", "top1": 50.0}, {"run": "kd", "top1": 40.0}])[0] == \
        "verdict: no distilled run beat the CE-only baseline in this run"


def test_demo_runs_cover_the_methods():
    names = [r["name"] for r in demo_runs(DemoConfig())]
    assert names[:6] == ["ce-only", "kd", "nkd", "vitkd", "vitkd+nkd", "kd-online-teacher"]


@pytest.mark.slow
def test_quick_demo_end_to_end(tmp_path):
    out = tmp_path / "demo"
    result = CliRunner().invoke(main, ["demo", "--quick", "--out", str(out), "--jobs", "2"])
    assert result.exit_code == 0, result.output
    text = result.output
    for stage in ("1/3 digits", "2/3 teacher", "3/3 extract once + sweep", "verdict:", "report:", "plot:"):
        assert stage in text
    rows = {r["run"]: r for r in csv.DictReader(open(out / "runs" / "report.csv"))}
    assert set(rows) >= {"ce-only", "kd", "nkd", "vitkd", "vitkd+nkd", "kd-online-teacher"}
    assert all(r["status"] == "done" and r["top1"] for r in rows.values())
    assert rows["kd-online-teacher"]["online_teacher"] != "no" and rows["kd"]["online_teacher"] == "no"
    assert (out / "runs" / "report.png").stat().st_size > 0 and (out / "teacher.safetensors").is_file()
    # A second demo reuses the teacher and the cache and trains nothing.
    again = CliRunner().invoke(main, ["demo", "--quick", "--out", str(out), "--jobs", "2"])
    assert again.exit_code == 0, again.output
    assert "teacher: reusing" in again.output and "cache complete: the teacher will not be run" in again.output
    assert "nothing to train: every run is finished" in again.output


def test_commands_have_help():
    for command in ("sweep", "report", "demo"):
        result = CliRunner().invoke(main, [command, "--help"])
        assert result.exit_code == 0 and "Usage" in result.output
