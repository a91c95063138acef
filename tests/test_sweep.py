"""Sweeps: spec expansion and validation, the cache step, skip/resume, --jobs, and the teacher never being built."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from featcache.testing.images import make_image_folder

import featcache.teachers as teachers
from featcache import models
from featcache.config import ExtractConfig, TrainConfig
from featcache.sweep import SweepError, SweepSpec, expand_runs, run_name, run_sweep

STUDENT = {"student": "vit_tiny_patch16_224", "pretrained": False,
           "student_kwargs": {"patch_size": 16, "embed_dim": 48, "depth": 2, "num_heads": 3}}


def fake_train(cfg: TrainConfig) -> dict:
    """A stand-in trainer: writes the run-dir files the report reads (module level, so --jobs can pickle it)."""
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    top1 = 10.0 + 100 * cfg.lr
    (out / "metrics.jsonl").write_text(json.dumps({"kind": "train", "epoch": 0, "step": 1, "loss": 1.0}) + "\n"
                                       + json.dumps({"kind": "eval", "epoch": 0, "step": 1, "top1": top1}) + "\n")
    final = {"top1": top1, "top5": 50.0, "best_top1": top1, "train_time_s": 1.0, "images_per_s": 8.0, "steps": 1,
             "method": cfg.method, "method_args": cfg.method_args, "student": cfg.student,
             "online_teacher_cost": ["cache-only: no teacher compute at train time"]}
    (out / "final.json").write_text(json.dumps(final))
    return final


class Recorder:
    """Wraps a trainer and records every call's run name and resume flag."""

    def __init__(self, fn=fake_train, fail_on: str | None = None):
        self.fn, self.fail_on, self.calls = fn, fail_on, []

    def __call__(self, cfg: TrainConfig) -> dict:
        self.calls.append((Path(cfg.out).name, cfg.resume))
        if Path(cfg.out).name == self.fail_on:
            ckpt = Path(cfg.out) / "checkpoints" / "step_00000001"  # got as far as one checkpoint, then died
            ckpt.mkdir(parents=True)
            (ckpt / "featcache_state.json").write_text("{}")
            raise RuntimeError("killed mid-run")
        return self.fn(cfg)


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("sweep")
    data = make_image_folder(root / "images", classes=3, per_class=4)
    from featcache.extract import run_extract

    cfg = ExtractConfig(data=str(data), out=str(root / "cache"), teacher="deit3_small", pretrained=False,
                        img_size=32, teacher_kwargs={"depth": 3}, layers=[0, 1, -1], views=2, batch_size=8,
                        workers=0, device="cpu")
    return Path(run_extract(cfg, progress=False))


def spec_for(cache: Path, out: Path, **extra) -> SweepSpec:
    base = {**STUDENT, "epochs": 1, "batch_size": 8, "workers": 0, "fingerprint_checks": 2}
    return SweepSpec.from_dict({"cache": str(cache), "base": base, "out": str(out), **extra})


def test_run_names_are_readable_and_stable():
    assert run_name({"method": "vitkd+nkd", "lr": 0.001}) == "method=vitkd+nkd,lr=0.001"
    assert run_name({"method_args": {"temperature": 2}}) == "method_args.temperature=2"
    assert run_name({"student": "a/b c"}) == "student=a_b_c"
    spec = SweepSpec.from_dict({"cache": "c", "out": "o", "grid": {"method": ["kd", "nkd"], "lr": [1e-3, 5e-4]},
                                "runs": [{"name": "warm", "warmup_epochs": 1}, {}]})
    names = [p.name for p in expand_runs(spec)]
    assert len(names) == 8
    assert names[0] == "warm,method=kd,lr=0.001" and names[4] == "method=kd,lr=0.001"
    plan = expand_runs(spec)[1]
    assert plan.config.lr == 5e-4 and plan.config.warmup_epochs == 1 and plan.config.out == str(Path("o") / plan.name)


