"""What a training run shows: the start summary, log lines, evaluations, the end summary, train.log, the progress bar
on a terminal (none without one), --quiet, and the hyperparameters the trackers record."""
from __future__ import annotations

import contextlib
import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from featcache.testing.caches import STUDENT, make_cache, make_val, reset_accelerate

from featcache import engine, progress, rundir, trackers
from featcache.config import TrainConfig
from featcache.errors import ConfigError

pytestmark = pytest.mark.usefixtures("clean_accelerate")
SUMMARY = ("featcache train -> ", "cache ", "teacher ", "student ", "method ", "steps ", "optim ", "views ", "online ",
           "run on ")
TIMESTAMP = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d  ")


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    root = tmp_path_factory.mktemp("progress")
    data, path = make_cache(root)
    return {"root": root, "cache": path, "val": make_val(root)}


def config(cache, out, **kw) -> TrainConfig:
    base = dict(cache=cache["cache"], out=str(out), method="kd", epochs=2, batch_size=2, workers=0, log_every=2,
                seed=3, val=str(cache["val"]), **STUDENT)
    return TrainConfig(**{**base, **kw})


def train_capturing(cfg: TrainConfig) -> tuple[dict, str, str]:
    """Train with stdout and stderr captured as what they are in CI: not terminals."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        result = engine.train(cfg)
    return result, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def run(cache, tmp_path_factory):
    """One short run (2 epochs of 3 steps, a log line every 2 steps, --val) watched without a terminal."""
    reset_accelerate()
    out = tmp_path_factory.mktemp("runs") / "kd"
    result, stdout, stderr = train_capturing(config(cache, out))
    reset_accelerate()
    return {"out": out, "result": result, "stdout": stdout, "stderr": stderr}


def test_without_a_terminal_the_console_has_lines_and_no_bar(run):
    lines = run["stderr"].splitlines()
    assert "\r" not in run["stderr"] and "%|" not in run["stderr"], "a progress bar was drawn into a pipe"
    assert run["stdout"] == "", "the engine prints to stderr only; stdout is the command's result"
    assert [next(i for i, line in enumerate(lines) if line.startswith(s)) for s in SUMMARY] == list(range(len(SUMMARY)))
    steps = [line for line in lines if line.startswith("epoch ")]
    assert [line.split("  ")[1] for line in steps] == ["step 2/6", "step 3/6", "step 4/6", "step 6/6"]
    for line in steps:
        assert re.search(r"loss [\d.]+ \(ce [\d.]+, kd/loss [\d.e-]+\)  lr [\d.]+e-0\d  \d+ img/s  ETA \d:\d\d:\d\d$",
                         line), line
    evals = [line for line in lines if line.startswith("eval ")]
    assert [line.split("  ")[1:3] for line in evals] == [["epoch 1/2", "step 3/6"], ["epoch 2/2", "step 6/6"]]
    assert all(re.search(r"top-1 [\d.]+ %  top-5 [\d.]+ %  \(best top-1 [\d.]+ %\)$", line) for line in evals)
    top1 = run["result"]["top1"]
    assert lines[-2].startswith("done     6 steps in ") and f"top-1 {top1:.2f} %" in lines[-2]
    assert lines[-1].startswith("wrote    ") and "student/, student_best/ (timm format), student.json" in lines[-1]


def test_the_summary_names_what_runs(run, cache):
    lines = run["stderr"].splitlines()
    text = "\n".join(lines[:len(SUMMARY)])
    assert f"cache    {cache['cache']}: zarr, 6 samples x 2 views, fp32, 32 px" in text
    assert "teacher  deit3_small (deit3_small_patch16_224.fb_in22k_ft_in1k), blocks 0, 1, 11" in text
    assert "steps    6 = 2 epochs x 3 steps of 2 views (batch 2 x 1 process x 1 accumulated)" in text
    assert "optim    adamw, lr 0.001, cosine schedule, 0 warmup epochs" in text
    assert "views    --view-policy cycle" in text and "online   cache-only: no teacher compute" in text
    assert "mixed precision no; trackers: tensorboard" in text
    from safetensors.torch import load_file

    weights = sum(t.numel() for t in load_file(str(run["out"] / "student.safetensors")).values())
    shown = re.search(r"student  deit_tiny \{\"depth\": 4\}: ([\d.]+) M trainable parameters", text)
    assert shown and float(shown.group(1)) == pytest.approx(weights / 1e6, abs=0.006), text
    assert "method   kd (label CE weight 1): " in text and "0 of them the method's own" in text


def test_the_log_file_holds_every_console_line_with_a_timestamp(run):
    logged = (run["out"] / rundir.LOG_FILE).read_text().splitlines()
    assert all(TIMESTAMP.match(line) for line in logged)
    assert [TIMESTAMP.sub("", line) for line in logged] == run["stderr"].splitlines()


def test_quiet_keeps_the_console_silent_and_still_writes_the_log(cache, tmp_path):
    result, stdout, stderr = train_capturing(config(cache, tmp_path / "q", quiet=True, epochs=1))
    assert stdout == "" and not any(line.startswith(SUMMARY + ("epoch ", "eval ", "done ")) for line in
                                    stderr.splitlines()), stderr
    logged = (tmp_path / "q" / rundir.LOG_FILE).read_text()
    assert "featcache train -> " in logged and "eval  epoch 1/1" in logged and "done     3 steps" in logged


def test_a_resumed_run_appends_to_its_log(cache, tmp_path):
    out = tmp_path / "r"
    train_capturing(config(cache, out, epochs=1))
    reset_accelerate()
    (out / rundir.FINAL_FILE).unlink()  # as if killed after its last checkpoint
    _, _, stderr = train_capturing(config(cache, out, epochs=1, resume=True))
    assert "resumed from " in stderr and "(epoch 2, step 3)" in stderr
    logged = (out / rundir.LOG_FILE).read_text()
    assert logged.count("featcache train -> ") == 2 and "resumed from " in logged


def test_the_bar_draws_on_a_terminal_with_loss_lr_throughput_and_eta(tmp_path):
    """Console on a real pseudo-terminal: tqdm's bar, redrawn in place, with the last log line's numbers."""
    master, slave = open_terminal()
    with open(slave, "w", closefd=True) as tty:
        console = progress.Console(tmp_path / "train.log", show=True, stream=tty)
        console.start(total=4, done=0, epochs=2)
        console.epoch(0)
        for step in (1, 2):
            console.advance(step)
        console.train({"kind": "train", "epoch": 0, "step": 2, "loss": 1.5, "ce": 1.0, "lr": 1e-3,
                       "images_per_s": 321.0})
        console.advance(4)
        console.end(["done"])
        tty.flush()
    screen = read_all(master)
    assert "\r" in screen and "%|" in screen and "steps [" in screen and "ETA " in screen
    assert "loss 1.5, lr 1.00e-03, 321 img/s" in screen
    assert "epoch 1/2  step 2/4  loss 1.5 (ce 1)  lr 1.00e-03  321 img/s  ETA " in screen
    assert "done" in (tmp_path / "train.log").read_text() and "%|" not in (tmp_path / "train.log").read_text()


def open_terminal() -> tuple[int, int]:
    """A pseudo-terminal 120 columns wide (a fresh one has no size, and tqdm would draw nothing)."""
    import fcntl
    import struct
    import termios

    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    return master, slave


def read_all(master: int) -> str:
    chunks = []
    while True:
        try:
            data = os.read(master, 65536)
        except OSError:  # EIO: every writer closed
            break
        if not data:
            break
        chunks.append(data)
    os.close(master)
    return b"".join(chunks).decode(errors="replace")


@pytest.mark.slow
def test_featcache_train_on_a_terminal_shows_the_bar(cache, tmp_path):
    """The real command under a pseudo-terminal: summary, bar, lines, end summary; the result on stdout."""
    out = tmp_path / "tty"
    master, slave = open_terminal()
    args = [sys.executable, "-m", "featcache.cli", "train", "--cache", cache["cache"], "--out", str(out), "--method",
            "kd", "--student", "deit_tiny", "--student-kwargs", '{"depth": 4}', "--img-size", "32", "--epochs", "2",
            "--batch-size", "2", "--workers", "0", "--log-every", "2", "--val", str(cache["val"])]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=slave, env=dict(os.environ, OMP_NUM_THREADS="1"))
    os.close(slave)
    screen = read_all(master)
    stdout = proc.communicate(timeout=300)[0].decode()
    assert proc.returncode == 0, screen[-3000:]
    assert json.loads(stdout)["steps"] == 6
    assert re.search(r"epoch 2/2 100%\|.*\| 6/6 steps \[[\d:]+, ETA [\d:]+, loss [\d.]+, lr [\d.e-]+, \d+ img/s\]",
                     screen), screen[-3000:]
    assert "featcache train -> " in screen and "eval  epoch 2/2" in screen and "done     6 steps" in screen


# ------------------------------------------------------------------------------------------------ trackers


def hparams_in(tensorboard_dir: Path) -> dict:
    """The hyperparameters TensorBoard's hparams plugin reads from the event files below ``tensorboard_dir``."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
    from tensorboard.plugins.hparams import plugin_data_pb2

    found = {}
    for path in tensorboard_dir.rglob("events.out.tfevents.*"):
        for event in EventFileLoader(str(path)).Load():
            for value in event.summary.value:
                if value.metadata.plugin_data.plugin_name == "hparams":
                    data = plugin_data_pb2.HParamsPluginData.FromString(value.metadata.plugin_data.content)
                    for key, v in data.session_start_info.hparams.items():
                        found[key] = getattr(v, v.WhichOneof("kind"))
    return found


