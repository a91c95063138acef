"""The demo: its digits splits, runs, FLOP budget, verdict rule, and (slow) the reduced demo end to end."""
from __future__ import annotations

import csv

import numpy as np
import pytest
from click.testing import CliRunner

from featcache.cli import main
from featcache.config import TrainConfig
from featcache.demo import DemoConfig, Seeded, beats, demo_runs, digits_arrays, model_flops, seeded_runs, verdict
from featcache.demo.digits import split_indices
from featcache.demo.results import choose_baseline
from featcache.demo.runs import demo_spec
from featcache.demo.timing import speedup_lines
from featcache.errors import ConfigError


def test_digits_are_real_upsampled_rgb():
    images, labels = digits_arrays(32)
    assert images.shape == (1797, 32, 32, 3) and images.dtype.name == "uint8" and set(labels) == set(range(10))
    assert (images[..., 0] == images[..., 2]).all() and images.max() > 200


def test_splits_are_disjoint_stratified_and_keep_the_test_digits_of_a_split_without_heldout():
    _, labels = digits_arrays(8)
    splits = split_indices(labels, 0.2, 0.1, seed=0)
    assert [len(splits[s]) for s in ("train", "heldout", "test")] == [1293, 144, 360]
    assert len(np.unique(np.concatenate(list(splits.values())))) == 1797
    assert set(np.bincount(labels[splits["heldout"]])) <= {14, 15}, "stratified: every class in heldout"
    assert np.array_equal(split_indices(labels, 0.2, 0.0, seed=0)["test"], splits["test"])


def _seeded(run, *top1):
    return Seeded(run, top1=dict(enumerate(top1)), train_s={i: 1.0 for i in range(len(top1))})


def test_a_gap_counts_only_when_it_exceeds_the_larger_range():
    ce = _seeded("ce", 65.0, 70.0, 75.0)  # range 10
    assert beats(_seeded("kd", 84.0, 86.0, 88.0), ce)  # +16 > 10
    assert not beats(_seeded("nkd", 79.0, 80.0, 81.0), ce)  # +10 is not more than 10
    assert not beats(_seeded("wide", 70.0, 90.0, 95.0), _seeded("ce", 70.0, 70.5, 71.0))  # +14.8 < its own 25
    assert beats(_seeded("one", 70.1), _seeded("ce", 70.0)), "one seed: no spread, any gain counts"


def test_verdict_is_computed_from_the_numbers():
    results = {"ce": _seeded("ce", 65.0, 70.0, 75.0), "kd": _seeded("kd", 84.0, 86.0, 88.0),
               "nkd": _seeded("nkd", 79.0, 80.0, 81.0), "kd-fresh-online": _seeded("kd-fresh-online", 85, 87, 89),
               "wecolora": _seeded("wecolora", 92.0, 92.0, 92.0), "kd-online": _seeded("kd-online", 84.0)}
    lines = verdict(results, teacher_top1=93.0)
    assert lines[0] == ("verdict: 4 of 5 distilled run(s) beat the ce baseline by more than the spread: kd, "
                        "kd-fresh-online, wecolora, kd-online")
    assert "nkd: 80.0 (79.0-81.0) % (+10.0 points vs ce 70.0 (65.0-75.0) %; spread 10.0: does not count)" in lines[2]
    assert "best student trained from scratch: kd-fresh-online 87.0 (85.0-89.0) %, 6.0 points below" in lines[-3]
    assert "+1.0 points, within the spread" in lines[-2]
    assert "84.00 % vs 84.00 % from the cache (identical)" in lines[-1]
    assert verdict({"kd": results["kd"]}, 93.0) == ["no verdict: the ce baseline has no result"]
    above = verdict(results, teacher_top1=86.0)
    assert "kd-fresh-online 87.0 (85.0-89.0) %, 1.0 points above the teacher's 86.0 %" in above[-3]
    assert "87.0 (85.0-89.0) %, level with the teacher's 87.0 %" in verdict(results, teacher_top1=87.01)[-3]


def test_the_baseline_lr_is_chosen_on_heldout_and_scored_on_test(monkeypatch, tmp_path):
    scored = []
    monkeypatch.setattr("featcache.demo.results.student_test_top1",
                        lambda run_dir, test_root: scored.append(run_dir.name) or 60.0)
    grouped = {"ce,lr=0.001": _seeded("ce,lr=0.001", 50.0, 52.0), "ce,lr=0.003": _seeded("ce,lr=0.003", 55.0, 53.0),
               "kd": _seeded("kd", 80.0, 81.0)}
    out = choose_baseline(grouped, tmp_path, tmp_path / "test")
    assert list(out) == ["ce", "kd"] and out["ce"].top1 == {0: 60.0, 1: 60.0}
    assert scored == ["ce,lr=0.003,seed=0", "ce,lr=0.003,seed=1"] and out["ce"].note.startswith("lr 0.003 ")


def test_the_teacher_costs_at_least_4x_the_student_forward():
    flops = model_flops(DemoConfig())
    assert flops["teacher"] >= 4 * flops["student"] > 0


