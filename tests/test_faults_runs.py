"""Fault injection for writers and runs: locks on every --out, SIGKILL of training at random points, two writers on
one --out, a killed sweep parent, and the bad inputs that must end in one line naming the file or value."""
from __future__ import annotations

import fcntl
import json
import os
import random
import signal
import threading
import time
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner
from featcache.testing.caches import CACHE_ARGS, STUDENT, make_cache, reset_accelerate
from featcache.testing.processes import gone, lock_pid, start, wait_until
from featcache.testing.toystore import snapshot, toy_manifest, toy_records, toy_targets, unit_slice

from featcache import engine, locks, rundir
from featcache.cli import main
from featcache.config import ExtractConfig, TrainConfig
from featcache.errors import LockedError
from featcache.extract import lock_file, run_extract
from featcache.stores import _units, create_writer, open_reader
from featcache.stores.encodings import encode_targets

pytestmark = pytest.mark.usefixtures("clean_accelerate")

HOLD = ("import sys, time\nfrom featcache import locks\nwith locks.hold(sys.argv[1], sys.argv[1], 'test holder'):\n"
        "    time.sleep(120)\n")


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("faults_runs")
    data, path = make_cache(root)
    return {"root": root, "data": data, "cache": path}


def train_args(cache: dict, out: Path, epochs: int = 4) -> list[str]:
    """`featcache train` of the 4-block deit_tiny student: 3 steps per epoch, a checkpoint every 2 steps."""
    return ["train", "--cache", cache["cache"], "--out", str(out), "--method", "vitkd", "--student", "deit_tiny",
            "--student-kwargs", '{"depth": 4}', "--img-size", "32", "--epochs", str(epochs), "--batch-size", "2",
            "--workers", "0", "--seed", "3", "--checkpoint-every", "2", "--log-every", "1"]


def train_config(cache: dict, out: Path, epochs: int = 4, **kw) -> TrainConfig:
    """The same run as :func:`train_args`, in-process."""
    return TrainConfig(cache=cache["cache"], out=str(out), method="vitkd", epochs=epochs, batch_size=2, workers=0,
                       seed=3, checkpoint_every=2, log_every=1, **STUDENT, **kw)


def holding(path: Path):
    """A separate process holding the lock file ``path`` until killed."""
    proc = start(["-c", HOLD, str(path)])
    wait_until(lambda: lock_pid(path) == proc.pid, what="the holder to take the lock", proc=proc)
    return proc


