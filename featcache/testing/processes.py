"""Real processes for the fault tests: start featcache commands, wait for what they write, kill them, see them gone."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

#: Environment of child processes: one torch thread each, idle OpenMP threads asleep (2 shared cores in CI).
CHILD_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}


def start(args: list[str], **kwargs) -> subprocess.Popen:
    """``python -m featcache.cli ARGS`` (or ``python ARGS`` when ARGS starts with ``-c``), output discarded."""
    cmd = [sys.executable, *(args if args[0] == "-c" else ["-m", "featcache.cli", *args])]
    return subprocess.Popen(cmd, env=dict(os.environ, **CHILD_ENV), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, **kwargs)


def wait_until(condition: Callable[[], bool], timeout: float = 120.0, what: str = "condition",
               proc: subprocess.Popen | None = None, interval: float = 0.02) -> None:
    """Poll ``condition`` until it holds; fail after ``timeout`` s, or as soon as ``proc`` exits."""
    deadline = time.monotonic() + timeout
    while not condition():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"process exited (rc {proc.returncode}) before {what}: {proc.stderr.read()[-2000:]}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def lock_pid(lock_file: str | Path) -> int | None:
    """The PID a lock file names (its holder, if that process is alive), or ``None``."""
    try:
        return int(json.loads(Path(lock_file).read_text())["pid"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def gone(pid: int) -> bool:
    """True once every thread of ``pid`` has exited (a zombie nobody reaped yet counts as exited; a main thread
    that is a zombie while other threads are still exiting, e.g. in an fsync, does not: they hold its files)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    try:
        zombie = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
        return zombie and os.listdir(f"/proc/{pid}/task") == [str(pid)]
    except OSError:
        return not Path(f"/proc/{pid}").exists()
