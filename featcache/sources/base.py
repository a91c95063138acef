"""`SourceItem`, `ImageSource` (picklable, opens files only in `load`) and the report of ignored entries."""
from __future__ import annotations

import functools
import logging
import os
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import torch

from ..errors import CacheError, ConfigError, DecodeError
from ..manifest import safe_relpath
from ..registry import Registry
from .decode import decode_image
from .tars import index_shard

# torchvision's ImageFolder extensions (torchvision.datasets.folder.IMG_EXTENSIONS), matched in any case.
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
KINDS = ("folder", "wds", "hf")
#: kind -> ``read(source, relpath) -> bytes``: how an item's encoded bytes are read (``hf`` registers in hf.py).
READERS: Registry[Callable[["ImageSource", str], bytes]] = Registry("data kind")

log = logging.getLogger("featcache.sources")


@dataclass(frozen=True)
class SourceItem:
    relpath: str
    label: int


def is_image(name: str) -> bool:
    return name.lower().endswith(IMG_EXTENSIONS)


def within(path: str, root: str) -> bool:
    """True when the (resolved) ``path`` is ``root`` or lies under it."""
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


@functools.lru_cache(maxsize=1)
def _pillow_extensions() -> frozenset[str]:
    from PIL import Image

    return frozenset(ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN)


def file_reason(name: str) -> str:
    """Why a file with this name is not read as an image (extension not in :data:`IMG_EXTENSIONS`)."""
    ext = os.path.splitext(name)[1].lower()
    if ext in _pillow_extensions():
        return f"Pillow registers {ext} images, but featcache reads only {'/'.join(IMG_EXTENSIONS)}: convert them"
    return f"not an image extension ({ext or 'no extension'})"


def report_ignored(where: str, ignored: Sequence[tuple[str, str]]) -> None:
    """Log one line per reason: how many entries under ``where`` were not used, and a few of them."""
    by_reason: dict[str, list[str]] = defaultdict(list)
    for path, reason in ignored:
        by_reason[reason].append(path)
    for reason, paths in by_reason.items():
        more = f" and {len(paths) - 3} more" if len(paths) > 3 else ""
        log.warning("featcache: ignored %d under %s (%s): %s%s", len(paths), where, reason, ", ".join(paths[:3]), more)


def split_item_relpath(relpath: str, what: str = "WebDataset", expected: str = "<shard.tar>#<member>"
                       ) -> tuple[str, str]:
    """``<file>#<part>`` split in two, each part checked to stay inside the root."""
    file, sep, part = relpath.partition("#")
    if not sep or not part:
        raise CacheError(f"bad {what} item {relpath!r}: expected '{expected}'")
    return safe_relpath(file), safe_relpath(part)


def split_wds_relpath(relpath: str) -> tuple[str, str]:
    return split_item_relpath(relpath)


