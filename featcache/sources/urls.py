"""WebDataset shards named by URL, copied once into a local staging directory and read from there.

A spec is brace-expanded (``braceexpand``, webdataset's own expansion: ``https://host/train-{000..099}.tar``) into
entries, each one of:

* ``pipe:CMD``: webdataset's convention, CMD runs in a shell and its standard output is the shard
  (``pipe:curl -sL https://host/a.tar``, ``pipe:aws s3 cp s3://b/a.tar -``, ``pipe:gzip -dc a.tar.gz``); the shard
  is named after the last word of CMD that names a tar file (a compression suffix becomes ``.tar``);
* ``http://``, ``https://``, ``s3://``, ``gs://``: read through fsspec (aiohttp, s3fs, gcsfs), named after the last
  part of the URL's path;
* a ``file://`` URL, or a local path once a spec holds any of the above, copied like the others.

Any other scheme is refused, naming it. The members of a shard are read at their byte offsets (seeded views are
replayed in any order), which a stream cannot serve, hence the local copy: each shard is written to
``<stage dir>/<name>`` through a temporary file renamed when complete (a crash leaves no torn shard), its SHA-256
computed while copying and kept in a ``.<name>.sha256`` file beside it, so a rerun skips a shard whose copy still
has that hash. The manifest's ``data.staged`` lists each shard's URL, name, size and SHA-256.

Stage 2 never runs a command or opens a URL read from a manifest (a cache file must not be able to run commands or
reach the network): it reads the staged copies, checking each one's SHA-256 first. When they are gone, the spec
typed again (``featcache train --data SPEC``) stages them anew into the recorded directory, each checked against
the recorded hash; ``--data DIR`` names a directory the copies were moved to.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
import subprocess
import tempfile
import urllib.parse
from pathlib import Path
from typing import Any, Sequence
from urllib.parse import urlparse

from tqdm import tqdm

from .. import durable
from ..errors import ConfigError, MissingFileError, SourceError
from ..manifest import safe_relpath
from .base import ImageSource
from .tars import COMPRESSED_SUFFIXES, compression_of
from .wds import expand_spec, scan_wds

#: URL schemes a shard may be fetched from -> the module fsspec needs for it.
URL_SCHEMES = {"http": "aiohttp", "https": "aiohttp", "s3": "s3fs", "gs": "gcsfs"}
SUPPORTED = "pipe:CMD, " + ", ".join(f"{s}://" for s in URL_SCHEMES) + ", file:// or a local path"
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]+)://")
_ANY_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]+:")  # s3://, memory://, pipe:... (two characters at least: "C:")
CHUNK = 1 << 20


def is_remote(entry: str) -> bool:
    """A ``pipe:`` command or a URL (``file://`` too, which the local reader does not take; unknown schemes too, to
    be refused by name)."""
    return entry.startswith("pipe:") or _SCHEME.match(entry) is not None


def is_url_spec(spec: str | os.PathLike | Sequence[str]) -> bool:
    if isinstance(spec, (str, os.PathLike)) and os.path.exists(spec):
        return False
    return any(is_remote(e) for e in expand_spec(spec))


def check_entry(entry: str) -> None:
    """Refuse an unknown scheme, a missing fsspec module, or a compressed shard fetched as it is (one line each)."""
    if entry.startswith("pipe:"):
        if not entry[5:].strip():
            raise ConfigError(f"shard {entry!r}: pipe: needs a command, e.g. pipe:curl -sL https://host/a.tar")
        return
    m = _SCHEME.match(entry)
    scheme = m.group(1).lower() if m else "file"
    if scheme != "file" and scheme not in URL_SCHEMES:
        raise ConfigError(f"shard URL {entry!r}: scheme {scheme!r} is not supported; use {SUPPORTED}")
    module = URL_SCHEMES.get(scheme)
    if module:
        import importlib.util

        if importlib.util.find_spec(module) is None:
            raise ConfigError(f"shard URL {entry!r} needs {module}, which is not installed: pip install "
                              f"'featcache[urls]' ({module})")
    if kind := compression_of(entry):
        raise SourceError(f"shard {entry} is {kind}-compressed; featcache reads members at their byte offsets, so "
                          f"shards must be uncompressed tar files: decompress it while staging with "
                          f"`pipe:{_reader_command(entry)} | {kind} -dc`, or store it uncompressed")


def _reader_command(entry: str) -> str:
    scheme = (_SCHEME.match(entry) or [None, "file"])[1].lower()
    if scheme in ("http", "https"):
        return f"curl -sfL {entry}"
    if scheme == "s3":
        return f"aws s3 cp {entry} -"
    return f"cat {entry.removeprefix('file://')}"


def staged_name(entry: str) -> str:
    """The file name of an entry's copy: the tar file a URL or pipe command names.

    Raises:
        ConfigError: when no ``.tar`` name can be found, or it is not a plain file name.
    """
    if entry.startswith("pipe:"):
        try:
            words = shlex.split(entry[5:])
        except ValueError:
            words = entry[5:].split()
        tars = [os.path.basename(w) for w in words if w.lower().endswith((".tar", *COMPRESSED_SUFFIXES))]
        if not tars:
            raise ConfigError(f"shard {entry!r}: cannot name the shard of this command; let a word of it name the "
                              "tar file, e.g. pipe:curl -sL https://host/train-000000.tar")
        name = tars[-1]
        suffix = next((s for s in COMPRESSED_SUFFIXES if name.lower().endswith(s)), None)
        name = name[:-len(suffix)] + ".tar" if suffix else name
    else:
        name = os.path.basename(urlparse(entry).path if _SCHEME.match(entry) else entry)
    if not name.lower().endswith(".tar") or "#" in name or name.startswith(".") or name != safe_relpath(name):
        raise ConfigError(f"shard {entry!r}: its name {name!r} must be a plain '<name>.tar' file name (no '#', not "
                          "hidden)")
    return name


def check_name(name: str) -> str:
    """A staged shard name read from a manifest: a plain tar file name inside the staging directory."""
    if not isinstance(name, str) or "/" in name or "\\" in name or "#" in name or name.startswith(".") or \
            not name.endswith(".tar") or name != safe_relpath(name):
        raise SourceError(f"the cache records a staged shard named {name!r}, which is not a plain '<name>.tar' file "
                          "name; the manifest is corrupt")
    return name


def plan(spec: str | os.PathLike | Sequence[str]) -> list[tuple[str, str]]:
    """``(entry, staged name)`` of every entry, checked before anything is fetched."""
    entries = expand_spec(spec)
    for entry in entries:
        check_entry(entry)
    named = [(entry, staged_name(entry)) for entry in entries]
    seen: dict[str, str] = {}
    for entry, name in named:
        if name in seen:
            raise ConfigError(f"shards {seen[name]!r} and {entry!r} would both be staged as {name}; give each shard "
                              "its own file name")
        seen[name] = entry
    return named


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _copy_stream(src, dst, h, bar) -> int:
    size = 0
    while chunk := src.read(CHUNK):
        dst.write(chunk)
        h.update(chunk)
        size += len(chunk)
        bar.update(len(chunk))
    return size


def _fetch(entry: str, dst, h, bar) -> int:
    """Copy one entry's bytes into ``dst``; a failed command or request is a SourceError naming the entry."""
    if entry.startswith("pipe:"):
        return _run_pipe(entry, dst, h, bar)
    import fsspec

    # http(s) is streamed (block_size=0): a plain server need not answer the range requests of fsspec's file.
    options = {"block_size": 0} if entry.lower().startswith(("http://", "https://")) else {}
    try:
        with fsspec.open(entry, "rb", **options) as src:
            return _copy_stream(src, dst, h, bar)
    except OSError as err:
        raise SourceError(f"cannot fetch shard {entry}: {type(err).__name__}: {err}") from None


