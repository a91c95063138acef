"""WebDataset backend: one tar shard per unit, one tar sample per view, readable with tar + numpy.

Layout::

    PATH/manifest.json                       the manifest (JSON)
    PATH/shard-{unit:06d}.tar                rows of one unit, written with webdataset's ShardWriter
    PATH/_featcache/units/unit-{u:06d}.json  completion markers
    PATH/_featcache/meta/<name>.npy          sources and records in bulk arrays (docs/FORMAT.md, Metadata arrays)
    member  s{sample:09d}_v{view:04d}.<array>.npy[.zst|.blosc]   one stored array of one view
    member  s{sample:09d}_v{view:04d}.records.json               the view's records

Members hold ``.npy`` bytes; with a lossless compressor the ``.npy`` bytes are compressed whole by numcodecs
(``.zst`` is a standard Zstandard frame; ``.blosc`` a Blosc frame). Reading uses :data:`DECODERS` only: any
other extension, an unknown array, a bad key or a name escaping the shard raises :class:`CacheError`.
webdataset's default decoders are never used because they unpickle ``.pyd``/``.pickle`` members.

On object storage (:mod:`featcache.storage`) a shard is written to the local temp directory and uploaded once whole;
random access builds a shard's member index with one buffered pass over its headers, then reads a member with one
ranged GET; streaming (:mod:`featcache.streaming`) reads shards front to back.
"""
from __future__ import annotations

import io
import json
import re
import tarfile
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import numpy as np

from ..durable import temp_token
from ..errors import CacheError
from ..manifest import RECORD_DTYPES, Manifest, safe_relpath
from ..storage import ObjectPath, RangeFile, is_local, missing_files
from . import _units
from .base import READERS, WRITERS, StoreReader, StoreWriter
from .codecs import numcodecs_compressor

KEY_RE = re.compile(r"^s(\d{9})_v(\d{4})$")
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


def _record_columns(recs: list[Any]) -> dict[str, np.ndarray]:
    """Per-view records (``records.json`` members) as columns of their contract dtypes.

    Raises:
        CacheError: when a member is not a records object.
    """
    if not recs or not all(isinstance(r, dict) and set(RECORD_DTYPES) <= set(r) for r in recs):
        raise CacheError(f"a records.json member does not hold the records {sorted(RECORD_DTYPES)}; the shard is "
                         "damaged: re-extract it")
    return _units.record_arrays({k: np.asarray([r[k] for r in recs]) for k in RECORD_DTYPES})


def _npy_bytes(value: np.ndarray, compressor) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(value), allow_pickle=False)
    data = buf.getvalue()
    return bytes(compressor.encode(data)) if compressor is not None else data


def _record_json(records: Mapping[str, np.ndarray], i: int) -> bytes:
    rec = {k: v[i].tolist() for k, v in records.items()}
    return json.dumps(rec, sort_keys=True).encode()


@WRITERS.register("wds")
class WdsWriter(_units.JsonManifestWriter, StoreWriter):
    """Writes tar shards with ``webdataset.ShardWriter``: a temp name first, renamed once complete and fsynced,
    so a killed extraction never leaves a half tar under a final name. On object storage the tar is staged in the
    local temp directory and uploaded once complete (one atomic PUT, or a multipart upload that appears whole)."""

    def _write_data(self, unit: int, targets: Mapping[str, np.ndarray], records: Mapping[str, np.ndarray]
                    ) -> dict[str, Any]:
        final = self.path / shard_name(unit)
        if is_local(final):
            self._write_tar(unit, targets, records, self.path, lambda tmp: _units.publish(Path(tmp), final))
        else:
            with tempfile.TemporaryDirectory(prefix="featcache-shard-") as staging:
                self._write_tar(unit, targets, records, Path(staging), final.upload)
        return {"file": shard_name(unit)}

    def _write_tar(self, unit: int, targets: Mapping[str, np.ndarray], records: Mapping[str, np.ndarray],
                   where: Path, post: Callable[[str], Any]) -> None:
        import webdataset as wds

        rows = self._manifest.unit_rows(unit)
        members = self._member_names()
        # A temp name of this writer's own (two writers must never share one), renamed once complete and fsynced.
        pattern = str(where / f".shard-%06d.tar.{temp_token()}.tmp")
        # One tar per unit (maxcount > rows); mtime 0 makes shard bytes reproducible; post renames when complete.
        with wds.ShardWriter(pattern, maxcount=len(rows) + 1, maxsize=float("inf"), start_shard=unit, verbose=0,
                             encoder=False, mtime=0.0, post=post) as sink:
            for i, row in enumerate(rows):
                sample = {"__key__": row_key(self._manifest, row), "records.json": _record_json(records, i)}
                for name, (ext, codec) in members.items():
                    sample[f"{name}.{ext}"] = _npy_bytes(targets[name][i], codec)
                sink.write(sample)

    def _member_names(self) -> dict[str, tuple[str, Any]]:
        out = {}
        for name, spec in self._manifest["arrays"].items():
            comp = dict(spec.get("compressor") or {"name": "none"})
            itemsize = np.dtype(spec["dtype"]).itemsize
            out[name] = ("npy" + COMPRESSED_SUFFIX[comp["name"]], numcodecs_compressor(comp, itemsize))
        return out