class ImageSource:
    """Images + labels under one root. Picklable; files are opened only in `load`.

    Attributes:
        kind: ``folder``, ``wds`` or ``hf``.
        root: the directory relpaths are relative to.
        classes: class names; ``classes[label]`` names a label.
        items: the images, in sample order.
        ignored: ``(path, reason)`` of every entry discovery did not use (empty for a source read from a manifest).
        recorded: what the manifest's ``data`` section keeps beside the file list so that stage 2 reads and checks
            the same images (``hf``: columns and files; ``staged``: the shard URLs and SHA-256 of their copies).
    """

    def __init__(self, kind: str, root: str | os.PathLike, classes: Sequence[str], items: Sequence[SourceItem],
                 ignored: Sequence[tuple[str, str]] = (), recorded: Mapping[str, Any] | None = None):
        if kind not in KINDS:
            raise ConfigError(f"unknown data kind {kind!r}; known: {list(KINDS)}")
        self.kind = kind
        self.root = str(root)
        self.classes = list(classes)
        self.items = items if hasattr(items, "arrays") else list(items)  # packed items stay packed (sources/packed.py)
        self.ignored = list(ignored)
        self.recorded = dict(recorded or {})
        # Per-process handles, never shipped to workers: wds shard -> member -> (offset, size); hf file -> reader.
        self._index: dict[str, Any] = {}

    def __len__(self) -> int:
        return len(self.items)

    def __repr__(self) -> str:
        return f"ImageSource(kind={self.kind!r}, root={self.root!r}, classes={len(self.classes)}, items={len(self)})"

    def __getstate__(self) -> dict[str, Any]:
        # Handles are per process (the wds index rebuilt lazily from tar headers, hf files re-opened), never shipped.
        state = self.__dict__.copy()
        state["_index"] = {}
        return state

    @property
    def labels(self) -> list[int]:
        return [it.label for it in self.items]

    def label_array(self) -> np.ndarray:
        """Every item's label as int64, without a Python object per item for packed items."""
        labels = getattr(self.items, "labels", None)
        return np.asarray(labels if labels is not None else [it.label for it in self.items], dtype=np.int64)

    def path_of(self, i: int) -> str:
        """Human-readable location of item ``i`` (``/root/class/x.jpg``, ``/root/shard.tar#key.jpg``,
        ``/root/data-00000-of-00001.arrow#12``)."""
        return os.path.join(self.root, self.items[i].relpath)

    def read_bytes(self, i: int) -> bytes:
        """The encoded bytes of item ``i``, read by the :data:`READERS` entry of this source's kind.

        Raises:
            DecodeError: a folder file that resolves outside the root, a shard member cut short, a dataset row
                without image bytes.
        """
        return READERS.get(self.kind)(self, self.items[i].relpath)

    def load(self, i: int) -> torch.Tensor:
        """Decoded RGB uint8 [3, H, W] of item ``i``.

        Raises:
            DecodeError: naming the file when it is missing, truncated, corrupt or outside the root.
        """
        try:
            data = self.read_bytes(i)
        except OSError as err:
            raise DecodeError(self.path_of(i), f"{type(err).__name__}: {err}", self.items[i].relpath) from err
        return decode_image(data, self.path_of(i), self.items[i].relpath)

    def subset(self, indices: Iterable[int]) -> "ImageSource":
        """A source holding ``items[i] for i in indices`` (shares this process's wds index)."""
        out = ImageSource(self.kind, self.root, self.classes, [self.items[i] for i in indices], recorded=self.recorded)
        out._index = self._index
        return out

    def _resolve_inside(self, relpath: str) -> str:
        """The real path of a folder item, refused when a symlink takes it out of the root (checked at every load:
        links may change after discovery or in a manifest's tree)."""
        path = os.path.join(self.root, safe_relpath(relpath))
        real, root = os.path.realpath(path), os.path.realpath(self.root)
        if not within(real, root):
            raise DecodeError(path, f"it resolves to {real}, outside the data root {root} (featcache reads only "
                              "files under the root)", relpath)
        return real

    def _member_index(self, shard: str) -> dict[str, tuple[int, int]]:
        if shard not in self._index:
            self._index[shard] = index_shard(os.path.join(self.root, shard))
        return self._index[shard]


@READERS.register("folder")
def read_folder_item(source: ImageSource, relpath: str) -> bytes:
    with open(source._resolve_inside(relpath), "rb") as fh:
        return fh.read()


@READERS.register("wds")
def read_wds_item(source: ImageSource, relpath: str) -> bytes:
    """A shard member's bytes at the offset its tar header gives."""
    shard, member = split_wds_relpath(relpath)
    entry = source._member_index(shard).get(member)
    if entry is None:
        raise CacheError(f"member {member!r} not found in shard {os.path.join(source.root, shard)}; the shards "
                         "changed since the cache was made")
    with open(os.path.join(source.root, shard), "rb") as fh:
        fh.seek(entry[0])
        data = fh.read(entry[1])
    if len(data) != entry[1]:
        raise DecodeError(os.path.join(source.root, relpath), f"the shard ends {entry[1] - len(data)} bytes into "
                          "this member", relpath)
    return data
