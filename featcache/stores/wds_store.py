"""WebDataset backend: one tar shard per unit, one tar sample per view, readable with tar + numpy.

Layout::

    PATH/manifest.json                       the manifest (JSON)
    PATH/shard-{unit:06d}.tar                rows of one unit, written with webdataset's ShardWriter
    PATH/_featcache/units/unit-{u:06d}.json  completion markers
    member  s{sample:09d}_v{view:04d}.<array>.npy[.zst|.blosc]   one stored array of one view
    member  s{sample:09d}_v{view:04d}.records.json               the view's records

Members hold ``.npy`` bytes; with a lossless compressor the ``.npy`` bytes are compressed whole by numcodecs
(``.zst`` is a standard Zstandard frame; ``.blosc`` a Blosc frame). Reading uses :data:`DECODERS` only: any
other extension, an unknown array, a bad key or a name escaping the shard raises :class:`CacheError`.
webdataset's default decoders are never used because they unpickle ``.pyd``/``.pickle`` members.
"""
from __future__ import annotations

import io
import json
import os
import random
import re
import tarfile
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterator, Mapping

import numpy as np

from . import _dirstore as ds
from .base import READERS, WRITERS
from ..errors import CacheError
from ..manifest import Manifest, safe_relpath
from ..durable import fsync_path
from .codecs import decode_targets, numcodecs_compressor, stored_names

KEY_RE = re.compile(r"^s(\d{9})_v(\d{4})$")
SHARD_RE = re.compile(r"^shard-(\d{6})\.tar$")
COMPRESSED_SUFFIX = {"none": "", "zstd": ".zst", "blosc": ".blosc"}


def _load_npy(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


def _unblosc(data: bytes) -> bytes:
    import numcodecs

    return bytes(numcodecs.Blosc().decode(data))


def _unzstd(data: bytes) -> bytes:
    import numcodecs

    return bytes(numcodecs.Zstd().decode(data))


DECODERS: dict[str, Callable[[bytes], Any]] = {
    "npy": _load_npy,
    "npy.zst": lambda b: _load_npy(_unzstd(b)),
    "npy.blosc": lambda b: _load_npy(_unblosc(b)),
    "json": lambda b: json.loads(b.decode("utf-8")),
}


def row_key(manifest: Manifest, row: int) -> str:
    """Sample key of a row: ``s{sample position:09d}_v{view:04d}``."""
    k = manifest.views_per_sample
    return f"s{row // k:09d}_v{row % k:04d}"


def parse_member(name: str, manifest: Manifest) -> tuple[int, str, str]:
    """Validate a tar member name; return ``(row, array, extension)``.

    Raises:
        CacheError: for unsafe paths, keys not of the form ``s#########_v####``, unknown arrays or any
            extension outside :data:`DECODERS` (e.g. ``.pyd``, ``.pickle``, ``.pth``).
    """
    safe_relpath(name)
    key, _, rest = name.partition(".")
    array, _, ext = rest.partition(".")
    m = KEY_RE.match(key)
    if m is None or "/" in name:
        raise CacheError(f"tar member {name!r}: expected <key>.<array>.<ext> with key s#########_v####")
    if ext not in DECODERS:
        raise CacheError(f"tar member {name!r}: extension {ext!r} is not allowed (allowed: {sorted(DECODERS)}); "
                         "featcache never unpickles, so .pyd/.pickle/.pth members are refused")
    if array != "records" and array not in manifest["arrays"]:
        raise CacheError(f"tar member {name!r}: array {array!r} is not in the manifest ({sorted(manifest['arrays'])})")
    return int(m.group(1)) * manifest.views_per_sample + int(m.group(2)), array, ext


def _npy_bytes(value: np.ndarray, compressor) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(value), allow_pickle=False)
    data = buf.getvalue()
    return bytes(compressor.encode(data)) if compressor is not None else data


def _record_json(records: Mapping[str, np.ndarray], i: int) -> bytes:
    rec = {k: v[i].tolist() for k, v in records.items()}
    return json.dumps(rec, sort_keys=True).encode()


