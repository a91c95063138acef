"""Multi-process extraction: real processes under torchrun and accelerate launch (2 CPU processes, gloo).

A random-init 4-block, width-48 ViT teacher at 32 px over 12 images x 2 views, in units of 2 rows (12 units). The
processes run a wrapper of ``featcache.cli`` (:data:`RANK_CLI`) that records every file each one writes and can make
rank 1 fail, hang or kill the whole job at its n-th unit marker, in the real code path.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from featcache.config import ExtractConfig
from featcache.distributed import Ranks, detect
from featcache.extract import run_extract
from featcache.stores import open_reader
from featcache.testing.caches import TINY_VIT_TEACHER
from featcache.testing.faults import cache_content, tree_bytes
from featcache.testing.images import make_image_folder
from featcache.testing.processes import CHILD_ENV, gone, wait_until

EXTRACT = dict(teacher="vit_tiny_patch16_224", pretrained=False, img_size=32, num_classes=3,
               teacher_kwargs=TINY_VIT_TEACHER, layers=[0, -1], views=2, shard_size=2, workers=0, batch_size=3,
               device="cpu", dtype="fp32")

# featcache.cli, with every file this process writes under the cache recorded (FC_WRITES: where to put the list), and
# rank 1 failing, hanging or SIGKILLing the whole job just before it marks its FC_AT-th unit (FC_FAULT).
RANK_CLI = textwrap.dedent("""
    import builtins, io, json, os, signal, sys, time
    from featcache.errors import CacheError
    from featcache.stores import _units
    from featcache.cli import main

    rank, cache, written = int(os.environ["RANK"]), os.path.realpath(os.environ["FC_CACHE"]), set()
    with open(os.path.join(os.environ["FC_WRITES"], f"pid_{rank}"), "w") as fh:
        fh.write(str(os.getpid()))

    def note(path):
        if isinstance(path, (str, bytes, os.PathLike)):
            full = os.path.realpath(os.fsdecode(path))
            if full.startswith(cache + os.sep):
                written.add(os.path.relpath(full, cache))

    real_open, real_os_open, real_replace, real_rename, real_link = open, os.open, os.replace, os.rename, os.link
    def open_(file, mode="r", *a, **k):  # each call is noted once it succeeded (an exclusive create may fail)
        got = real_open(file, mode, *a, **k)
        if any(c in mode for c in "wax+"):
            note(file)
        return got
    def os_open(path, flags, *a, **k):
        got = real_os_open(path, flags, *a, **k)
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            note(path)
        return got
    def renamer(real):
        def rename(src, dst, *a, **k):
            got = real(src, dst, *a, **k)
            note(dst)
            return got
        return rename
    builtins.open = io.open = open_
    os.open, os.replace, os.rename, os.link = os_open, renamer(real_replace), renamer(real_rename), renamer(real_link)

    fault, at, marks = os.environ.get("FC_FAULT"), int(os.environ.get("FC_AT", "1")), [0]
    real_mark = _units.FileMarkers.write
    def mark(self, unit, note):
        marks[0] += 1
        if rank == 1 and marks[0] == at:
            if fault == "kill":  # the test then SIGKILLs the whole job at once, as a scheduler would
                real_open(os.path.join(os.environ["FC_WRITES"], "kill_me"), "w").close()
                time.sleep(600)
            if fault == "fail":
                raise CacheError("injected failure")
            if fault == "hang":
                time.sleep(600)
        return real_mark(self, unit, note)
    _units.FileMarkers.write = mark

    try:
        main()
    finally:
        with real_open(os.path.join(os.environ["FC_WRITES"], f"writes_{rank}.json"), "w") as fh:
            json.dump(sorted(written), fh)
""")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def cli_args(data: Path, out: Path, fmt: str = "zarr", **extra: str) -> list[str]:
    args = ["extract", "--data", str(data), "--out", str(out), "--format", fmt]
    for key, value in {**EXTRACT, **extra}.items():
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            args.append(flag if value else f"--no-{flag[2:]}")
        else:
            args += [flag, json.dumps(value) if isinstance(value, dict) else
                     ",".join(map(str, value)) if isinstance(value, list) else str(value)]
    return args


def launch(tmp_path: Path, args: list[str], fault: str | None = None, at: int = 1, launcher: str = "torchrun"
           ) -> subprocess.Popen:
    """2 processes of :data:`RANK_CLI` ARGS; the launcher in a session of its own, each rank too (torchrun's way)."""
    script = tmp_path / "rank_cli.py"
    script.write_text(RANK_CLI)
    out = args[args.index("--out") + 1]
    env = dict(os.environ, **CHILD_ENV, CUDA_VISIBLE_DEVICES="", FC_CACHE=out, FC_WRITES=str(tmp_path),
               FC_FAULT=fault or "", FC_AT=str(at))
    port = str(free_port())
    if launcher == "torchrun":
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
               "--master_addr", "127.0.0.1", "--master_port", port]
    else:  # what `accelerate launch` runs on a machine without GPUs when told of 2 processes (it then runs torchrun)
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_ip",
               "127.0.0.1", "--main_process_port", port]
    return subprocess.Popen([*cmd, str(script), *args], env=env, start_new_session=True,
                            stdout=(tmp_path / "stdout").open("w"), stderr=(tmp_path / "stderr").open("w"))