def is_locked(path: Path) -> bool:
    """Whether any process holds ``path`` (probed on a descriptor of our own, outside the lock registry)."""
    fd = os.open(path, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def assert_steps_logged_once(run_dir: Path, steps: int) -> None:
    records = rundir.read_metrics(run_dir)
    assert [r["step"] for r in records if r["kind"] == "train"] == list(range(1, steps + 1))


# ------------------------------------------------------------------------------------------------ the lock itself


def test_a_held_lock_refuses_naming_the_pid_and_dies_with_its_holder(tmp_path):
    path = tmp_path / "out" / rundir.LOCK_FILE
    proc = holding(path)
    with pytest.raises(LockedError, match=rf"'{tmp_path}' is being written by PID {proc.pid} \(test holder"):
        locks.acquire(path, tmp_path, "second writer")
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    with locks.hold(path, tmp_path, "after the kill"):  # released by the kernel: no stale lock to delete
        assert json.loads(path.read_text())["pid"] == os.getpid()


def test_a_process_may_retake_its_own_lock_and_forked_children_never_hold_it(tmp_path):
    path = tmp_path / rundir.LOCK_FILE
    with locks.hold(path, tmp_path, "outer"):
        with locks.hold(path, tmp_path, "inner (the engine inside a sweep job)"):
            assert is_locked(path)
        assert is_locked(path)  # the outer hold still counts
        child = os.fork()
        if child == 0:  # a DataLoader-like child that outlives its parent's hold
            time.sleep(30)
            os._exit(0)
    try:  # the child closes its copy as soon as it runs (it may not have been scheduled yet)
        wait_until(lambda: not is_locked(path), timeout=10, what="the forked child to let go of the lock")
        assert not gone(child)
    finally:
        os.kill(child, signal.SIGKILL)
        os.waitpid(child, 0)


def test_webdataset_writers_never_share_a_temp_file(tmp_path, monkeypatch):
    """Writer A's finished temp tar waits to be published while writer B writes and publishes the same unit: with a
    shared temp name B would overwrite and rename A's file away, and A's publish would fail or publish B's bytes."""
    m = toy_manifest("wds")
    stored, records = encode_targets(toy_targets(m), m["storage"]), toy_records(m)
    a, b = (create_writer(tmp_path / "c", m, format="wds") for _ in range(2))
    real_publish, first, release, errors = _units.publish, threading.Event(), threading.Event(), []

    def slow_first_publish(tmp: Path, final: Path) -> None:
        if not first.is_set():
            first.set()
            release.wait(30)
        real_publish(tmp, final)

    monkeypatch.setattr(_units, "publish", slow_first_publish)

    def write_a() -> None:
        try:
            a.write_unit(0, unit_slice(m, stored, 0), unit_slice(m, records, 0))
        except Exception as err:  # surfaced below
            errors.append(err)

    thread = threading.Thread(target=write_a)
    thread.start()
    assert first.wait(30)
    b.write_unit(0, unit_slice(m, stored, 0), unit_slice(m, records, 0))
    release.set()
    thread.join(30)
    assert errors == []
    for u in range(1, m.num_units):
        b.write_unit(u, unit_slice(m, stored, u), unit_slice(m, records, u))
    b.finalize()
    reader = open_reader(tmp_path / "c")
    for row in m.unit_rows(0):
        assert reader.read_stored_row(row)["block_0"].tobytes() == stored["block_0"][row].tobytes()
    assert not list((tmp_path / "c").glob(".shard-*"))


# ------------------------------------------------------------------------------------------------ two writers


@pytest.mark.slow
def test_a_second_extraction_on_one_out_is_refused_and_the_first_finishes(cache, tmp_path):
    out = tmp_path / "cache"
    args = dict(CACHE_ARGS, data=str(cache["data"]), out=str(out))
    cli = ["extract", "--data", args["data"], "--out", str(out), "--teacher", "deit3_small", "--no-pretrained",
           "--img-size", "32", "--layers", "0,1,11", "--views", "2", "--shots", "2", "--dtype", "fp32",
           "--workers", "0", "--batch-size", "8", "--device", "cpu", "--shard-size", "4"]
    first = start(cli)
    wait_until(lambda: lock_pid(lock_file(out)) == first.pid, timeout=180, what="the first extraction's lock",
               proc=first, interval=0.005)
    os.kill(first.pid, signal.SIGSTOP)  # frozen while holding it: the second writer meets a live holder
    try:
        before = snapshot(out) if out.exists() else {}
        with pytest.raises(LockedError, match=f"PID {first.pid}"):
            run_extract(ExtractConfig(**args), progress=False)
        result = CliRunner().invoke(main, cli)
        assert result.exit_code == 1 and f"PID {first.pid}" in result.output
        assert result.output.count("\n") == 1 and result.output.startswith("Error: ")
        assert (snapshot(out) if out.exists() else {}) == before  # the refused writers touched nothing
    finally:
        os.kill(first.pid, signal.SIGCONT)
    assert first.wait(180) == 0, first.stderr.read()[-2000:]
    assert open_reader(out).manifest.complete


@pytest.mark.slow
def test_a_second_training_on_one_out_is_refused_and_the_first_finishes(cache, tmp_path):
    out = tmp_path / "run"
    first = start(train_args(cache, out, epochs=2))
    wait_until(lambda: lock_pid(out / rundir.LOCK_FILE) == first.pid, timeout=180, what="the first run's lock",
               proc=first, interval=0.005)
    os.kill(first.pid, signal.SIGSTOP)
    try:
        before = snapshot(out)
        for resume in (False, True):
            with pytest.raises(LockedError, match=f"PID {first.pid}"):
                engine.train(train_config(cache, out, epochs=2, resume=resume))
        assert snapshot(out) == before
    finally:
        os.kill(first.pid, signal.SIGCONT)
    assert first.wait(180) == 0, first.stderr.read()[-2000:]
    assert json.loads((out / rundir.FINAL_FILE).read_text())["steps"] == 6
    assert_steps_logged_once(out, 6)


# ------------------------------------------------------------------------------------------------ kills


class Killed(Exception):
    pass


def test_resume_without_a_checkpoint_starts_a_clean_log(cache, tmp_path, monkeypatch):
    """A run that died before its first checkpoint left 2 logged steps; --resume redoes them, logged once."""
    def dies_at_first_checkpoint(run, state):
        raise Killed

    with monkeypatch.context() as m:
        m.setattr(engine, "save_checkpoint", dies_at_first_checkpoint)
        with pytest.raises(Killed):
            engine.train(train_config(cache, tmp_path / "run", epochs=1))
    assert [r["step"] for r in rundir.read_metrics(tmp_path / "run")] == [1, 2]
    reset_accelerate()
    assert engine.train(train_config(cache, tmp_path / "run", epochs=1, resume=True))["steps"] == 3
    assert_steps_logged_once(tmp_path / "run", 3)


def last_step(out: Path) -> int:
    return max((int(r.get("step", 0)) for r in rundir.read_metrics(out)), default=0)


def kill_at(proc, out: Path, target: int, delay: float) -> None:
    """SIGKILL ``proc`` ``delay`` s after it logs step ``target`` (0: after it takes its lock, i.e. in its startup)."""
    def reached() -> bool:
        if target == 0:
            return lock_pid(out / rundir.LOCK_FILE) == proc.pid
        return last_step(out) >= target

    wait_until(lambda: reached() or proc.poll() is not None, timeout=180, what=f"step {target}")
    time.sleep(delay)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()


@pytest.mark.slow
def test_sigkill_of_training_at_random_points_then_resume_gives_the_same_bytes(cache, tmp_path):
    """Three SIGKILLs of a real `featcache train`, each followed by --resume: one in its startup (no checkpoint yet:
    the resume must start a clean log), then two at random later steps, each after a random delay (so inside a step,
    a log write or a checkpoint). The weights equal an uninterrupted run's byte for byte and every step is logged
    exactly once. ``FEATCACHE_FAULT_SEED`` picks other points."""
    engine.train(train_config(cache, tmp_path / "full"))
    out, rng = tmp_path / "killed", random.Random(int(os.environ.get("FEATCACHE_FAULT_SEED", "10")))
    for attempt in range(3):
        # Only this process can log a step past what the killed ones logged, so it is the one that reached it.
        target = 0 if attempt == 0 else rng.randint(min(last_step(out) + 1, 11), 11)
        proc = start(train_args(cache, out) + (["--resume"] if attempt else []))
        kill_at(proc, out, target, rng.uniform(0.0, 0.3))
        assert proc.returncode in (-signal.SIGKILL, 0)
    done = start(train_args(cache, out) + ["--resume"])
    assert done.wait(300) == 0, done.stderr.read()[-2000:]
    full = (tmp_path / "full" / rundir.STUDENT_WEIGHTS).read_bytes()
    assert (out / rundir.STUDENT_WEIGHTS).read_bytes() == full
    assert_steps_logged_once(out, 12)


SWEEP_BASE = {**STUDENT, "method": "vitkd", "epochs": 3, "batch_size": 2, "workers": 0, "seed": 3,
              "checkpoint_every": 1, "log_every": 1}


@pytest.mark.slow
def test_killed_sweep_parent_takes_its_workers_along_and_a_rerun_finishes_it(cache, tmp_path):
    from featcache.sweep import SweepSpec, run_sweep

    spec = {"cache": cache["cache"], "base": SWEEP_BASE, "grid": {"lr": [0.001, 0.002]}, "out": str(tmp_path / "runs")}
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    parent = start(["sweep", str(tmp_path / "spec.yaml"), "--jobs", "2", "--no-report"])
    runs = [tmp_path / "runs" / name for name in ("lr=0.001", "lr=0.002")]

    def workers() -> list[int]:
        pids = [lock_pid(run / rundir.LOCK_FILE) for run in runs]
        return pids if all(p and p != parent.pid and not gone(p) for p in pids) else []

    wait_until(lambda: workers() and rundir.latest_checkpoint(runs[0]) is not None, timeout=300,
               what="both workers training and a checkpoint", proc=parent)
    pids = workers()
    os.kill(parent.pid, signal.SIGKILL)
    parent.wait()
    wait_until(lambda: all(gone(p) for p in pids), timeout=30, what=f"the orphaned workers {pids} to exit")
    wait_until(lambda: not any(is_locked(run / rundir.LOCK_FILE) for run in runs), timeout=30,
               what="their run directories' locks to go with them")
    assert not any((run / rundir.FINAL_FILE).exists() for run in runs)  # no orphan trained on to the end

    result = run_sweep(SweepSpec.from_dict(spec), report=False, log=lambda s: None)  # every lock was released
    assert "done" in result["runs"].values() and set(result["runs"].values()) <= {"done", "skipped"}
    reset_accelerate()
    reference = run_sweep(SweepSpec.from_dict({**spec, "out": str(tmp_path / "reference")}), report=False,
                          log=lambda s: None)
    assert set(reference["runs"].values()) == {"done"}
    for run in runs:
        assert_steps_logged_once(run, 9)
        ref = tmp_path / "reference" / run.name / rundir.STUDENT_WEIGHTS
        assert (run / rundir.STUDENT_WEIGHTS).read_bytes() == ref.read_bytes(), run.name


# ------------------------------------------------------------------------------------------------ bad inputs


def pickle_checkpoint(path: Path) -> Path:
    """A torch file holding a Python object besides tensors (what the restricted loader refuses)."""
    torch.save({"state_dict": {"w": torch.zeros(1)}, "optimizer": Killed("not a tensor")}, path)
    return path


def bad_inputs(tmp: Path, cache: dict) -> dict[str, tuple[list[str], str]]:
    """Each bad input: the command line, and a piece of the one-line error it must give."""
    marker = tmp / "payload-ran"
    (tmp / "tagged.yaml").write_text(f"epochs: !!python/object/apply:os.system ['touch {marker}']\n")
    (tmp / "spec.yaml").write_text(f"cache: c\nout: o\nbase: !!python/object/apply:os.system ['touch {marker}']\n")
    extract = ["extract", "--data", str(cache["data"]), "--out", str(tmp / "c"), "--teacher", "deit3_small",
               "--no-pretrained", "--img-size", "32", "--device", "cpu", "--workers", "0"]
    train = train_args(cache, tmp / "run", epochs=1)
    return {
        "yaml python tag (train --config)": (train + ["--config", str(tmp / "tagged.yaml")], "tagged.yaml line 1"),
        "yaml python tag (sweep spec)": (["sweep", str(tmp / "spec.yaml")], "spec.yaml line 3"),
        "pickle checkpoint": (extract + ["--checkpoint", str(pickle_checkpoint(tmp / "pickled.pth"))],
                              "pickled.pth' cannot be loaded safely"),
        "teacher kwargs timm rejects": (extract + ["--teacher-kwargs", '{"depht": 2}'], "{'depht': 2}"),
        "student kwargs timm rejects": (train[:train.index("--student-kwargs") + 1] + ['{"embed_dim": 50}']
                                        + train[train.index("--student-kwargs") + 2:], "{'embed_dim': 50}"),
    }


def test_bad_inputs_end_in_one_line_naming_the_file_or_value(cache, tmp_path):
    for case, (args, named) in bad_inputs(tmp_path, cache).items():
        reset_accelerate()
        result = CliRunner().invoke(main, args)
        out = result.output
        assert result.exit_code == 1, (case, out)
        assert out.startswith("Error: ") and out.count("\n") == 1, (case, out)
        assert named in out and "Traceback" not in out, (case, out)
        assert "weights_only" not in out and "add_safe_globals" not in out, (case, out)  # no unsafe advice
    assert not (tmp_path / "payload-ran").exists()


@pytest.mark.slow
def test_a_refused_distributed_training_stops_on_every_process(cache, tmp_path):
    """Under torchrun only the main process takes the lock; when it is refused, the whole group ends (no rank is
    left waiting at a collective) and the held directory is not touched."""
    import subprocess
    import sys

    out = tmp_path / "run"
    holder = holding(out / rundir.LOCK_FILE)
    try:
        before = snapshot(out)
        env = dict(os.environ, ACCELERATE_USE_CPU="true", OMP_NUM_THREADS="1")
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "featcache.cli",
               *train_args(cache, out, epochs=1)]
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode != 0
        assert f"is being written by PID {holder.pid}" in done.stderr + done.stdout
        assert snapshot(out) == before
    finally:
        holder.kill()
        holder.wait()
