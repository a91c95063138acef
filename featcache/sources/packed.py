"""A source's items as three flat arrays (a UTF-8 blob of relpaths, their offsets, the labels) instead of one Python
object per image: a million ``SourceItem`` objects cost ~170 MB in a process and as much again in every pickle
shipped to a DataLoader worker, the arrays ~50 B per item, and a worker can map them from the cache instead.

The file-list hash and the path checks are computed over the arrays in bulk (numpy, in bounded chunks), so opening a
cache costs no Python loop over its images.
"""
from __future__ import annotations

import hashlib
from typing import Iterator, Mapping, Sequence

import numpy as np

from ..errors import CacheError
from ..manifest import safe_relpath
from .base import SourceItem

RELPATHS, OFFSETS, LABELS = "relpaths", "relpath_offsets", "labels"
_CHUNK = 1 << 16  # items hashed / checked per numpy pass: bounds the temporaries to a few MB
_SLASH, _DOT = ord("/"), ord(".")


def pack_items(items: Sequence[SourceItem]) -> dict[str, np.ndarray]:
    """``{relpaths: uint8 UTF-8 blob, relpath_offsets: int64 [n + 1], labels: int64 [n]}`` of ``items``."""
    encoded = [it.relpath.encode() for it in items]
    offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
    np.cumsum([len(e) for e in encoded], out=offsets[1:])
    blob = np.frombuffer(b"".join(encoded), dtype=np.uint8).copy()
    return {RELPATHS: blob, OFFSETS: offsets, LABELS: np.asarray([int(it.label) for it in items], dtype=np.int64)}


class PackedItems(Sequence[SourceItem]):
    """A read-only sequence of :class:`SourceItem` over packed arrays (any mapping holding them: a dict, or a cache's
    lazily opened arrays, which pickle as a reference to the cache rather than as their contents)."""

    def __init__(self, arrays: Mapping[str, np.ndarray]) -> None:
        self.arrays = arrays

    def __len__(self) -> int:
        return len(self.arrays[LABELS])

    def __getitem__(self, i: int | slice) -> SourceItem | list[SourceItem]:  # type: ignore[override]
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        if not -len(self) <= i < len(self):
            raise IndexError(f"item {i} out of range: the source has {len(self)} items")
        i %= len(self)
        start, stop = self.arrays[OFFSETS][i:i + 2]
        return SourceItem(bytes(self.arrays[RELPATHS][start:stop]).decode(), int(self.arrays[LABELS][i]))

    def __iter__(self) -> Iterator[SourceItem]:
        return (self[i] for i in range(len(self)))

    @property
    def labels(self) -> np.ndarray:
        return np.asarray(self.arrays[LABELS])


def check_packed(arrays: Mapping[str, np.ndarray], count: int, num_classes: int, separators: bytes = b"/") -> None:
    """Refuse packed items that do not describe ``count`` safe relative paths with labels in ``range(num_classes)``.

    One vectorised pass: empty paths, a leading ``/``, NUL or backslash bytes, and ``..`` between separators
    (``separators``: ``/``, plus ``#`` for shard members). Each path is checked again when its file is opened
    (:func:`~featcache.manifest.safe_relpath`), so this is the early, whole-list refusal, not the only one.

    Raises:
        CacheError: naming the first bad path.
    """
    blob, offsets, labels = (np.asarray(arrays[k]) for k in (RELPATHS, OFFSETS, LABELS))
    if (blob.dtype, offsets.dtype, labels.dtype) != (np.uint8, np.int64, np.int64) or blob.ndim != 1 or \
            offsets.shape != (count + 1,) or labels.shape != (count,) or offsets[0] != 0 or offsets[-1] != len(blob) \
            or np.any(np.diff(offsets) < 0):
        raise CacheError(f"the cache's source arrays do not describe {count} images (relpaths {blob.dtype}"
                         f"{blob.shape}, offsets {offsets.dtype}{offsets.shape}, labels {labels.dtype}{labels.shape}); "
                         "the cache is damaged: re-extract it with --overwrite")
    out_of_range = np.flatnonzero((labels < 0) | (labels >= num_classes))
    if len(out_of_range):
        i = int(out_of_range[0])
        raise CacheError(f"image {i} of the cache has label {int(labels[i])}, outside its {num_classes} classes; the "
                         "cache is damaged: re-extract it with --overwrite")
    bad = _first_unsafe(blob, offsets, np.frombuffer(separators, dtype=np.uint8))
    if bad is not None:
        safe_relpath(bytes(blob[offsets[bad]:offsets[bad + 1]]).decode(errors="replace"))  # raises, naming it
        raise CacheError(f"unsafe path {bytes(blob[offsets[bad]:offsets[bad + 1]])!r} in the cache: paths must be "
                         "relative and stay inside the root")


