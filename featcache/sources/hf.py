"""Hugging Face ``datasets`` sources: a directory written by ``Dataset.save_to_disk``, or parquet files.

A sample is one row: relpath ``<file relative to the root>#<row in that file>``. The image column holds encoded
bytes, as the ``datasets.Image`` feature stores them (a struct of ``bytes`` and ``path``) or as a plain binary
column; they are decoded by Pillow like folder images, never by ``datasets`` (whose ``Image`` decoding would also
open the ``path`` a dataset names, a path from the data rather than from the user). A row whose image has no bytes
is refused. The label column is an integer column; a ``ClassLabel`` feature gives the class names, otherwise they
are ``"0" .. "<max label>"``.

Stage 2 reads the very rows of the cache: the manifest records the files with their sizes and row counts (and a
SHA-256 of that list), which are checked again when the source is re-opened, so a dataset re-saved or re-sharded
since extraction is refused instead of feeding other images to the cached targets.

Random access: an arrow file (the IPC stream format ``save_to_disk`` writes) is memory-mapped and read zero-copy, so
a row costs its own bytes; a parquet file is read a row group at a time (parquet has no smaller random read), the
last row group kept per file and worker, so shuffled reading of parquet costs a row group per sample: for large
parquet datasets prefer small row groups or ``save_to_disk``. Files are opened lazily in each process.
"""
from __future__ import annotations

import glob
import hashlib
import json
import os
from pathlib import Path, PurePosixPath
from typing import Any, Sequence

from ..errors import CacheError, ConfigError, DecodeError, MissingFileError, SourceError
from .base import READERS, ImageSource, SourceItem, split_item_relpath

STATE_FILE = "state.json"  # written by save_to_disk beside its arrow files
DICT_FILE = "dataset_dict.json"  # written by DatasetDict.save_to_disk at the root of its splits
_INSTALL = "pip install 'featcache[hf]' (datasets, pyarrow)"


def is_hf_spec(path: str | os.PathLike | Sequence[str]) -> bool:
    """A ``save_to_disk`` directory, a parquet file or glob, or a directory of parquet files."""
    if isinstance(path, (list, tuple)):
        return bool(path) and all(str(p).endswith(".parquet") for p in path)
    text = str(path)
    if text.endswith(".parquet"):
        return True
    if os.path.isdir(text):
        return any(os.path.isfile(os.path.join(text, n)) for n in (STATE_FILE, DICT_FILE)) or bool(
            glob.glob(os.path.join(glob.escape(text), "*.parquet")))
    return False


def _libraries():
    try:
        import datasets
        import pyarrow
    except ImportError:
        raise ConfigError(f"reading a Hugging Face dataset or parquet files needs datasets and pyarrow: {_INSTALL}"
                          ) from None
    return datasets, pyarrow


def hf_files(path: str | os.PathLike | Sequence[str]) -> tuple[str, list[str], str]:
    """(root, the data files in row order, ``arrow`` or ``parquet``) of a dataset spec.

    Raises:
        SourceError: for a DatasetDict root (its splits are named) or a directory without data files.
        MissingFileError: when nothing matches.
    """
    if not isinstance(path, (list, tuple)) and os.path.isdir(path):
        folder = os.path.abspath(path)
        if os.path.isfile(os.path.join(folder, DICT_FILE)):
            splits = sorted(n for n in os.listdir(folder) if os.path.isfile(os.path.join(folder, n, STATE_FILE)))
            raise SourceError(f"{folder} holds a DatasetDict (splits: {', '.join(splits) or 'none'}); pass one split, "
                              f"e.g. --data {os.path.join(folder, splits[0] if splits else 'train')}")
        if os.path.isfile(os.path.join(folder, STATE_FILE)):
            return folder, _arrow_files(folder), "arrow"
        return folder, sorted(glob.glob(os.path.join(glob.escape(folder), "*.parquet"))), "parquet"
    specs = [str(p) for p in path] if isinstance(path, (list, tuple)) else [str(path)]
    files = sorted({os.path.abspath(f) for spec in specs for f in glob.glob(spec)})
    if not files:
        raise MissingFileError(f"no parquet files at {path!r}")
    return os.path.commonpath([os.path.dirname(f) for f in files]), files, "parquet"