def _run_pipe(entry: str, dst, h, bar) -> int:
    with tempfile.TemporaryFile() as err:
        # shell=True is what pipe: means (webdataset runs it the same way); the command comes from the user's own
        # --data, never from a manifest (see the module docstring).
        proc = subprocess.Popen(entry[5:], shell=True, stdout=subprocess.PIPE, stderr=err)
        size = _copy_stream(proc.stdout, dst, h, bar)
        proc.stdout.close()
        status = proc.wait()
        if status != 0:
            err.seek(0)
            tail = err.read()[-300:].decode(errors="replace").strip().replace("\n", " | ")
            raise SourceError(f"shard command {entry!r} exited with status {status}" + (f": {tail}" if tail else "")
                              + "; fix the command in --data")
    return size


def _sidecar(stage_dir: Path, name: str) -> Path:
    return stage_dir / f".{name}.sha256"


def recorded_url(entry: str) -> str:
    """``entry`` as the manifest and the sidecars record it: a URL without its user info, query and fragment, where
    presigned signatures and tokens live (the SHA-256 pins the bytes; the URL is only a note of where they came
    from). ``pipe:`` commands are kept as typed."""
    if entry.startswith("pipe:") or not _SCHEME.match(entry):
        return entry
    parts = urllib.parse.urlsplit(entry)
    return urllib.parse.urlunsplit((parts.scheme, parts.netloc.rpartition("@")[2], parts.path, "", ""))