@pytest.mark.parametrize("bad, match", [
    ({"grid": {"method": ["kd", "nope"]}}, "unknown method 'nope'"),
    ({"runs": [{"method": "kd", "method_args": {"temprature": 2}}]}, "no argument"),
    ({"runs": [{"method": "vitkd+nkd", "method_args": {"kd": {}}}]}, "name no method of vitkd"),
    ({"base": {"epochs": 1, "batch": 3}}, "unknown TrainConfig keys"),
    ({"runs": [{"name": "x"}, {"name": "x"}]}, "share the name"),
    ({"threads": 0}, "threads must be a whole number >= 1"),
])
def test_every_config_is_validated_before_training(tmp_path, bad, match):
    rec = Recorder()
    with pytest.raises(SweepError, match=match):
        run_sweep(SweepSpec.from_dict({"cache": str(tmp_path / "c"), "out": str(tmp_path / "o"), **bad}),
                  train_fn=rec, report=False, log=lambda s: None)
    assert rec.calls == []


def test_missing_cache_without_extract_section_is_an_error(tmp_path):
    with pytest.raises(SweepError, match="does not exist"):
        run_sweep(SweepSpec.from_dict({"cache": str(tmp_path / "none"), "out": str(tmp_path / "o")}),
                  train_fn=Recorder(), log=lambda s: None)


def test_sweep_never_builds_the_teacher_and_rerun_trains_nothing(cache, tmp_path, monkeypatch):
    """Four real trainings (engine.train) over one complete cache; any teacher construction would raise."""
    def no_teacher(*args, **kwargs):
        raise AssertionError("the teacher was constructed")

    import timm

    import featcache.extract

    for module in (teachers, featcache.extract):
        for name in ("load_teacher", "teacher_from_manifest"):
            monkeypatch.setattr(module, name, no_teacher, raising=False)
    create_model = timm.create_model

    def students_only(name, *args, **kwargs):  # every model construction path ends here, however it was imported
        if name.startswith("deit3_small"):
            no_teacher()
        return create_model(name, *args, **kwargs)

    monkeypatch.setattr(timm, "create_model", students_only)
    with pytest.raises(AssertionError, match="constructed"):  # the guard itself works
        models.load_model("deit3_small", pretrained=False, img_size=32)
    from featcache.engine import train

    rec, lines = Recorder(train), []
    extract = {"data": str(cache.parent / "images"), "teacher": "deit3_small", "pretrained": False, "img_size": 32,
               "teacher_kwargs": {"depth": 3}, "layers": [0, 1, -1], "views": 2}
    spec = spec_for(cache, tmp_path / "runs", extract=extract,
                    base={**STUDENT, "epochs": 1, "max_steps": 1, "batch_size": 8, "workers": 0,
                          "fingerprint_checks": 2, "val": str(cache.parent / "images")},
                    runs=[{"method": "ce"}, {"method": "kd"}, {"method": "nkd"}, {"method": "vitkd+nkd"}])
    result = run_sweep(spec, train_fn=rec, log=lines.append)
    assert "cache complete: the teacher will not be run" in lines[1]
    assert "[method=kd] epoch 1/1: top-1" in "\n".join(lines)  # progress from metrics.jsonl
    assert sorted(n for n, _ in rec.calls) == sorted(result["runs"]) and len(rec.calls) == 4
    assert set(result["runs"].values()) == {"done"}
    for name in result["runs"]:
        assert (tmp_path / "runs" / name / "final.json").is_file()
    assert Path(result["report"]["png"]).stat().st_size > 0
    again = Recorder(train)
    result = run_sweep(spec, train_fn=again, log=lines.append)
    assert again.calls == [] and set(result["runs"].values()) == {"skipped"}
    assert "nothing to train: every run is finished" in lines