@WRITERS.register("wds")
class WdsWriter:
    """Writes tar shards with ``webdataset.ShardWriter``: a temp name first, renamed once complete and fsynced,
    so a killed extraction never leaves a half tar under a final name."""

    def __init__(self, path: str, manifest: Manifest, overwrite: bool = False):
        self.root = Path(path)
        self.manifest = ds.open_dir(self.root, Manifest(manifest), "wds", overwrite)

    def completed_units(self) -> set[int]:
        return set(ds.completed_units(self.root))

    def write_unit(self, unit: int, targets: Mapping[str, np.ndarray], records: Mapping[str, np.ndarray],
                   skipped: list[str] | None = None) -> None:
        import webdataset as wds

        n = ds.check_unit(self.manifest, unit, targets, records)
        records = ds.record_arrays(records)
        rows = self.manifest.unit_rows(unit)
        members = self._member_names()
        pattern = str(self.root / ".shard-%06d.tar.tmp")
        # One tar per unit (maxcount > rows); mtime 0 makes shard bytes reproducible; post renames when complete.
        with wds.ShardWriter(pattern, maxcount=n + 1, maxsize=float("inf"), start_shard=unit, verbose=0,
                             encoder=False, mtime=0.0, post=self._publish) as sink:
            for i, row in enumerate(rows):
                sample = {"__key__": row_key(self.manifest, row), "records.json": _record_json(records, i)}
                for name, (ext, codec) in members.items():
                    sample[f"{name}.{ext}"] = _npy_bytes(targets[name][i], codec)
                sink.write(sample)
        ds.mark_unit(self.root, self.manifest, unit, skipped, file=f"shard-{unit:06d}.tar")

    def _member_names(self) -> dict[str, tuple[str, Any]]:
        out = {}
        for name, spec in self.manifest["arrays"].items():
            comp = dict(spec.get("compressor") or {"name": "none"})
            itemsize = np.dtype(spec["dtype"]).itemsize
            out[name] = ("npy" + COMPRESSED_SUFFIX[comp["name"]], numcodecs_compressor(comp, itemsize))
        return out

    def _publish(self, tmp_name: str) -> None:
        tmp = Path(tmp_name)
        fsync_path(tmp)
        os.replace(tmp, tmp.with_name(tmp.name[1:-len(".tmp")]))
        fd = os.open(self.root, os.O_RDONLY)  # make the rename itself durable
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def finalize(self) -> Manifest:
        self.manifest = ds.finalize_dir(self.root, self.manifest)
        return self.manifest