def _arrow_files(folder: str) -> list[str]:
    """The arrow files of a ``save_to_disk`` directory, from its state.json (JSON, read with the json module)."""
    state = json.loads(Path(folder, STATE_FILE).read_text())
    if state.get("_indices_data_files"):  # save_to_disk flattens indices; a hand-made one could point elsewhere
        raise SourceError(f"{folder}: an indices mapping is not supported; re-save the dataset with "
                          "dataset.flatten_indices().save_to_disk(...)")
    names = [str(f["filename"]) for f in state.get("_data_files", [])]
    for name in names:
        split_item_relpath(f"{name}#0", "dataset", "<file>#<row>")  # a file name that climbs out is refused
    return [os.path.join(folder, n) for n in names]


class HFFile:
    """One arrow or parquet file, opened on first use in the process that reads it."""

    def __init__(self, path: str, fmt: str, column: str):
        self.path, self.fmt, self.column = path, fmt, column
        self._table = None  # arrow: the memory-mapped table
        self._parquet = None
        self._starts: list[int] = []  # parquet: the first row of each row group
        self._group: tuple[int, Any] | None = None  # parquet: (index, column) of the last row group read

    def num_rows(self) -> int:
        return self.arrow_table().num_rows if self.fmt == "arrow" else self.parquet_file().metadata.num_rows

    def arrow_table(self):
        if self._table is None:
            _, pa = _libraries()
            self._table = pa.ipc.open_stream(pa.memory_map(self.path, "r")).read_all()
        return self._table

    def parquet_file(self):
        if self._parquet is None:
            import pyarrow.parquet as pq

            self._parquet = pq.ParquetFile(self.path, memory_map=True)
            meta = self._parquet.metadata
            self._starts = [0]
            for g in range(meta.num_row_groups):
                self._starts.append(self._starts[-1] + meta.row_group(g).num_rows)
        return self._parquet

    def column_values(self, column: str) -> list[Any]:
        if self.fmt == "arrow":
            return self.arrow_table().column(column).to_pylist()
        return self.parquet_file().read(columns=[column]).column(column).to_pylist()

    def value(self, row: int) -> Any:
        """The image column's value at ``row``."""
        if self.fmt == "arrow":
            return self.arrow_table().column(self.column)[row].as_py()
        import bisect

        self.parquet_file()
        group = bisect.bisect_right(self._starts, row) - 1
        if self._group is None or self._group[0] != group:
            self._group = (group, self._parquet.read_row_group(group, columns=[self.column]).column(self.column))
        return self._group[1][row - self._starts[group]].as_py()


def image_bytes(value: Any, where: str, relpath: str) -> bytes:
    """The encoded image of one cell: a ``datasets.Image`` struct (``bytes``/``path``) or plain bytes."""
    if isinstance(value, dict):
        if value.get("bytes") is None:
            raise DecodeError(where, f"the row holds no image bytes, only a path ({value.get('path')!r}); featcache "
                              "reads images stored in the dataset: re-save it with the images embedded", relpath)
        value = value["bytes"]
    if not isinstance(value, bytes):
        raise DecodeError(where, f"the image column holds {type(value).__name__}, not encoded image bytes", relpath)
    return value


def column_kinds(files: list[str], fmt: str) -> tuple[Any, Any]:
    """(``datasets.Features`` of the first file, its arrow schema)."""
    datasets, pa = _libraries()
    if fmt == "arrow":
        schema = pa.ipc.open_stream(pa.memory_map(files[0], "r")).schema
    else:
        import pyarrow.parquet as pq

        schema = pq.read_schema(files[0])
    return datasets.Features.from_arrow_schema(schema), schema


def check_columns(features: Any, schema: Any, image_column: str, label_column: str, where: str) -> list[str] | None:
    """The ClassLabel names of the label column (None when it is a plain integer column); both columns checked."""
    datasets, pa = _libraries()
    for column, option in ((image_column, "--data-image-column"), (label_column, "--data-label-column")):
        if column not in features:
            raise ConfigError(f"{where} has no column {column!r} (columns: {', '.join(features)}); name the "
                              f"{'image' if option.endswith('image-column') else 'label'} column with {option}")
    image_type = schema.field(image_column).type
    if not (isinstance(features[image_column], datasets.Image) or pa.types.is_binary(image_type)
            or pa.types.is_large_binary(image_type)):
        raise SourceError(f"{where}: column {image_column!r} is {features[image_column]}, not an Image feature or "
                          "binary column of encoded images; name the image column with --data-image-column")
    label = features[label_column]
    if isinstance(label, datasets.ClassLabel):
        return list(label.names)
    if not pa.types.is_integer(schema.field(label_column).type):
        raise SourceError(f"{where}: label column {label_column!r} is {label}, not an integer or ClassLabel column; "
                          "name the label column with --data-label-column")
    return None