def scalar_tags(tensorboard_dir: Path) -> set[str]:
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    return {v.tag for p in tensorboard_dir.rglob("events.out.tfevents.*") for e in EventFileLoader(str(p)).Load()
            for v in e.summary.value if v.metadata.plugin_data.plugin_name != "hparams"}


def test_tensorboard_event_files_hold_the_resolved_config_as_hyperparameters(run):
    logged = hparams_in(run["out"] / rundir.TENSORBOARD_DIR)
    saved = yaml.safe_load((run["out"] / rundir.CONFIG_FILE).read_text())
    assert logged == {k: v for k, v in trackers.hyperparameters({**saved, "num_processes": 1}).items()
                      if v is not None}
    assert logged["img_size"] == 32 and logged["ce_weight"] == 1.0 and logged["mixed_precision"] == "no"
    assert logged["method"] == "kd" and logged["student_kwargs.depth"] == 4 and logged["betas"] == "[0.9, 0.999]"
    assert {"train/loss", "train/lr", "eval/top1"} <= scalar_tags(run["out"] / rundir.TENSORBOARD_DIR)


def test_report_to_none_writes_no_tracker_files(cache, tmp_path):
    train_capturing(config(cache, tmp_path / "none", report_to="none", max_steps=1))
    assert not (tmp_path / "none" / rundir.TENSORBOARD_DIR).exists()