@READERS.register("wds")
class WdsReader:
    """Random access through a lazily built per-shard member index (tar headers -> offsets, then ``pread``);
    streaming through :meth:`iter_rows` / :meth:`iterable_dataset`. Picklable: no open file survives pickling."""

    random_access: ClassVar[bool] = True
    streaming: ClassVar[bool] = True  # iterable_dataset(): whole shards, split over nodes x workers

    def __init__(self, path: str):
        self.root = Path(path)
        self.manifest = ds.read_manifest(self.root)
        self._reset()

    def _reset(self) -> None:
        self._pid = os.getpid()
        self._fds: dict[int, int] = {}
        self._index: dict[int, dict[tuple[int, str], tuple[int, int, str]]] = {}
        self._records: dict[str, np.ndarray] | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {"root": self.root, "manifest": self.manifest}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._reset()

    def __len__(self) -> int:
        return self.manifest.num_rows

    def shard_path(self, unit: int) -> Path:
        return self.root / f"shard-{unit:06d}.tar"

    def _fd(self, unit: int) -> int:
        if self._pid != os.getpid():  # forked after use: never share file offsets or handles across processes
            self._reset()
        if unit not in self._fds:
            path = self.shard_path(unit)
            if not path.is_file():
                raise CacheError(f"shard {str(path)!r} is missing; re-run `featcache extract` to write it")
            self._fds[unit] = os.open(path, os.O_RDONLY)
        return self._fds[unit]

    def _unit_index(self, unit: int) -> dict[tuple[int, str], tuple[int, int, str]]:
        self._fd(unit)
        if unit not in self._index:
            index = {}
            with tarfile.open(self.shard_path(unit), "r:") as tar:
                for info in tar:
                    row, array, ext = self._check(info)
                    index[(row, array)] = (info.offset_data, info.size, ext)
            self._index[unit] = index
        return self._index[unit]

    def _check(self, info: tarfile.TarInfo) -> tuple[int, str, str]:
        row, array, ext = parse_member(info.name, self.manifest)
        if not info.isfile():
            raise CacheError(f"tar member {info.name!r} is not a regular file (links and devices are refused)")
        return row, array, ext

    def _member(self, row: int, array: str) -> Any:
        unit = ds.unit_of(self.manifest, row)
        try:
            offset, size, ext = self._unit_index(unit)[(row, array)]
        except KeyError:
            raise CacheError(f"{self.shard_path(unit)} has no member for row {row} array {array!r}") from None
        return DECODERS[ext](os.pread(self._fd(unit), size, offset))

    def read_stored_row(self, row: int, names: list[str] | None = None) -> dict[str, np.ndarray]:
        """Stored (undecoded) arrays of one row."""
        return {n: self._member(row, n) for n in names or list(self.manifest["arrays"])}

    def read_row(self, row: int, names: list[str] | None = None) -> dict[str, np.ndarray]:
        return decode_targets(self.read_stored_row(row, stored_names(self.manifest, names)), self.manifest, names)

    def records(self) -> dict[str, np.ndarray]:
        if self._records is None:
            recs = [self._member(row, "records") for row in range(len(self))]
            self._records = ds.record_arrays({k: np.asarray([r[k] for r in recs]) for k in recs[0]})
        return dict(self._records)

    def iter_rows(self, rows: list[int] | None = None, names: list[str] | None = None
                  ) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
        if rows is not None:
            for row in rows:
                yield row, self.read_row(row, names)
            return
        for unit in range(self.manifest.num_units):
            yield from self.stream_unit(unit, names)

    def stream_unit(self, unit: int, names: list[str] | None = None) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
        """Decode one shard front to back (sequential reads, no index), validating every member."""
        wanted = set(stored_names(self.manifest, names))
        current, stored = None, {}
        with tarfile.open(self.shard_path(unit), "r|") as tar:
            for info in tar:
                row, array, ext = self._check(info)
                if current is not None and row != current:
                    yield current, decode_targets(stored, self.manifest, names)
                    stored = {}
                current = row
                if array in wanted:
                    stored[array] = DECODERS[ext](tar.extractfile(info).read())
        if current is not None:
            yield current, decode_targets(stored, self.manifest, names)

    def unit_notes(self) -> list[dict[str, Any]]:
        return ds.unit_notes(self.root, self.manifest)

    def array_nbytes(self) -> dict[str, int]:
        """Bytes each stored array takes in the shards (member payloads; tar headers excluded)."""
        out = dict.fromkeys(self.manifest["arrays"], 0)
        for unit, note in enumerate(self.unit_notes()):
            if note:
                for (_, array), (_, size, _) in self._unit_index(unit).items():
                    if array in out:
                        out[array] += size
        return out

    def iterable_dataset(self, names: list[str] | None = None, rank: int = 0, world_size: int = 1,
                         shuffle_shards: bool = False, seed: int = 0) -> "WdsStream":
        """A torch IterableDataset over ``(row, targets)``, shards split across nodes x DataLoader workers."""
        return WdsStream(self, names, rank, world_size, shuffle_shards, seed)

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __del__(self) -> None:
        try:
            if self._pid == os.getpid():
                self.close()
        except Exception:  # interpreter shutdown: nothing left to close reliably
            pass


def split_shards(shards: list[int], rank: int, world_size: int, worker: int, num_workers: int) -> list[int]:
    """Shards of one consumer (node ``rank`` x DataLoader ``worker``): every consumer gets a disjoint share.

    Raises:
        CacheError: when there are fewer shards than consumers (some would get nothing and training would
            silently see a different number of steps per process); extract with a smaller --shard-size.
    """
    consumers = world_size * num_workers
    if len(shards) < consumers:
        raise CacheError(f"{len(shards)} shards cannot feed {world_size} node(s) x {num_workers} worker(s); use fewer "
                         "workers or re-write the cache with a smaller --shard-size (`featcache convert`)")
    return shards[rank * num_workers + worker::consumers]


def _torch_iterable() -> type:
    from torch.utils.data import IterableDataset

    return IterableDataset


class WdsStream(_torch_iterable()):
    """Streams a wds cache; hand-rolled instead of ``webdataset.split_by_node``/``split_by_worker`` so that a
    shortage of shards fails loudly and only :data:`DECODERS` ever decode a member."""

    def __init__(self, reader: WdsReader, names: list[str] | None, rank: int, world_size: int,
                 shuffle_shards: bool, seed: int):
        self.reader, self.names, self.rank, self.world_size = reader, names, rank, world_size
        self.shuffle_shards, self.seed, self.epoch = shuffle_shards, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def shards(self) -> list[int]:
        from torch.utils.data import get_worker_info

        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        shards = list(range(self.reader.manifest.num_units))
        if self.shuffle_shards:  # same order on every consumer, so the split stays disjoint
            random.Random(self.seed * 100003 + self.epoch).shuffle(shards)
        return split_shards(shards, self.rank, self.world_size, worker, workers)

    def __iter__(self) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
        for unit in self.shards():
            yield from self.reader.stream_unit(unit, self.names)