def _noted_sha256(stage_dir: Path, name: str, entry: str) -> str | None:
    """The SHA-256 the sidecar of a copy notes, if that copy was staged from ``entry``."""
    try:
        noted = json.loads(_sidecar(stage_dir, name).read_text())
    except (OSError, ValueError):
        return None
    same = isinstance(noted, dict) and noted.get("url") == recorded_url(entry) and "sha256" in noted
    return str(noted["sha256"]) if same else None


def already_staged(stage_dir: Path, name: str, entry: str, expected: str | None) -> dict[str, Any] | None:
    """The record of a copy staged earlier that still has its hash (``expected``, else the one its sidecar notes)."""
    path = stage_dir / name
    want = (expected or _noted_sha256(stage_dir, name, entry)) if path.is_file() else None
    if not want or sha256_file(path) != want:
        return None
    return {"url": recorded_url(entry), "shard": name, "size": path.stat().st_size, "sha256": want}


def stage_one(entry: str, name: str, stage_dir: Path, bar, expected: str | None = None) -> dict[str, Any]:
    """Copy one shard into ``stage_dir`` (skipped when a copy with the right hash is there); its record."""
    if (done := already_staged(stage_dir, name, entry, expected)) is not None:
        return done
    tmp = stage_dir / f".{name}.tmp-{durable.temp_token()}"
    h = hashlib.sha256()
    try:
        with open(tmp, "wb") as dst:
            size = _fetch(entry, dst, h, bar)
            dst.flush()
            os.fsync(dst.fileno())
        if expected and h.hexdigest() != expected:
            raise SourceError(f"shard {entry} is not the one the cache was made from (sha256 {h.hexdigest()}, "
                              f"recorded {expected}); pass the --data the cache was extracted from")
        os.replace(tmp, stage_dir / name)
    finally:
        tmp.unlink(missing_ok=True)
    record = {"url": recorded_url(entry), "shard": name, "size": size, "sha256": h.hexdigest()}
    durable.write_atomic(_sidecar(stage_dir, name), json.dumps(record).encode())
    return record


def stage(spec: str | os.PathLike | Sequence[str], stage_dir: str | os.PathLike | None,
          expected: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """Stage every shard of ``spec`` into ``stage_dir``; one record per shard, in spec order.

    Args:
        expected: staged name -> SHA-256 the copy must have (stage 2 re-staging from a recorded cache).
    """
    if not stage_dir:
        raise ConfigError(f"--data {spec!r} names shards by URL, which are copied to a local directory first; "
                          "pass --data-stage-dir DIR")
    if _ANY_SCHEME.match(str(stage_dir)):
        raise ConfigError(f"--data-stage-dir {str(stage_dir)!r} is a URL; staged shards are read by random access "
                          "from a local directory: pass a local path")
    named = [(e, n) for e, n in plan(spec) if expected is None or n in expected]
    stage_dir = Path(stage_dir).absolute()
    stage_dir.mkdir(parents=True, exist_ok=True)
    with tqdm(desc=f"staging {len(named)} shards", unit="B", unit_scale=True, disable=None) as bar:
        return [stage_one(entry, name, stage_dir, bar, (expected or {}).get(name)) for entry, name in named]


def scan_staged(spec: str | os.PathLike | Sequence[str], stage_dir: str | os.PathLike | None) -> ImageSource:
    """Stage the shards of a URL spec and open the copies as a ``wds`` source that records them."""
    records = stage(spec, stage_dir)
    root = os.path.abspath(stage_dir or "")
    source = scan_wds([os.path.join(root, r["shard"]) for r in records])
    source.root = root  # the staging directory, even when a spec names a single shard
    source.recorded["staged"] = records
    return source


def check_staged(source: ImageSource, spec: str | None = None) -> None:
    """Verify the staged copies of a source read from a manifest; with ``spec`` (typed by the user), stage the
    missing or changed ones first.

    Raises:
        MissingFileError: a copy is missing (the message says to pass the spec again).
        SourceError: a copy's SHA-256 differs from the recorded one.
    """
    records = source.recorded["staged"]
    hashes = {check_name(r["shard"]): str(r["sha256"]) for r in records}
    if spec is not None:
        names = {name for _, name in plan(spec)}
        if missing := sorted(set(hashes) - names):
            raise ConfigError(f"--data {spec!r} does not name the shards {missing[:3]} the cache was made from")
        stage(spec, source.root, expected=hashes)
    for name, digest in tqdm(hashes.items(), desc="checking staged shards", unit="shard", disable=None):
        path = os.path.join(source.root, name)
        if not os.path.isfile(path):
            raise MissingFileError(f"staged shard {path} is missing; pass the shards' URL spec again with --data "
                                   "(they are staged anew and checked), or --data DIR where the staged copies are now")
        if sha256_file(path) != digest:
            raise SourceError(f"staged shard {path} changed since extraction (its SHA-256 is not the recorded "
                              f"{digest}); pass the shards' URL spec again with --data to stage them anew")