def test_killed_sweep_finishes_only_the_remaining_runs(cache, tmp_path):
    spec = spec_for(cache, tmp_path / "runs", grid={"lr": [0.1, 0.2, 0.3, 0.4]})
    first = Recorder(fail_on="lr=0.2")
    with pytest.raises(RuntimeError, match="killed"):
        run_sweep(spec, train_fn=first, fail_fast=True, log=lambda s: None)
    assert first.calls == [("lr=0.1", False), ("lr=0.2", False)]
    second = Recorder()
    result = run_sweep(spec, train_fn=second, log=lambda s: None)
    assert second.calls == [("lr=0.2", True), ("lr=0.3", False), ("lr=0.4", False)]
    assert result["runs"] == {"lr=0.1": "skipped", "lr=0.2": "done", "lr=0.3": "done", "lr=0.4": "done"}


def test_failed_run_does_not_stop_the_others(cache, tmp_path):
    spec = spec_for(cache, tmp_path / "runs", grid={"lr": [0.1, 0.2, 0.3]})
    rec = Recorder(fail_on="lr=0.2")
    with pytest.raises(SweepError, match="1 of 3 run"):
        run_sweep(spec, train_fn=rec, log=lambda s: None)
    assert [n for n, _ in rec.calls] == ["lr=0.1", "lr=0.2", "lr=0.3"]


def test_changed_config_under_the_same_name_is_refused(cache, tmp_path):
    run_sweep(spec_for(cache, tmp_path / "runs", grid={"lr": [0.1]}), train_fn=Recorder(), log=lambda s: None)
    changed = spec_for(cache, tmp_path / "runs", grid={"lr": [0.1]})
    changed.base["epochs"] = 2
    with pytest.raises(SweepError, match=r"different \['epochs'\]"):
        run_sweep(changed, train_fn=Recorder(), log=lambda s: None)


def test_jobs_run_in_parallel_processes(cache, tmp_path):
    lines = []
    result = run_sweep(spec_for(cache, tmp_path / "runs", grid={"lr": [0.1, 0.3]}), jobs=2,
                       train_fn=fake_train, log=lines.append)
    assert set(result["runs"].values()) == {"done"}
    assert any("2 trainings at once" in line for line in lines)
    assert "lr=0.3" in Path(result["report"]["csv"]).read_text()


def test_spec_file_with_recipe(cache, tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"method": "nkd", "epochs": 3, **STUDENT}))
    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(yaml.safe_dump({"cache": str(cache), "recipe": "recipe.yaml", "base": {"epochs": 1},
                                         "grid": {"lr": [0.1]}, "out": str(tmp_path / "runs")}))
    rec = Recorder()
    run_sweep(spec_path, train_fn=rec, report=False, log=lambda s: None)
    saved = yaml.safe_load((tmp_path / "runs" / "lr=0.1" / "sweep_run.yaml").read_text())
    assert saved["method"] == "nkd" and saved["epochs"] == 1 and rec.calls == [("lr=0.1", False)]


def test_paper_sweep_spec_expands(monkeypatch):
    monkeypatch.chdir(Path(__file__).resolve().parents[1])
    spec = SweepSpec.load("pipelines/paper_sweep.yaml")
    plans = {p.name: p.config for p in expand_runs(spec)}
    assert len(plans) == 5 and plans["vitkd_deit_tiny_from_deit3_small_nkd"].method == "vitkd+nkd"
    assert all(c.epochs == 30 and c.cache == spec.cache and c.lr == 1e-3 for c in plans.values())
    assert spec.extract["layers"] == [0, 1, 11] and spec.extract["teacher"] == "deit3_small"


def test_complete_cache_made_differently_is_refused(cache, tmp_path):
    extract = {"data": str(cache.parent / "images"), "teacher": "deit3_small", "pretrained": False, "img_size": 32,
               "teacher_kwargs": {"depth": 3}, "layers": [0, 1, -1], "views": 3, "hflip": 0.0}
    rec = Recorder()
    with pytest.raises(SweepError, match=r"different \['views', 'view recipe'\]"):
        run_sweep(spec_for(cache, tmp_path / "runs", extract=extract), train_fn=rec, log=lambda s: None)
    assert rec.calls == []