def test_report_to_refuses_unknown_and_missing_trackers():
    import importlib.util

    from accelerate.utils import LoggerType

    assert trackers.log_with("none") is None and trackers.log_with("") is None
    assert trackers.log_with("tensorboard") == trackers.log_with(" TensorBoard,tensorboard") == ["tensorboard"]
    assert "tensorboard" in trackers.log_with("all")
    with pytest.raises(ConfigError, match=r"unknown tracker\(s\) \['tensorbored'\].*tensorboard, .*or none"):
        trackers.log_with("tensorboard,tensorbored")
    absent = [n for n in LoggerType.list() if n != "all" and importlib.util.find_spec(n) is None]
    for name in absent:  # wandb, mlflow, ... when not installed: refused, not dropped
        with pytest.raises(ConfigError, match=rf"{name} not installed; `pip install {name}`"):
            trackers.log_with(f"tensorboard,{name}")


def test_hyperparameters_are_scalars():
    flat = trackers.hyperparameters({"lr": 1e-3, "layers": [0, 1], "method_args": {"vitkd": {"alpha": 3e-5}},
                                     "val": None, "resume": False})
    assert flat == {"lr": 1e-3, "layers": "[0, 1]", "method_args.vitkd.alpha": 3e-5, "val": None, "resume": False}


