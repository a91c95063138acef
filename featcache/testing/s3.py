"""A real S3 API on 127.0.0.1 for the object-storage tests and benchmarks: moto's server, with s3fs pointed at it.

:func:`local_s3` starts ``moto.server.ThreadedMotoServer`` on a free port of 127.0.0.1, points every S3 client of
this process and of its children at it through the environment (``AWS_ENDPOINT_URL``, which botocore, hence s3fs,
reads; dummy credentials; no profile or config file), creates a bucket, and restores the environment afterwards.
Nothing can fall through to AWS: an unset endpoint would mean a request to amazonaws.com, so the endpoint is set
before the first client is made, and s3fs's cached instances (made against an earlier endpoint) are dropped.
"""
from __future__ import annotations

import logging
import os
import signal
from contextlib import contextmanager
from typing import Any, Callable, Iterator

#: What every S3 client made inside :func:`local_s3` sees (plus ``AWS_ENDPOINT_URL``).
ENV = {"AWS_ACCESS_KEY_ID": "featcache-test", "AWS_SECRET_ACCESS_KEY": "featcache-test",
       "AWS_DEFAULT_REGION": "us-east-1", "AWS_CONFIG_FILE": os.devnull, "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
       "AWS_EC2_METADATA_DISABLED": "true"}
UNSET = ("AWS_PROFILE", "AWS_SESSION_TOKEN", "FSSPEC_S3")


@contextmanager
def local_s3(bucket: str = "featcache") -> Iterator[str]:
    """Run an S3 server on 127.0.0.1 for the block; yields its endpoint URL, with ``bucket`` created."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one access-log line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    assert host == "127.0.0.1", host
    saved = {k: os.environ.get(k) for k in [*ENV, *UNSET, "AWS_ENDPOINT_URL"]}
    os.environ.update(ENV, AWS_ENDPOINT_URL=endpoint)
    for key in UNSET:
        os.environ.pop(key, None)
    try:
        fs = fresh_s3fs()
        fs.mkdir(bucket)
        yield endpoint
    finally:
        fresh_s3fs()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        server.stop()


def fresh_s3fs():
    """An s3fs filesystem made now (from the current environment), its earlier cached instances dropped."""
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    return s3fs.S3FileSystem()


def object_bytes(url: str) -> dict[str, bytes]:
    """``{relative key: bytes}`` of every object below ``url`` (``s3://bucket/prefix``), ``.keep`` objects left
    out: they stand for the directories a local cache has."""
    from featcache.storage import KEEP, location

    root = location(url)
    return {"/".join(p.parts[len(root.parts):]): p.read_bytes() for p in root.files() if p.name != KEEP}


#: The s3fs calls that write an object: zarr's FsspecStore and ObjectPath.write_bytes put bytes, uploads put files.
_PUTS = ("_pipe_file", "_put_file")


def _wrap_puts(before: Callable[[], None]) -> Callable[[], None]:
    """Make every object write of s3fs call ``before`` first; returns what undoes it."""
    import s3fs

    saved = {name: getattr(s3fs.S3FileSystem, name) for name in _PUTS}

    def wrapped(real):
        async def put(self, *args, **kwargs):
            before()
            return await real(self, *args, **kwargs)
        return put

    for name, real in saved.items():
        setattr(s3fs.S3FileSystem, name, wrapped(real))
    s3fs.S3FileSystem.clear_instance_cache()  # an instance binds its sync methods (put_file) when it is made

    def undo() -> None:
        for name, real in saved.items():
            setattr(s3fs.S3FileSystem, name, real)
        s3fs.S3FileSystem.clear_instance_cache()
    return undo


def count_puts(run: Callable[[], Any]) -> int:
    """How many objects ``run`` writes to S3 (the kill points :func:`kill_at_put` can choose)."""
    calls = [0]
    undo = _wrap_puts(lambda: calls.__setitem__(0, calls[0] + 1))
    try:
        run()
    finally:
        undo()
    return calls[0]


def kill_at_put(k: int) -> Callable[[], None]:
    """An ``arm`` for :func:`featcache.testing.faults.killed_extraction`: SIGKILL the process just before its
    ``k``-th object write (the object is then never written: PUTs are atomic, there is no torn object to leave)."""
    def arm() -> None:
        calls = [0]

        def before() -> None:
            calls[0] += 1
            if calls[0] == k:
                os.kill(os.getpid(), signal.SIGKILL)

        _wrap_puts(before)
    return arm
