"""Where a cache lives: a local directory, or a prefix in an object store reached through fsspec.

:func:`location` is the one place a ``--out`` / ``--cache`` string becomes a location:

* a plain path (``caches/c``, ``/data/c``) and a ``file://`` URL are a local :class:`~pathlib.Path`, written as
  before (:mod:`featcache.durable`: temp file, fsync, rename);
* ``s3://``, ``gs://`` and ``memory://`` URLs are an :class:`ObjectPath`, whose files are objects of an fsspec
  filesystem (s3fs, gcsfs, fsspec's in-process memory filesystem). For reading, a local cache layer may be chained
  in front, fsspec's way: ``simplecache::s3://bucket/c`` (whole objects, kept for the process),
  ``filecache::`` (kept across runs) or ``blockcache::`` (the byte ranges read);
* anything else that starts with a scheme (``gopher://x``, ``ftp://``, ``s3:/bucket`` with one slash) is refused
  in one line, before anything is written: fsspec would otherwise treat some of them as local paths.

Object stores differ from a local disk in what "durable" means: a PUT is atomic (readers see the old object or the
new one, never a torn one) and is durable when it returns, so there is nothing to fsync or rename; the unit
protocol (data first, marker last) is unchanged. Credentials and endpoints come from the filesystem's own
configuration: the ``AWS_*`` variables (``AWS_ENDPOINT_URL`` for an S3-compatible server), fsspec's config files
and ``FSSPEC_<PROTOCOL>_<OPTION>`` variables (``FSSPEC_S3_ENDPOINT_URL``), or ``gcloud`` credentials for gcsfs.
"""
from __future__ import annotations

import fnmatch
import importlib.util
import os
import re
import shutil
from pathlib import Path
from typing import Any, Iterator

from . import durable
from .errors import ConfigError

#: Remote schemes a cache may live on -> the module that implements them (None: fsspec itself).
SCHEMES: dict[str, str | None] = {"s3": "s3fs", "gs": "gcsfs", "memory": None}
#: fsspec's local cache layers, allowed in front of a remote scheme when reading (``simplecache::s3://...``).
CACHE_LAYERS = ("simplecache", "filecache", "blockcache")
_INSTALL = {"s3fs": "pip install 'featcache[s3]' (s3fs)", "gcsfs": "pip install gcsfs"}
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]+):")  # two characters at least: "C:" is a Windows drive


def location(spec: str | os.PathLike, what: str = "--out") -> "Path | ObjectPath":
    """The local path or object-store prefix ``spec`` names.

    Raises:
        ConfigError: for a scheme featcache cannot write a cache to (one line naming it and the choices), or a
            remote scheme whose fsspec implementation is not installed.
    """
    if isinstance(spec, (Path, ObjectPath)):
        return spec
    text = os.fspath(spec)
    layers = text.split("::")
    m = _SCHEME.match(layers[-1])
    if m is None:
        if len(layers) > 1:
            raise ConfigError(f"{what} {text!r}: a cache layer ({'::'.join(layers[:-1])}::) needs a remote URL after "
                              "it, e.g. simplecache::s3://bucket/cache")
        return Path(text)
    scheme, rest = m.group(1).lower(), layers[-1][m.end():]
    _check_scheme(text, what, scheme, rest, layers[:-1])
    if scheme == "file":
        return Path(rest[2:])
    return ObjectPath(text)


def _check_scheme(text: str, what: str, scheme: str, rest: str, layers: list[str]) -> None:
    known = ", ".join(f"{s}://" for s in [*SCHEMES, "file"])
    if scheme not in SCHEMES and scheme != "file":
        raise ConfigError(f"{what} {text!r}: scheme {scheme!r} is not supported for caches; use a local path or "
                          f"one of {known}")
    if not rest.startswith("//") or not rest[2:].strip("/"):
        raise ConfigError(f"{what} {text!r} is not a {scheme} URL; write {scheme}://BUCKET/PREFIX (two slashes), or "
                          "./PATH for a local path")
    bad = [layer for layer in layers if layer not in CACHE_LAYERS]
    if bad or (layers and scheme == "file"):
        raise ConfigError(f"{what} {text!r}: only {', '.join(CACHE_LAYERS)} may be chained in front of a remote URL "
                          f"(got {'::'.join(layers)})")
    module = SCHEMES.get(scheme)
    if module and importlib.util.find_spec(module) is None:
        raise ConfigError(f"{what} {text!r} needs {module}, which is not installed: {_INSTALL[module]}")


def is_local(path: "Path | ObjectPath") -> bool:
    return not isinstance(path, ObjectPath)


def require_local(path: "Path | ObjectPath", what: str) -> Path:
    """``path`` as a local path.

    Raises:
        ConfigError: naming ``what`` must be local and the backends that are not bound to one.
    """
    if isinstance(path, ObjectPath):
        raise ConfigError(f"{what} must be a local path, not {str(path)!r}; caches on object storage use "
                          "--format zarr or --format wds")
    return path