def file_entries(root: str, files: list[str], fmt: str) -> list[list[Any]]:
    """``[relpath, size in bytes, rows]`` per file: what identifies the dataset's rows cheaply."""
    return [[PurePosixPath(Path(os.path.relpath(f, root))).as_posix(), os.path.getsize(f),
             HFFile(f, fmt, "").num_rows()] for f in files]


def entries_sha256(entries: list[list[Any]]) -> str:
    return hashlib.sha256(json.dumps(entries, separators=(",", ":")).encode()).hexdigest()


def scan_hf(path: str | os.PathLike | Sequence[str], image_column: str = "image", label_column: str = "label"
            ) -> ImageSource:
    """A ``save_to_disk`` directory or parquet files as an :class:`ImageSource` of kind ``hf``."""
    root, files, fmt = hf_files(path)
    if not files:
        raise SourceError(f"no data files (*.arrow listed in {STATE_FILE}, or *.parquet) at {path!r}")
    features, schema = column_kinds(files, fmt)
    names = check_columns(features, schema, image_column, label_column, files[0])
    entries = file_entries(root, files, fmt)
    items: list[SourceItem] = []
    for (rel, _, _), f in zip(entries, files):
        labels = HFFile(f, fmt, image_column).column_values(label_column)
        bad = next((v for v in labels if v is None or v < 0), 0)
        if bad != 0:
            raise SourceError(f"{f}: label column {label_column!r} holds {bad!r}; every row needs a label >= 0")
        items += [SourceItem(f"{rel}#{row}", int(label)) for row, label in enumerate(labels)]
    if not items:
        raise SourceError(f"the dataset at {path!r} has no rows")
    top = max(it.label for it in items)
    classes = names if names is not None else [str(i) for i in range(top + 1)]
    if top >= len(classes):
        raise SourceError(f"{root}: a label is {top} but the ClassLabel names {len(classes)} classes")
    recorded = {"hf": {"format": fmt, "image_column": image_column, "label_column": label_column, "files": entries,
                       "files_sha256": entries_sha256(entries)}}
    return ImageSource("hf", root, classes, items, recorded=recorded)


def check_unchanged(source: ImageSource) -> None:
    """Refuse a dataset whose files differ (names, sizes, row counts) from those recorded at extraction."""
    hf = source.recorded.get("hf")
    if not isinstance(hf, dict) or hf.get("format") not in ("arrow", "parquet"):
        raise CacheError("the cache's data section has no valid 'hf' entry; the manifest is corrupt")
    recorded = hf["files"]
    if entries_sha256(recorded) != hf.get("files_sha256"):
        raise CacheError("the cache's list of dataset files does not match its recorded hash; the manifest is corrupt")
    for rel, size, rows in recorded:
        path = os.path.join(source.root, split_item_relpath(f"{rel}#0", "dataset", "<file>#<row>")[0])
        if not os.path.isfile(path):
            raise MissingFileError(f"dataset file {path} recorded in the cache does not exist; pass --data with the "
                                   "dataset the cache was extracted from")
        now = [os.path.getsize(path), HFFile(path, hf["format"], "").num_rows()]
        if now != [size, rows]:
            raise SourceError(f"dataset file {path} changed since extraction ({now[0]} bytes, {now[1]} rows; recorded "
                              f"{size} bytes, {rows} rows); pass --data with the dataset the cache was extracted "
                              "from, or extract a new cache")


@READERS.register("hf")
def read_hf_item(source: ImageSource, relpath: str) -> bytes:
    """The image bytes of row ``<file>#<row>``, through a per-process :class:`HFFile`."""
    rel, row_text = split_item_relpath(relpath, "dataset", "<file>#<row>")
    if not row_text.isdigit():
        raise CacheError(f"bad dataset item {relpath!r}: the row must be a number")
    hf = source.recorded["hf"]
    if rel not in source._index:
        source._index[rel] = HFFile(os.path.join(source.root, rel), hf["format"], hf["image_column"])
    handle = source._index[rel]
    row = int(row_text)
    if row >= handle.num_rows():
        raise CacheError(f"row {row} is past the end of {handle.path}; the dataset changed since the cache was made")
    return image_bytes(handle.value(row), os.path.join(source.root, relpath), relpath)