def finish(proc: subprocess.Popen, tmp_path: Path, timeout: float = 300) -> tuple[int, str, str]:
    """Wait for a launched job; its return code, stdout and stderr."""
    try:
        proc.wait(timeout)
    finally:
        os.killpg(proc.pid, signal.SIGKILL) if proc.poll() is None else None
    return proc.returncode, (tmp_path / "stdout").read_text(), (tmp_path / "stderr").read_text()


def writes(tmp_path: Path) -> list[set[str]]:
    return [set(json.loads((tmp_path / f"writes_{rank}.json").read_text())) for rank in (0, 1)]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("imgs"), classes=3, per_class=4, size=(36, 40))


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread, like the child processes (CHILD_ENV), so the bytes can match."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory, one_thread):
    """fmt -> a 1-process extraction of the same cache (in this process, one thread)."""
    root, made = tmp_path_factory.mktemp("ref"), {}

    def get(fmt: str) -> Path:
        if fmt not in made:
            made[fmt] = Path(run_extract(ExtractConfig(data=str(data), out=str(root / fmt), format=fmt, **EXTRACT),
                                         progress=False))
        return made[fmt]
    return get


# ------------------------------------------------------------------------------------------------ launcher detection

@pytest.mark.parametrize("env, want", [
    ({}, Ranks(0, 1, 0)),
    ({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"}, Ranks(3, 4, 1)),  # torchrun
    ({"OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_LOCAL_RANK": "1"}, Ranks(1, 2, 1)),
    ({"PMI_RANK": "2", "PMI_SIZE": "3", "MPI_LOCALRANKID": "0"}, Ranks(2, 3, 0)),  # Intel MPI / MPICH (accelerate)
])
def test_ranks_come_from_the_launchers_environment(monkeypatch, env, want):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID",
                 "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert detect() == want and detect().main == (want.rank == 0)


def test_python_m_featcache_is_the_command_line():
    done = subprocess.run([sys.executable, "-m", "featcache", "extract", "--help"], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0 and "--dist-timeout" in done.stdout, done.stderr


def test_a_rank_outside_the_world_is_refused(monkeypatch):
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(Exception, match=r"rank 2 \(local rank .*\) of 2 processes; launch with torchrun"):
        detect()


# ------------------------------------------------------------------------------------------------ real processes

@pytest.mark.slow
@pytest.mark.parametrize("fmt, launcher", [("zarr", "torchrun"), ("wds", "accelerate")])
def test_two_processes_write_the_bytes_of_one_and_never_the_same_file(data, reference, tmp_path, fmt, launcher):
    out = tmp_path / "cache"
    rc, stdout, stderr = finish(launch(tmp_path, cli_args(data, out, fmt), launcher=launcher), tmp_path)
    assert rc == 0, stderr[-4000:]
    assert tree_bytes(out) == tree_bytes(reference(fmt))  # every file, markers and manifest included
    assert stdout.count("cache: ") == 1, "only rank 0 prints"
    ours = writes(tmp_path)
    assert not ours[0] & ours[1], f"both processes wrote {sorted(ours[0] & ours[1])}"
    marked = [{int(p[-11:-5]) for p in files if p.startswith("_featcache/units/unit-")} for files in ours]
    assert marked == [set(range(0, 12, 2)), set(range(1, 12, 2))], "units are dealt round-robin, one writer each"
    manifest = "zarr.json" if fmt == "zarr" else "manifest.json"
    assert manifest in ours[0] and manifest not in ours[1], "rank 0 creates and finalizes"
    if fmt == "zarr":  # the same command again: the cache is complete, nothing is written
        rc, stdout, stderr = finish(launch(tmp_path, cli_args(data, out, fmt), launcher=launcher), tmp_path)
        assert rc == 0, stderr[-4000:]
        assert stdout.count("is already complete; nothing to do") == 1 and writes(tmp_path) == [set(), set()]
        assert tree_bytes(out) == tree_bytes(reference(fmt))


@pytest.mark.slow
def test_hdf5_gives_each_process_its_own_part(data, reference, tmp_path):
    out = tmp_path / "cache"
    rc, _, stderr = finish(launch(tmp_path, cli_args(data, out, "hdf5")), tmp_path)
    assert rc == 0, stderr[-4000:]
    assert sorted(p.name for p in out.glob("*.h5")) == ["part-000.h5", "part-001.h5"]
    assert cache_content(out) == cache_content(reference("hdf5"))  # the same data, in two parts instead of one
    ours = writes(tmp_path)
    assert not ours[0] & ours[1], f"both processes wrote {sorted(ours[0] & ours[1])}"


@pytest.mark.slow
def test_killed_two_process_run_resumes_with_one_to_the_same_bytes(data, reference, tmp_path):
    out = tmp_path / "cache"
    job = launch(tmp_path, cli_args(data, out), fault="kill", at=3)  # rank 1, before marking its 3rd unit
    try:
        wait_until(lambda: (tmp_path / "kill_me").exists() or job.poll() is not None, what="rank 1's 3rd unit")
        assert job.poll() is None, (tmp_path / "stderr").read_text()[-3000:]
        ranks = [int((tmp_path / f"pid_{rank}").read_text()) for rank in (0, 1)]
        for pid in (job.pid, *ranks):
            os.killpg(pid, signal.SIGKILL)  # torchrun and each rank lead a session of their own
    finally:
        rc = finish(job, tmp_path)[0]
    assert rc == -signal.SIGKILL
    for pid in ranks:  # gone, with the lock rank 0 held
        wait_until(lambda: gone(pid), what=f"PID {pid} to exit")
    partial = open_reader(out, require_complete=False)
    marked = [u for u, note in enumerate(partial.unit_notes()) if note]
    assert not partial.manifest.complete and {1, 3} <= set(marked) and 5 not in marked, marked
    run_extract(ExtractConfig(data=str(data), out=str(out), **EXTRACT), progress=False)  # one process finishes
    assert tree_bytes(out) == tree_bytes(reference("zarr"))


@pytest.mark.slow
def test_an_error_on_one_rank_stops_both_with_its_message(data, tmp_path):
    start = time.monotonic()
    rc, _, stderr = finish(launch(tmp_path, cli_args(data, tmp_path / "cache"), fault="fail"), tmp_path)
    assert rc != 0
    assert "Error: injected failure" in stderr, stderr[-3000:]  # rank 1's own error
    assert "rank 0 of 2: 1 other process(es) failed while extracting (rank 1: CacheError: injected failure)" \
        in stderr
    assert time.monotonic() - start < 200


@pytest.mark.slow
def test_a_hung_rank_stops_the_others_after_the_timeout(data, tmp_path):
    start = time.monotonic()
    rc, _, stderr = finish(launch(tmp_path, cli_args(data, tmp_path / "cache", dist_timeout=5), fault="hang"),
                           tmp_path)
    assert rc != 0
    assert "rank 0 of 2: the other processes did not answer within --dist-timeout 5 s" in stderr, stderr[-3000:]
    assert time.monotonic() - start < 200, "rank 0 gave up after 5 s, and torchrun then stopped rank 1"


@pytest.mark.slow
def test_two_processes_finish_a_one_process_run_and_redo_its_damaged_unit(data, reference, tmp_path):
    out = tmp_path / "cache"
    run_extract(ExtractConfig(data=str(data), out=str(out), **EXTRACT), progress=False, max_units=5)  # units 0-4
    shard = out / "block_0" / "c" / "3" / "0" / "0"
    damaged = bytearray(shard.read_bytes())
    damaged[100] ^= 0xFF  # inside a row's chunk: unit 3 no longer reads back what its marker's CRC-32 says
    shard.write_bytes(bytes(damaged))
    rc, _, stderr = finish(launch(tmp_path, cli_args(data, out)), tmp_path)
    assert rc == 0, stderr[-4000:]
    assert "unit 3: block_0 read back other bytes than were written" in stderr  # found, un-marked, redone
    assert tree_bytes(out) == tree_bytes(reference("zarr"))
    ours = writes(tmp_path)
    marked = [{int(p[-11:-5]) for p in files if p.startswith("_featcache/units/unit-")} for files in ours]
    # rank 0 checked units 0, 2, 4 and rank 1 units 1, 3; the 8 to do (3, then 5-11) are dealt round-robin
    assert marked == [{3, 6, 8, 10}, {5, 7, 9, 11}] and not ours[0] & ours[1]