def _first_unsafe(blob: np.ndarray, offsets: np.ndarray, separators: np.ndarray) -> int | None:
    """Index of the first item whose relpath is empty, absolute, holds NUL / backslash or a ``..`` component.

    Byte searches (``bytes.find`` runs at memory speed) decide whether the slower numpy passes are needed at all:
    real file lists rarely hold a ``..`` or a NUL anywhere.
    """
    starts, lengths = offsets[:-1], np.diff(offsets)
    bad = lengths == 0
    bad[~bad] |= blob[starts[~bad]] == _SLASH
    data = blob.tobytes()
    suspects = [np.flatnonzero(blob == byte) for byte in (0, ord("\\")) if bytes([byte]) in data]
    if b".." in data:  # ".." counts only as a whole component: a start or separator before, an end or one after
        dots = np.flatnonzero((blob[:-1] == _DOT) & (blob[1:] == _DOT))
        owner = np.searchsorted(offsets, dots, side="right") - 1
        before_ok = (dots == offsets[owner]) | np.isin(blob[np.maximum(dots - 1, 0)], separators)
        after = dots + 2
        after_ok = (after == offsets[owner + 1]) | np.isin(blob[np.minimum(after, len(blob) - 1)], separators)
        suspects.append(dots[before_ok & after_ok])
    flagged = np.concatenate([np.zeros(0, dtype=np.int64), *suspects])
    if len(flagged):
        bad[np.searchsorted(offsets, flagged, side="right") - 1] = True
    hits = np.flatnonzero(bad)
    return int(hits[0]) if len(hits) else None


def packed_file_list_sha256(arrays: Mapping[str, np.ndarray]) -> str:
    """:func:`~featcache.sources.subsets.file_list_sha256` of packed items, computed in numpy chunks: the
    ``"relpath\\tlabel\\n"`` lines are assembled as byte arrays, never as Python strings."""
    blob, offsets, labels = (np.asarray(arrays[k]) for k in (RELPATHS, OFFSETS, LABELS))
    h = hashlib.sha256()
    for lo in range(0, len(labels), _CHUNK):
        h.update(_lines(blob, offsets[lo:lo + _CHUNK + 1], labels[lo:lo + _CHUNK]))
    return h.hexdigest()


def _lines(blob: np.ndarray, offsets: np.ndarray, labels: np.ndarray) -> bytes:
    """The bytes ``relpath\\tlabel\\n`` of one chunk of items, laid out with index arithmetic."""
    digits = labels.astype("S20")  # decimal ASCII, as f"{label}" writes it
    digit_len = np.char.str_len(digits)
    path_len = np.diff(offsets)
    line_len = path_len + digit_len + 2
    line_start = np.concatenate([[0], np.cumsum(line_len)[:-1]])
    out = np.empty(int(line_len.sum()), dtype=np.uint8)
    path_pos = np.arange(offsets[0], offsets[-1]) - np.repeat(offsets[:-1] - line_start, path_len)
    out[path_pos] = blob[offsets[0]:offsets[-1]]
    tab = line_start + path_len
    out[tab] = ord("\t")
    width = digits.dtype.itemsize
    cols = np.arange(width)
    table = digits.view(np.uint8).reshape(-1, width)
    keep = cols[None, :] < digit_len[:, None]
    out[(tab[:, None] + 1 + cols[None, :])[keep]] = table[keep]
    out[tab + 1 + digit_len] = ord("\n")
    return out.tobytes()
