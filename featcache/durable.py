"""Durable writes on local disk: atomic replace, fsync of files and trees, bytes on disk.

A unit is marked complete only after its data has been through :func:`fsync_path`, and every small metadata file
(manifest, unit marker, config) is replaced with :func:`write_atomic`, so a crash leaves the old or the new file,
never a torn one.
"""
from __future__ import annotations

import os
import secrets
from pathlib import Path


def sync_path(path: str | os.PathLike) -> None:
    """fsync one file or one directory (its entries: a deleted file stays deleted), not what lies below it."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_path(path: str | os.PathLike) -> None:
    """fsync a file, or a directory and every file below it, so a unit is durable before it is marked done."""
    path = Path(path)
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    for f in files:
        sync_path(f)
    for d in {f.parent for f in files} | ({path} if path.is_dir() else set()):
        sync_path(d)


def temp_token() -> str:
    """A suffix no other writer's temp file has: this process's PID and a random part (threads share the PID)."""
    return f"{os.getpid()}-{secrets.token_hex(4)}"


def write_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see either the old or the new file, never a torn one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{temp_token()}")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    sync_path(path.parent)


def disk_bytes(path: str | os.PathLike) -> int:
    """Bytes of all files under ``path`` (or of the file itself; 0 if it does not exist)."""
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else 0