def ensure_writable(path: "Path | ObjectPath") -> None:
    """Refuse to write through a read cache layer (``simplecache::``): writes go to the store itself."""
    if isinstance(path, ObjectPath) and path.chained:
        raise ConfigError(f"{str(path)!r}: a cache layer ({path.url.split('::')[0]}::) is for reading; write to "
                          f"{path.target_url()!r} itself")


def same_location(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """True when ``a`` and ``b`` name the same cache (local paths resolved; URLs without their cache layers)."""
    la, lb = location(a), location(b)
    if isinstance(la, ObjectPath) or isinstance(lb, ObjectPath):
        return la == lb
    return la.resolve() == lb.resolve()


def lock_path(out: str | os.PathLike) -> Path:
    """Where the extraction lock of ``out`` lives: beside a local ``out`` (``--overwrite`` deletes and recreates
    the directory); for an object store, in the local temp directory, so it guards the writers on this machine only
    (object stores have no locks; writers on several machines must take disjoint units)."""
    where = location(out)
    if isinstance(where, ObjectPath):
        import hashlib
        import tempfile

        digest = hashlib.sha256(where.target_url().encode()).hexdigest()[:16]
        return Path(tempfile.gettempdir()) / f".featcache-{digest}.lock"
    where = where.absolute()
    return where.parent / f".{where.name}.lock"


class ObjectPath:
    """A file or prefix in an fsspec filesystem, with the part of :class:`pathlib.Path` the stores use.

    Picklable (a URL and parts); the filesystem is made lazily in each process, since fsspec's async filesystems
    must not cross a fork. There is deliberately no ``__fspath__``: code that would hand it to ``os.open`` fails
    instead of writing a local file.
    """

    def __init__(self, url: str, parts: tuple[str, ...] = ()) -> None:
        self.url = url.rstrip("/")
        self.parts = tuple(p for p in parts if p)
        self._fs: Any = None
        self._pid = -1

    def __getstate__(self) -> dict[str, Any]:
        return {"url": self.url, "parts": self.parts}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["url"], state["parts"])

    def __truediv__(self, other: str | os.PathLike) -> "ObjectPath":
        return ObjectPath(self.url, self.parts + tuple(os.fspath(other).split("/")))

    def __str__(self) -> str:
        return "/".join([self.url, *self.parts])

    def __repr__(self) -> str:
        return f"ObjectPath({str(self)!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ObjectPath) and str(self.target()) == str(other.target())

    def __hash__(self) -> int:
        return hash(str(self.target()))

    @property
    def chained(self) -> bool:
        return "::" in self.url

    def target_url(self) -> str:
        """The URL without its cache layers (what writes and zarr-python go to)."""
        return "/".join([self.url.split("::")[-1], *self.parts])

    def target(self) -> "ObjectPath":
        return ObjectPath(self.target_url())

    @property
    def name(self) -> str:
        return self.parts[-1] if self.parts else self.url.rsplit("/", 1)[-1]

    @property
    def suffix(self) -> str:
        name = self.name
        return name[name.rfind("."):] if "." in name.lstrip(".") else ""

    @property
    def parent(self) -> "ObjectPath":
        return ObjectPath(self.url, self.parts[:-1]) if self.parts else ObjectPath(self.url.rsplit("/", 1)[0])

    @property
    def fs(self) -> Any:
        """This process's fsspec filesystem for the URL (and its cache layers)."""
        if self._fs is None or self._pid != os.getpid():
            import fsspec

            self._fs, self._root = fsspec.core.url_to_fs(self.url)
            self._pid = os.getpid()
        return self._fs

    @property
    def path(self) -> str:
        """The path the filesystem knows this object by (no scheme)."""
        fs = self.fs
        return "/".join([self._root.rstrip("/"), *self.parts]) if self.parts else self._root or fs.root_marker

    # ------------------------------------------------------------------------------------ queries

    def exists(self) -> bool:
        return bool(self.fs.exists(self.path))

    def is_file(self) -> bool:
        return bool(self.fs.isfile(self.path))

    def is_dir(self) -> bool:
        return bool(self.fs.isdir(self.path))

    def iterdir(self) -> Iterator["ObjectPath"]:
        if not self.is_dir():
            return iter(())
        return iter([self / p.rstrip("/").rsplit("/", 1)[-1] for p in self.fs.ls(self.path, detail=False)])

    def glob(self, pattern: str) -> Iterator["ObjectPath"]:
        """Direct children whose name matches ``pattern`` (no ``**``)."""
        return (p for p in self.iterdir() if fnmatch.fnmatchcase(p.name, pattern))

    def files(self) -> Iterator["ObjectPath"]:
        """Every object below this prefix."""
        root = self.path.rstrip("/") + "/"
        for p in self.fs.find(self.path):
            if p.startswith(root):
                yield self / p[len(root):]

    def size(self) -> int:
        return int(self.fs.size(self.path))

    # ------------------------------------------------------------------------------------ reads and writes

    def read_bytes(self) -> bytes:
        return bytes(self.fs.cat_file(self.path))

    def read_text(self) -> str:
        return self.read_bytes().decode("utf-8")

    def read_range(self, start: int, end: int) -> bytes:
        """Bytes ``[start, end)``: one ranged GET."""
        return bytes(self.fs.cat_file(self.path, start=start, end=end))

    def open(self, mode: str = "rb", **kwargs: Any) -> Any:
        return self.fs.open(self.path, mode, **kwargs)

    def write_bytes(self, data: bytes) -> None:
        """One PUT: atomic, durable when it returns."""
        ensure_writable(self)
        self.fs.pipe_file(self.path, data)

    def upload(self, local: str | os.PathLike) -> None:
        """PUT a local file here (a multipart upload is atomic too: the object appears when it completes)."""
        ensure_writable(self)
        self.fs.put_file(os.fspath(local), self.path)

    def unlink(self, missing_ok: bool = False) -> None:
        try:
            self.fs.rm_file(self.path)
        except FileNotFoundError:
            if not missing_ok:
                raise

    def mkdir(self, parents: bool = False, exist_ok: bool = False) -> None:
        """Object stores have no directories: an empty ``.keep`` object makes the prefix exist (a cache's
        ``_featcache/`` is what marks its prefix as a featcache cache)."""
        (self / KEEP).write_bytes(b"")

    def rmtree(self) -> None:
        if self.exists():
            self.fs.rm(self.path, recursive=True)