def test_mixed_precision_comes_from_accelerate_unless_the_flag_is_given(cache, tmp_path, monkeypatch):
    """`accelerate launch --mixed_precision bf16` (or its config file) reaches the process as this variable."""
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    _, _, stderr = train_capturing(config(cache, tmp_path / "env", max_steps=1, val=None))
    assert yaml.safe_load((tmp_path / "env" / rundir.CONFIG_FILE).read_text())["mixed_precision"] == "bf16"
    assert "mixed precision bf16" in stderr and "warning" not in stderr
    reset_accelerate()
    _, _, stderr = train_capturing(config(cache, tmp_path / "flag", max_steps=1, val=None, mixed_precision="no"))
    assert yaml.safe_load((tmp_path / "flag" / rundir.CONFIG_FILE).read_text())["mixed_precision"] == "no"
    assert "mixed precision no" in stderr


def test_a_launch_that_started_one_process_instead_of_several_says_so(cache, tmp_path, monkeypatch):
    """What `accelerate launch --num_processes 2` (no --multi_gpu) leaves a single CPU process (checked by hand)."""
    for key, value in {"ACCELERATE_MIXED_PRECISION": "no", "ACCELERATE_USE_CPU": "False", "MASTER_PORT": "29500",
                       "MASTER_ADDR": "127.0.0.1"}.items():
        monkeypatch.setenv(key, value)
    _, _, stderr = train_capturing(config(cache, tmp_path / "alone", max_steps=1, val=None))
    assert "warning  `accelerate launch` started this one process" in stderr and "--multi_gpu" in stderr


def test_a_run_that_stops_on_an_error_says_so_in_its_log(cache, tmp_path, monkeypatch):
    def dies(run, state, meter):
        raise RuntimeError("disk full")

    monkeypatch.setattr(engine, "after_step", dies)
    with pytest.raises(RuntimeError, match="disk full"):
        train_capturing(config(cache, tmp_path / "dies", val=None))
    last = (tmp_path / "dies" / rundir.LOG_FILE).read_text().splitlines()[-1]
    assert TIMESTAMP.match(last) and last.endswith("stopped by RuntimeError: disk full")


def test_eval_lines_show_the_ema_and_train_lines_the_parts_of_one_method():
    record = {"kind": "eval", "epoch": 0, "step": 3, "top1": 41.2, "top5": 80.0, "ema_top1": 40.0, "ema_top5": 79.0}
    assert progress.eval_line(record, 6, 2, 41.2) == (
        "eval  epoch 1/2  step 3/6  top-1 41.20 %  top-5 80.00 %  EMA top-1 40.00 %  (best top-1 41.20 %)")
    train = {"kind": "train", "epoch": 1, "step": 4, "loss": 2.0, "ce": 1.0, "vitkd/mimic": 0.5,
             "vitkd/generation": 0.25, "lr": 5e-4, "images_per_s": 99.6}
    assert progress.train_line(train, 6, 2, 61.0) == ("epoch 2/2  step 4/6  loss 2 (ce 1, vitkd/mimic 0.5, "
                                                      "vitkd/generation 0.25)  lr 5.00e-04  100 img/s  ETA 0:01:01")