def test_every_run_has_the_same_steps_and_only_the_baseline_grid_sees_heldout(tmp_path):
    from featcache.sweep import expand_runs

    cfg = DemoConfig(seeds=2, online_kd=True)
    plans = {p.name: p.config for p in expand_runs(demo_spec(cfg, tmp_path, tmp_path / "teacher.safetensors"))}
    want = {(cfg.epochs, cfg.batch_size, cfg.label_shots, None)}
    assert {(c.epochs, c.batch_size, c.label_shots, c.max_steps) for c in plans.values()} == want
    ce = {n: c for n, c in plans.items() if c.method == "ce"}
    assert len(ce) == 6 and all(c.labelled_only and c.val.endswith("heldout") for c in ce.values())
    assert all(not c.labelled_only and c.val.endswith("test") for n, c in plans.items() if n not in ce)
    assert "kd-online,seed=0" in plans and "kd-online,seed=1" not in plans and "kd-fresh-online,seed=1" in plans
    # every run that learns from labels gets the labelled batch, but the baseline (all labelled) and WeCoLoRA
    assert {n for n, c in plans.items() if c.labelled_batch == cfg.labelled_batch > 0} == \
        {n for n in plans if n not in ce and not n.startswith("wecolora")}


def test_seeded_runs_repeat_every_method():
    names = [r["name"] for r in seeded_runs(DemoConfig(seeds=3, online_kd=True))]
    methods = {r["name"] for r in demo_runs(DemoConfig(online_kd=True))}
    assert {"kd", "nkd", "vitkd", "vitkd+nkd", "kd-online", "kd-fresh-online", "wecolora"} <= methods
    assert len(names) == 3 * len(methods) - 2 and "nkd,seed=2" in names


def test_labelled_only_needs_label_shots():
    with pytest.raises(ConfigError, match="--labelled-only needs --label-shots"):
        TrainConfig(cache="c", labelled_only=True).validate()


def test_speedup_lines_report_measured_and_ideal():
    timing = {"online_s": 18.0, "cached_s": 10.0, "teacher_forward_s": 0.008, "student_step_s": 0.010,
              "fetch_s": 0.004, "update_s": 0.006, "steps": 80, "threads": 1, "parity_max_abs_diff": 0.0}
    lines = speedup_lines(timing, {"teacher": 15_600_000, "student": 3_100_000})
    assert lines[0] == "forward FLOPs per image: teacher 15.6 M, student 3.1 M (5.0x)"
    assert lines[1].endswith("online teacher 18.0 s, from the cache 10.0 s: speedup 1.80x")
    assert "(teacher forward 8.0 ms + student step 10.0 ms [batch fetch 4.0 + update 6.0]) / student step = 1.80x" \
        in lines[2]
    assert "measured / ideal = 1.00 (compute only, views for free: 2.33x)" in lines[2]
    assert "differ by at most 0 in any weight (identical" in lines[3]


@pytest.mark.slow
def test_quick_demo_end_to_end(tmp_path):
    out = tmp_path / "demo"
    result = CliRunner().invoke(main, ["demo", "--quick", "--out", str(out), "--jobs", "2", "--seeds", "2"])
    assert result.exit_code == 0, result.output
    text = result.output
    for stage in ("1/5 digits", "2/5 teacher", "3/5 extract once + sweep", "4/5 timing", "verdict:",
                  "measured / ideal", "report:", "plot:"):
        assert stage in text
    rows = list(csv.DictReader(open(out / "demo_report.csv")))
    runs = {r["run"] for r in rows}
    assert runs == {"ce", "kd", "nkd", "vitkd", "vitkd+nkd", "kd-online", "kd-fresh-online", "wecolora"}
    assert len(rows) == 2 * len(runs) - 1, "two seeds per run, the parity run once"
    assert (out / "demo_report.png").stat().st_size > 0 and (out / "teacher.safetensors").is_file()
    # The baseline is scored on test/ by the demo itself: exactly as `train --val` scores every other run.
    from featcache.demo.results import student_test_top1
    from featcache.report import summarize_run

    ce_run = next((out / "runs").glob("ce,lr=*,seed=0"))
    assert student_test_top1(ce_run, out / "digits" / "heldout") == summarize_run(ce_run).row["top1"]
    # A second demo reuses the teacher, the cache, the runs and the timing.
    again = CliRunner().invoke(main, ["demo", "--quick", "--out", str(out), "--jobs", "2", "--seeds", "2"])
    assert again.exit_code == 0, again.output
    assert "teacher: reusing" in again.output and "cache complete: the teacher will not be run" in again.output
    assert "nothing to train: every run is finished" in again.output and "timing: reusing" in again.output
    assert "parity: the two timed students differ by at most 0 in any weight (identical" in again.output


def test_commands_have_help():
    for command in ("sweep", "report", "demo"):
        result = CliRunner().invoke(main, [command, "--help"])
        assert result.exit_code == 0 and "Usage" in result.output


def test_a_quick_demo_never_works_in_the_full_demos_directory(monkeypatch):
    import featcache.demo

    seen = []
    monkeypatch.setattr(featcache.demo, "run_demo", lambda cfg, jobs=None: seen.append(cfg) or {"failed": {}})
    for args in (["demo", "--quick"], ["demo"], ["demo", "--quick", "--out", "elsewhere"]):
        res = CliRunner().invoke(main, args)
        assert res.exit_code == 0, res.output
    assert [c.out for c in seen] == ["featcache_demo_quick", "featcache_demo", "elsewhere"]
    assert seen[0].max_train and seen[2].max_train and seen[1].max_train is None