def test_complete_cache_with_other_storage_or_teacher_kwargs_is_refused(cache, tmp_path):
    """Every key of the storage section and the teacher's extra kwargs count, not only format and dtype."""
    extract = {"data": str(cache.parent / "images"), "teacher": "deit3_small", "pretrained": False, "img_size": 32,
               "teacher_kwargs": {"depth": 3, "drop_rate": 0.0}, "layers": [0, 1, -1], "views": 2,
               "shard_size": 1, "codec": "int8+zstd"}
    rec = Recorder()
    with pytest.raises(SweepError, match=r"different \['teacher_kwargs', 'shard_size', 'codec'\]"):
        run_sweep(spec_for(cache, tmp_path / "runs", extract=extract), train_fn=rec, log=lambda s: None)
    assert rec.calls == []


def test_extract_layers_resolve_as_extract_resolves_them(cache, tmp_path):
    """Block indices follow timm's feature_take_indices contract here as in `extract`: -1 is the last block, and an
    index past the end is refused (``i % num_blocks`` used to map 5 onto block 2 of this 3-block teacher)."""
    extract = {"data": str(cache.parent / "images"), "teacher": "deit3_small", "pretrained": False, "img_size": 32,
               "teacher_kwargs": {"depth": 3}, "layers": [0, 1, 2], "views": 2}
    rec = Recorder()
    run_sweep(spec_for(cache, tmp_path / "runs", extract=extract), train_fn=rec, report=False, log=lambda s: None)
    assert len(rec.calls) == 1  # [0, 1, 2] is the cache's [0, 1, -1]
    rec = Recorder()
    with pytest.raises(SweepError, match=r"extract.layers \[0, 1, 5\].*out of range"):
        run_sweep(spec_for(cache, tmp_path / "runs2", extract={**extract, "layers": [0, 1, 5]}), train_fn=rec,
                  report=False, log=lambda s: None)
    assert rec.calls == []
    from featcache.extract import run_extract

    with pytest.raises(ValueError, match="out of range"):  # extraction refuses the same layers
        run_extract(ExtractConfig(**{**extract, "layers": [0, 1, 5]}, out=str(tmp_path / "c5"), workers=0,
                                  device="cpu"), progress=False)


def test_sweep_cli_reports_errors_cleanly(tmp_path):
    from click.testing import CliRunner

    from featcache.cli import main

    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump({"cache": str(tmp_path / "none"), "out": str(tmp_path / "runs"),
                                    "grid": {"method": ["kd", "nkd"]}}))
    result = CliRunner().invoke(main, ["sweep", str(spec), "--jobs", "2"])
    assert result.exit_code == 1 and "does not exist" in result.output and "Traceback" not in result.output


def test_progress_monitor_prints_new_evaluations_once(tmp_path):
    from featcache import rundir
    from featcache.sweep import ProgressMonitor, RunPlan

    plan = RunPlan("r", TrainConfig(cache="c", out=str(tmp_path / "r"), epochs=3))
    plan.dir.mkdir()
    rundir.append_metrics(plan.dir, {"kind": "eval", "epoch": 0, "step": 1, "top1": 10.0})  # a killed run's
    lines = []
    monitor = ProgressMonitor([plan], lines.append)
    monitor.poll()
    assert lines == []
    rundir.truncate_metrics(plan.dir, step=1)  # the resumed run keeps it; the monitor must not print it again
    rundir.append_metrics(plan.dir, {"kind": "eval", "epoch": 1, "step": 2, "top1": 20.0})
    (plan.dir / "metrics.jsonl").open("a").write('{"kind": "eval", "epoch": 2, ')  # still being written
    monitor.poll()
    assert lines == ["[r] epoch 2/3: top-1 20.0 %"]


def test_a_job_records_its_sweep_config_only_when_it_starts(tmp_path):
    from featcache.sweep import Job, RunPlan

    job = Job(RunPlan("r", TrainConfig(cache="c", out=str(tmp_path / "r"))), resume=True)
    assert not job.plan.dir.exists()
    config = job.start()
    assert config.resume and not job.plan.config.resume
    assert yaml.safe_load((tmp_path / "r" / "sweep_run.yaml").read_text())["cache"] == "c"