def shard_name(unit: int) -> str:
    """The tar file of ``unit``."""
    return f"shard-{unit:06d}.tar"


@READERS.register("wds")
class WdsReader(_units.JsonManifestLayout, StoreReader):
    """Random access through a lazily built per-shard member index (tar headers -> offsets, then ``pread``, or a
    ranged GET on object storage); streaming through :meth:`iter_stored_unit` / :meth:`iterable_dataset`."""

    def _fresh_handles(self) -> None:
        self._fds: dict[int, RangeFile] = {}
        self._index: dict[int, dict[tuple[int, str], tuple[int, int, str]]] = {}
        self._records: dict[str, np.ndarray] | None = None

    def _close_handles(self) -> None:
        for fh in self._fds.values():
            fh.close()
        self._fds.clear()

    def shard_path(self, unit: int) -> Path | ObjectPath:
        """The tar file of ``unit``."""
        return self.path / shard_name(unit)

    def _fd(self, unit: int) -> RangeFile:
        self._own_handles()
        if unit not in self._fds:
            path = self.shard_path(unit)
            try:
                self._fds[unit] = RangeFile(path)
            except FileNotFoundError:
                raise CacheError(f"shard {str(path)!r} is missing; re-run `featcache extract` to write it") from None
        return self._fds[unit]

    @contextmanager
    def _open_tar(self, unit: int, mode: str) -> Iterator[tarfile.TarFile]:
        """The shard as a tar: ``r:`` seeks from header to header (the index), ``r|`` streams it front to back."""
        path = self.shard_path(unit)
        if is_local(path):
            with tarfile.open(path, mode) as tar:
                yield tar
            return
        with path.open("rb") as fh, tarfile.open(fileobj=fh, mode=mode) as tar:  # fsspec's buffered reads
            yield tar

    def _unit_index(self, unit: int) -> dict[tuple[int, str], tuple[int, int, str]]:
        self._fd(unit)
        if unit not in self._index:
            index = {}
            with self._open_tar(unit, "r:") as tar:
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
        unit = self.unit_of(row)
        try:
            offset, size, ext = self._unit_index(unit)[(row, array)]
        except KeyError:
            raise CacheError(f"{self.shard_path(unit)} has no member for row {row} array {array!r}") from None
        return DECODERS[ext](self._fd(unit).read(size, offset))

    def read_stored_row(self, row: int, names: list[str] | None = None) -> dict[str, np.ndarray]:
        return {n: self._member(row, n) for n in names or list(self.manifest["arrays"])}

    def _records_by_unit(self) -> dict[str, np.ndarray]:
        """Every row's records: one ``pread`` per row locally; on object storage each shard is streamed once
        instead (a ranged GET per row would cost a round trip each)."""
        if self._records is None:
            if is_local(self.path):
                recs = [self._member(row, "records") for row in range(len(self))]
            else:
                units = range(self.manifest.num_units)
                recs = [got["records"] for unit in units for _, got in self._stream(unit, {"records"})]
            self._records = _record_columns(recs)
        return dict(self._records)

    def unit_records(self, unit: int) -> dict[str, np.ndarray]:
        return _record_columns([self._member(row, "records") for row in self.manifest.unit_rows(unit)])

    def _check_layout(self, notes: list[dict[str, Any]]) -> None:
        """The tar shard of every marked unit is there (its members are validated when it is read)."""
        shards = {self.shard_path(u): u for u in sorted(_units.completed(notes))}
        for path in missing_files(list(shards), self.path)[:1]:
            raise CacheError(f"shard {path} of marked unit {shards[path]} is missing; re-run the same "
                             "`featcache extract` command to redo it")

    def iter_stored_unit(self, unit: int, names: list[str] | None = None
                         ) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
        """Read one shard front to back (sequential reads, no index), validating every member."""
        return self._stream(unit, set(names or self.manifest["arrays"]))

    def stream_rows(self, unit: int, names: list[str] | None, rows: set[int]) -> Iterator[tuple[int, dict[str, Any]]]:
        """Read one shard front to back like :meth:`iter_stored_unit`, decoding only ``rows`` (the others' members
        are read past: a stream cannot skip bytes, but it need not decode them)."""
        return self._stream(unit, set(names or self.manifest["arrays"]), rows)

    def _stream(self, unit: int, wanted: set[str], rows: set[int] | None = None
                ) -> Iterator[tuple[int, dict[str, Any]]]:
        current, stored = None, {}
        with self._open_tar(unit, "r|") as tar:
            for info in tar:
                row, array, ext = self._check(info)
                if current is not None and row != current:
                    yield current, stored
                    stored = {}
                current = row
                if array in wanted and (rows is None or row in rows):
                    stored[array] = DECODERS[ext](tar.extractfile(info).read())
        if current is not None:
            yield current, stored

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
                         shuffle_shards: bool = False, seed: int = 0) -> Any:
        """A torch IterableDataset over ``(row, targets)``, shards split across nodes x DataLoader workers
        (:class:`~featcache.stores.wds_stream.WdsStream`)."""
        from .wds_stream import WdsStream  # torch: imported when streaming, not with the store

        return WdsStream(self, names, rank, world_size, shuffle_shards, seed)
