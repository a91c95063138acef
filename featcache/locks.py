"""Advisory locks on what one process writes: an extraction's ``--out``, a training's ``--out``, a sweep's runs.

A lock is ``fcntl.flock`` on a small lock file. The kernel drops it when the holder's last descriptor closes, so it
is released on any exit, SIGKILL included, and never goes stale: there is nothing to delete after a crash. The
holder writes its PID into the file, so a second writer is refused with a message naming it.

Two details keep the lock with exactly one process. A process may take a lock it already holds (a sweep job holds
its run directory and the engine it calls takes it again): the lock is counted, not taken twice. A forked child
(a DataLoader worker) closes its copy of the descriptor at once (``os.register_at_fork``), so a child that outlives
a killed holder does not keep the lock; spawned and exec'd children never inherit it (``O_CLOEXEC``).
"""
from __future__ import annotations

import fcntl
import json
import os
import socket
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from .errors import LockedError

_held: dict[str, list[int]] = {}  # lock file (real path) -> [descriptor, times taken]
_guard = threading.Lock()


@contextmanager
def hold(path: str | os.PathLike, target: str | os.PathLike, what: str) -> Iterator[None]:
    """Hold the lock file ``path`` (created if missing) for the block.

    Args:
        path: the lock file.
        target: what the lock protects, as the refusal names it (the ``--out`` directory).
        what: what this process is, for the message another writer gets (``"featcache train"``).

    Raises:
        LockedError: another process holds the lock; the message names its PID.
    """
    key = acquire(path, target, what)
    try:
        yield
    finally:
        release(key)


def acquire(path: str | os.PathLike, target: str | os.PathLike, what: str) -> str:
    """Take the lock (see :func:`hold`); returns the key :func:`release` takes."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    key = os.path.realpath(path)
    with _guard:
        if key in _held:
            _held[key][1] += 1
            return key
        fd = os.open(key, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise LockedError(refusal(target, holder(key))) from None
        _write_holder(fd, what)
        _held[key] = [fd, 1]
    return key


def release(key: str) -> None:
    """Give back one :func:`acquire`; the lock goes when the last one is given back."""
    with _guard:
        entry = _held[key]
        entry[1] -= 1
        if entry[1] == 0:
            del _held[key]
            os.close(entry[0])  # closing the only descriptor releases the flock


def _write_holder(fd: int, what: str) -> None:
    note = {"pid": os.getpid(), "host": socket.gethostname(), "what": what,
            "since": time.strftime("%Y-%m-%d %H:%M:%S")}
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(note) + "\n").encode(), 0)


def holder(path: str | os.PathLike, tries: int = 20) -> dict[str, Any]:
    """What the lock file says about its holder (``{}`` if it says nothing readable).

    A holder writes its note right after it takes the lock, so an empty note or the PID of a process that has exited
    (the previous holder's) is read again for a moment.
    """
    note: dict[str, Any] = {}
    for _ in range(tries):
        note = _read_note(Path(path))
        if note.get("pid") and _alive(int(note["pid"])):
            break
        time.sleep(0.025)
    return note


def _read_note(path: Path) -> dict[str, Any]:
    try:
        note = json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        return {}
    return note if isinstance(note, dict) else {}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def refusal(target: str | os.PathLike, note: dict[str, Any]) -> str:
    """The one-line message a refused writer gets, naming the holder's PID."""
    who = (f"PID {note['pid']} ({note.get('what', 'featcache')} on {note.get('host', '?')}, since "
           f"{note.get('since', '?')})") if note.get("pid") else "another process (PID not recorded yet)"
    return (f"{str(target)!r} is being written by {who}; wait for it to finish or stop it, then re-run (the lock goes "
            "with that process, even if it is killed), or choose another --out")


def _forget_in_child() -> None:
    """A forked child closes its copies: the lock stays with the parent alone and dies with it."""
    global _guard
    for fd, _ in _held.values():
        try:
            os.close(fd)  # not LOCK_UN: that would release the parent's lock too
        except OSError:
            pass
    _held.clear()
    _guard = threading.Lock()  # the parent's may have been held by another thread at fork time


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_in_child)

__all__ = ["acquire", "hold", "holder", "refusal", "release"]
