"""Fault injection for the store tests: kill an extraction at a chosen point, fill a disk, compare caches.

* :func:`killed_extraction` forks a child that runs ``run_extract`` and SIGKILLs it after a delay, or just before
  its k-th ``os.fsync`` (every durable write goes through one, so k walks through the writes of every unit).
* :func:`tmpfs_command` wraps a shell command in a private mount namespace holding small tmpfs mounts, where the
  machine allows them (``unshare -m``); :func:`can_mount_tmpfs` says whether it does.
* :func:`cache_content` is a cache as its reader sees it, for backends whose files legitimately differ between runs
  (HDF5 parts are named per writer process); :func:`tree_bytes` is every file's bytes, for the others.
"""
from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable


def tree_bytes(root: str | Path) -> dict[str, bytes]:
    """Relative path -> bytes of every file under ``root``."""
    root = Path(root)
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def cache_content(path: str | Path) -> dict[str, Any]:
    """What a cache holds, as its reader reads it: manifest, unit notes (without the file that holds each unit),
    every stored array and record of every row (as bytes), and the names of the files outside its data parts."""
    from featcache.stores import open_reader

    reader = open_reader(path, require_complete=False)
    rows = {row: {k: v.tobytes() for k, v in stored.items()} for u in range(reader.manifest.num_units)
            for row, stored in reader.iter_stored_unit(u)} if reader.manifest.complete else {}
    records = {k: v.tobytes() for k, v in reader.records().items()} if reader.manifest.complete else {}
    notes = [{k: v for k, v in note.items() if k != "file"} for note in reader.unit_notes()]
    others = sorted(p for p in tree_bytes(path) if not p.endswith(".h5") and not p.startswith("_featcache/units"))
    reader.close()
    return {"manifest": dict(reader.manifest), "notes": notes, "rows": rows, "records": records, "files": others}


def _child(run: Callable[[], Any], kill_at_fsync: int | None, arm: Callable[[], Any] | None = None) -> None:
    """The forked extraction: SIGKILL itself just before its ``kill_at_fsync``-th fsync, if given; ``arm`` sets up
    another kill point (:func:`featcache.testing.s3.kill_at_put`)."""
    if arm is not None:
        arm()
    if kill_at_fsync is not None:
        real, calls = os.fsync, [0]

        def fsync(fd: int) -> None:
            calls[0] += 1
            if calls[0] == kill_at_fsync:
                os.kill(os.getpid(), signal.SIGKILL)
            real(fd)

        os.fsync = fsync
    try:
        run()
    except BaseException:  # a bug in the child must fail the test, not look like a finished run
        traceback.print_exc()
        os._exit(1)
    os._exit(0)


def killed_extraction(run: Callable[[], Any], delay: float | None = None, kill_at_fsync: int | None = None,
                      arm: Callable[[], Any] | None = None) -> bool:
    """Run ``run`` in a forked child and kill it with SIGKILL after ``delay`` seconds, or just before its
    ``kill_at_fsync``-th ``os.fsync``, or where ``arm`` (run first in the child) makes it kill itself. Returns True
    when the child was killed, False when it finished first.

    Raises:
        AssertionError: when the child failed (its traceback is on stderr).
    """
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        _child(run, kill_at_fsync, arm)
    status = None
    if delay is not None:
        deadline = time.monotonic() + delay
        while time.monotonic() < deadline:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            status = None
            time.sleep(0.002)
        else:
            os.kill(pid, signal.SIGKILL)
    if status is None:
        _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL:
        return True
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, f"the extraction failed (status {status})"
    return False


def count_fsyncs(run: Callable[[], Any]) -> int:
    """How many times ``run`` calls ``os.fsync`` (the kill points :func:`killed_extraction` can choose)."""
    real, calls = os.fsync, [0]

    def fsync(fd: int) -> None:
        calls[0] += 1
        real(fd)

    os.fsync = fsync
    try:
        run()
    finally:
        os.fsync = real
    return calls[0]


def can_mount_tmpfs(where: str | Path) -> bool:
    """Whether this machine lets a test mount a tmpfs in a private mount namespace (``unshare -m``, as root)."""
    probe = tmpfs_command([(where, 64 * 1024)], "true")
    try:
        return subprocess.run(probe, shell=True, capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def tmpfs_command(mounts: list[tuple[str | Path, int]], command: str) -> str:
    """A shell line running ``command`` with a tmpfs of ``size`` bytes at each ``(where, size)``, seen by it alone
    (a private mount namespace: nothing is mounted for anyone else, and everything goes when it exits)."""
    mount = " && ".join(f"mount -t tmpfs -o size={max(size // 1024, 64)}k tmpfs {shlex.quote(str(where))}"
                        for where, size in mounts)
    return f"unshare -m sh -c {shlex.quote(f'{mount} && {command}')}"
