"""The run directory's contract (featcache.rundir): metrics reader, checkpoints, status, neutral keys, student.json."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from featcache import engine, rundir
from featcache.config import TrainConfig, save_yaml, to_dict
from featcache.errors import ConfigError, MissingFileError, SweepError
from featcache.sweep import RunPlan, run_state


def records(n: int) -> list[dict]:
    return [{"kind": "train", "epoch": 0, "step": i + 1, "loss": 1.0 / (i + 1)} for i in range(n)]


def test_file_names_are_the_documented_ones():
    assert (rundir.CONFIG_FILE, rundir.METRICS_FILE, rundir.FINAL_FILE) == ("config.yaml", "metrics.jsonl",
                                                                           "final.json")
    assert (rundir.STUDENT_SPEC, rundir.STUDENT_WEIGHTS) == ("student.json", "student.safetensors")
    assert (rundir.CHECKPOINT_STATE, rundir.SWEEP_CONFIG) == ("featcache_state.json", "sweep_run.yaml")
    assert rundir.checkpoint_dir("r", 12) == Path("r") / "checkpoints" / "step_00000012"


def test_metrics_reader_skips_a_torn_last_line_and_garbage(tmp_path):
    for r in records(3):
        rundir.append_metrics(tmp_path, r)
    with open(tmp_path / "metrics.jsonl", "a") as fh:
        fh.write("not json\n[1, 2]\n")
        fh.write('{"kind": "train", "st')  # a run killed mid-write
    assert rundir.read_metrics(tmp_path) == records(3)
    assert rundir.read_metrics(tmp_path / "none") == []


def test_metrics_tail_reads_only_whole_new_lines_and_restarts_after_truncation(tmp_path):
    tail = rundir.MetricsTail(tmp_path)
    assert tail.read() == []  # no file yet
    rundir.append_metrics(tmp_path, records(1)[0])
    (tmp_path / "metrics.jsonl").open("a").write('{"kind": "eval", "epoch": 0, ')
    assert tail.read() == records(1)
    (tmp_path / "metrics.jsonl").open("a").write('"step": 1, "top1": 5.0}\n')
    assert tail.read() == [{"kind": "eval", "epoch": 0, "step": 1, "top1": 5.0}]
    assert tail.read() == []
    rundir.truncate_metrics(tmp_path, step=0)  # a resumed run drops what came after its checkpoint
    rundir.append_metrics(tmp_path, records(1)[0])
    assert tail.read() == records(1)


def test_truncate_and_csv(tmp_path):
    for r in records(4):
        rundir.append_metrics(tmp_path, r)
    rundir.append_metrics(tmp_path, {"kind": "eval", "epoch": 0, "step": 2, "top1": 50.0})
    (tmp_path / "metrics.jsonl").open("a").write('{"torn')
    rundir.truncate_metrics(tmp_path, step=2)
    assert [r["step"] for r in rundir.read_metrics(tmp_path)] == [1, 2, 2]
    assert (tmp_path / "metrics.jsonl").read_text().endswith("}\n")
    rundir.write_metrics_csv(tmp_path)
    lines = (tmp_path / "metrics.csv").read_text().splitlines()
    assert lines[0] == "kind,epoch,step,loss,top1" and lines[-1] == "eval,0,2,,50.0"


def test_checkpoint_discovery_counts_only_complete_checkpoints(tmp_path):
    assert rundir.latest_checkpoint(tmp_path) is None and rundir.complete_checkpoints(tmp_path) == []
    for step in (4, 12):
        path = rundir.checkpoint_dir(tmp_path, step)
        path.mkdir(parents=True)
        rundir.write_checkpoint_state(path, {"step": step})
    rundir.checkpoint_dir(tmp_path, 16).mkdir()  # killed inside save_state: no state file
    assert rundir.complete_checkpoints(tmp_path) == [rundir.checkpoint_dir(tmp_path, s) for s in (4, 12)]
    assert rundir.latest_checkpoint(tmp_path) == rundir.checkpoint_dir(tmp_path, 12)
    assert rundir.read_checkpoint_state(rundir.latest_checkpoint(tmp_path)) == {"step": 12}


def test_status_new_failed_partial_done(tmp_path):
    run = tmp_path / "run"
    assert rundir.run_status(run) == "new"
    run.mkdir()
    (run / "sweep_run.yaml").write_text("{}")
    assert rundir.run_status(run) == "new"  # the sweep's note alone: the engine never started
    rundir.append_metrics(run, records(1)[0])
    assert rundir.run_status(run) == "failed"  # killed before its first checkpoint: nothing to resume
    rundir.checkpoint_dir(run, 1).mkdir(parents=True)
    assert rundir.run_status(run) == "failed"
    rundir.write_checkpoint_state(rundir.checkpoint_dir(run, 1), {})
    assert rundir.run_status(run) == "partial"
    rundir.write_final(run, {"top1": 1.0})
    assert rundir.run_status(run) == "done" and rundir.read_final(run) == {"top1": 1.0}


def test_find_runs_and_read_config(tmp_path):
    (tmp_path / "a").mkdir()
    save_yaml(TrainConfig(cache="c", method="nkd"), tmp_path / "a" / "config.yaml")
    (tmp_path / "b" / "x").mkdir(parents=True)
    save_yaml(TrainConfig(cache="c", method="kd"), tmp_path / "b" / "x" / "sweep_run.yaml")
    (tmp_path / "not_a_run").mkdir()
    assert rundir.find_runs(tmp_path) == [tmp_path / "a", tmp_path / "b" / "x"]
    assert rundir.read_config(tmp_path / "a")["method"] == "nkd"
    assert rundir.read_config(tmp_path / "b" / "x")["method"] == "kd" and rundir.read_config(tmp_path) == {}
    with pytest.raises(MissingFileError, match="does not exist"):
        rundir.find_runs(tmp_path / "nope")


def test_neutral_keys_are_the_same_for_resume_and_sweep(tmp_path):
    """`train --resume` and a re-run sweep allow exactly the same config changes."""
    base = TrainConfig(cache="c", out=str(tmp_path / "run"), method="kd", img_size=32, ce_weight=1.0, val="v")
    run = Path(base.out)
    run.mkdir()
    save_yaml(base, run / "config.yaml")
    save_yaml(base, run / "sweep_run.yaml")
    neutral = {"resume": True, "workers": 7, "log_every": 3, "data": "/moved/images", "checkpoint_every": 5,
               "quiet": True, "report_to": "none", "tracker_project": "other"}
    assert set(neutral) == set(rundir.NEUTRAL_KEYS)
    for key, value in neutral.items():
        changed = dataclasses.replace(base, **{key: value})
        engine.check_same_run(run, changed)
        assert run_state(RunPlan("run", changed)) == "failed"  # config.yaml, no checkpoint: restarts clean
    for key, value in {"lr": 0.5, "val": "other", "ce_weight": 0.0, "method_args": {"temperature": 2},
                       "mixed_precision": "bf16"}.items():
        changed = dataclasses.replace(base, **{key: value})
        with pytest.raises(ConfigError, match=rf"\['{key}"):
            engine.check_same_run(run, changed)
        with pytest.raises(SweepError, match=rf"\['{key}"):
            run_state(RunPlan("run", changed))
    assert rundir.changed_keys(to_dict(base), {**to_dict(base), "method_args": {"temperature": 2}}) == [
        "method_args.temperature"]


def test_student_json_round_trip(tmp_path):
    model = torch.nn.Linear(3, 2)
    spec = {"model": "toy", "img_size": 32, "num_classes": 2, "model_kwargs": {"depth": 1}}
    written = rundir.write_student(tmp_path, model, spec, mean=(0.5, 0.5, 0.5), std=[0.25] * 3)
    assert written == {**spec, "mean": [0.5] * 3, "std": [0.25] * 3}
    assert rundir.read_student(tmp_path) == written == json.loads((tmp_path / "student.json").read_text())
    assert tuple(written) == rundir.STUDENT_KEYS
    weights = load_file(str(rundir.student_weights(tmp_path)))
    assert torch.equal(weights["weight"], model.weight.detach())
    with pytest.raises(MissingFileError, match="no student.json.*final.json"):
        rundir.read_student(tmp_path / "other")
    (tmp_path / "student.json").write_text(json.dumps({"model": "toy"}))
    with pytest.raises(ConfigError, match=r"lacks \['img_size'\]"):
        rundir.read_student(tmp_path)


def test_a_timm_student_is_written_in_timms_format(tmp_path):
    import timm

    from featcache import models

    model = models.load_model("resnet18", pretrained=False, num_classes=3).eval()
    spec = {"model": "resnet18", "img_size": 48, "num_classes": 3, "model_kwargs": {}}
    rundir.write_student(tmp_path, model, spec, mean=[0.5] * 3, std=[0.25] * 3,
                         data_config={"interpolation": "bilinear", "crop_pct": 0.8, "crop_mode": "center"})
    folder = tmp_path / rundir.STUDENT_DIR
    assert sorted(p.name for p in folder.iterdir()) == [rundir.TIMM_CONFIG, rundir.TIMM_WEIGHTS]
    plain = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    x = torch.randn(2, 3, 48, 48, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(plain(x), model(x))
    data = timm.data.resolve_data_config(model=plain)
    assert tuple(data["input_size"]) == (3, 48, 48)
    assert list(data["mean"]) == [0.5] * 3 and list(data["std"]) == [0.25] * 3
    assert (data["interpolation"], data["crop_pct"]) == ("bilinear", 0.8)
    assert torch.equal(load_file(str(rundir.student_weights(tmp_path)))["fc.weight"], model.fc.weight)


def test_checkpoint_ema_round_trip_and_a_checkpoint_without_it(tmp_path):
    state = {"w": torch.arange(6.0).reshape(2, 3).t()}  # non-contiguous: stored contiguous
    rundir.write_checkpoint_ema(tmp_path, state)
    assert torch.equal(rundir.read_checkpoint_ema(tmp_path)["w"], state["w"])
    with pytest.raises(MissingFileError, match="without --model-ema"):
        rundir.read_checkpoint_ema(tmp_path / "other")


def test_an_option_added_after_the_run_started_counts_at_its_default():
    from featcache.config import TrainConfig, to_dict

    new = to_dict(TrainConfig(cache="c"))
    old = {k: v for k, v in new.items() if k not in ("opt", "model_ema")}  # a config saved before those options
    assert rundir.changed_keys(old, new) == []
    assert rundir.changed_keys(old, {**new, "model_ema": True}) == ["model_ema"]