def counting_train(cfg: TrainConfig) -> dict:
    """The real engine, noting the torch thread count each run trained with (module level, so --jobs pickles it)."""
    import torch

    from featcache.engine import train

    (Path(cfg.out) / "threads.txt").parent.mkdir(parents=True, exist_ok=True)
    (Path(cfg.out) / "threads.txt").write_text(str(torch.get_num_threads()))
    return train(cfg)


@pytest.mark.slow
def test_jobs_do_not_change_the_weights(cache, tmp_path, monkeypatch):
    """Weights depend on the torch thread count; every run gets the spec's `threads` whatever --jobs is, so a
    --jobs 2 sweep (two worker processes) gives the bytes of a --jobs 1 one (in this process, whose own thread count
    is 1 here and is put back afterwards)."""
    import torch

    from featcache.testing.caches import reset_accelerate

    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")  # 2 x 2 threads on a shared 2-core machine
    base = {**STUDENT, "epochs": 1, "max_steps": 2, "batch_size": 4, "workers": 0, "fingerprint_checks": 2}
    results = {}
    for jobs in (1, 2):
        reset_accelerate()
        spec = SweepSpec.from_dict({"cache": str(cache), "base": base, "grid": {"lr": [0.01, 0.02]}, "threads": 2,
                                    "out": str(tmp_path / f"jobs{jobs}")})
        assert set(run_sweep(spec, jobs=jobs, train_fn=counting_train, report=False,
                             log=lambda s: None)["runs"].values()) == {"done"}
        results[jobs] = {p.name: p for p in (tmp_path / f"jobs{jobs}").iterdir()}
    assert torch.get_num_threads() == 1
    for name, run in results[1].items():
        other = results[2][name]
        assert (run / "threads.txt").read_text() == (other / "threads.txt").read_text() == "2"
        assert (run / "student.safetensors").read_bytes() == (other / "student.safetensors").read_bytes(), name


def test_rerun_never_touches_a_run_directory_another_process_holds(cache, tmp_path):
    """A run killed before its first checkpoint is cleared by the next sweep, unless a live process holds it: then
    that run fails naming the holder's PID, its files stay, and the other runs train."""
    from featcache import rundir
    from featcache.testing.processes import lock_pid, start, wait_until

    spec = spec_for(cache, tmp_path / "runs", grid={"lr": [0.1, 0.2]})
    held = tmp_path / "runs" / "lr=0.1"
    held.mkdir(parents=True)
    (held / "metrics.jsonl").write_text(json.dumps({"kind": "train", "epoch": 0, "step": 1}) + "\n")
    hold = ("import sys, time\nfrom featcache import locks\n"
            "with locks.hold(sys.argv[1], sys.argv[1], 'featcache train'):\n    time.sleep(120)\n")
    holder = start(["-c", hold, str(held / rundir.LOCK_FILE)])
    try:
        wait_until(lambda: lock_pid(held / rundir.LOCK_FILE) == holder.pid, what="the holder's lock", proc=holder)
        rec = Recorder()
        with pytest.raises(SweepError, match=rf"1 of 2 run\(s\) failed.*lr=0.1.*PID {holder.pid}"):
            run_sweep(spec, train_fn=rec, report=False, log=lambda s: None)
        assert rec.calls == [("lr=0.2", False)]
        assert (held / "metrics.jsonl").is_file() and not (held / "sweep_run.yaml").exists()
    finally:
        holder.kill()
        holder.wait()
    result = run_sweep(spec, train_fn=Recorder(), report=False, log=lambda s: None)
    assert result["runs"] == {"lr=0.1": "done", "lr=0.2": "skipped"}
    assert sorted(p.name for p in held.iterdir()) == [".featcache.lock", "final.json", "metrics.jsonl",
                                                      "sweep_run.yaml"]