KEEP = ".keep"


# ---------------------------------------------------------------------------------------- local or remote

def write_atomic(path: "Path | ObjectPath", data: bytes) -> None:
    """Readers see the old file or the new one: temp + fsync + rename locally, one PUT for an object."""
    if isinstance(path, ObjectPath):
        path.write_bytes(data)
    else:
        durable.write_atomic(path, data)


def fsync_path(path: "Path | ObjectPath") -> None:
    """Make what was written durable: fsync locally; nothing to do for objects (a PUT is durable on return)."""
    if not isinstance(path, ObjectPath):
        durable.fsync_path(path)


def sync_path(path: "Path | ObjectPath") -> None:
    if not isinstance(path, ObjectPath):
        durable.sync_path(path)


def rmtree(path: "Path | ObjectPath") -> None:
    if isinstance(path, ObjectPath):
        path.rmtree()
    else:
        shutil.rmtree(path)


def disk_bytes(path: "Path | ObjectPath") -> int:
    """Bytes of every file (object) below ``path``."""
    if isinstance(path, ObjectPath):
        return int(path.fs.du(path.path)) if path.exists() else 0
    return durable.disk_bytes(path)


def read_many(paths: list["Path | ObjectPath"]) -> list[bytes | None]:
    """The bytes of each file, None where there is none; objects are fetched concurrently (one request each)."""
    remote = [p for p in paths if isinstance(p, ObjectPath)]
    if not remote:
        return [p.read_bytes() if p.is_file() else None for p in paths]
    got = remote[0].fs.cat([p.path for p in remote], on_error="return")
    return [v if isinstance(v := got.get(p.path), bytes) else None for p in remote]


def missing_files(paths: list["Path | ObjectPath"], under: "Path | ObjectPath") -> list["Path | ObjectPath"]:
    """The ``paths`` (all below ``under``) that are not files: one ``is_file`` each locally, one listing of
    ``under`` for objects (a HEAD per shard would cost a round trip each when a large cache is opened)."""
    if not isinstance(under, ObjectPath):
        return [p for p in paths if not p.is_file()]
    present = {str(p) for p in under.files()} if under.exists() else set()
    return [p for p in paths if str(p) not in present]


class RangeFile:
    """Byte ranges of one file: ``os.pread`` on a local descriptor, a ranged GET (``cat_file(start, end)``) on an
    object. The training read path reads a row as one range (a shard index entry, a tar member)."""

    def __init__(self, path: "Path | ObjectPath") -> None:
        """Raises FileNotFoundError when there is no such file."""
        self.path = path
        if isinstance(path, ObjectPath):
            self.fd, self.size = -1, path.size()
        else:
            self.fd = os.open(path, os.O_RDONLY)
            self.size = os.fstat(self.fd).st_size

    def read(self, nbytes: int, offset: int) -> bytes:
        """``nbytes`` bytes from ``offset`` (fewer at the end of the file), like ``os.pread``."""
        if self.fd >= 0:
            return os.pread(self.fd, nbytes, offset)
        return self.path.read_range(offset, min(offset + nbytes, self.size))

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
