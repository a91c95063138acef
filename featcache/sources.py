"""Image sources (an ImageFolder tree or WebDataset image shards) and seeded few-shot subsets.

An `ImageSource` is a list of `SourceItem` (relpath, label) under a root, plus a loader returning RGB
uint8 [3, H, W] tensors. It is picklable and opens nothing until `load` is called, so DataLoader workers
each open their own files.

``folder``: ``root/<class>/**/<image>`` (ImageNet train layout). Classes are the sorted sub-directory names
(hidden ones skipped), label = class index, files sorted per class, extensions jpg/jpeg/png/bmp/webp (any
case). relpath = ``<class>/<file>``.

``wds``: uncompressed tar shards holding ``<key>.<image ext>`` + ``<key>.cls`` (an ASCII integer), given
as a directory (its ``*.tar`` files, sorted), a brace pattern (``shards/train-{000000..000099}.tar``) or a
list. relpath = ``<shard path relative to root>#<member name>``. Labels are the ``.cls`` integers, kept
as they are; class names come from ``classes.txt`` (one per line) or ``classes.json`` (a list) beside the
shards, else ``"0" .. "<max label>"``. Random access reads a member's bytes at its offset; the offset index
comes from the tar headers (read once per process, lazily). webdataset's decoders are not used (they
unpickle); members are decoded by Pillow like folder images.
"""
from __future__ import annotations

import glob
import hashlib
import io
import json
import os
import tarfile
import threading
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Iterable, Iterator, Mapping, Sequence

import numpy as np
import torch
from PIL import Image, ImageFile
from tqdm import tqdm

from .errors import CacheError, DecodeError as ImageDecodeError
from .manifest import safe_relpath

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
KINDS = ("folder", "wds")


@dataclass(frozen=True)
class SourceItem:
    relpath: str
    label: int


_TRUNCATION_LOCK = threading.Lock()


def decode_image(data: bytes, path: str, relpath: str | None = None) -> torch.Tensor:
    """Decode encoded image bytes fully with Pillow into RGB uint8 [3, H, W].

    Pillow decodes lazily and ``ImageFile.LOAD_TRUNCATED_IMAGES`` (a process-wide flag other libraries set)
    would pad a truncated file with grey; we force the strict setting during ``load()`` so truncation raises.

    Raises:
        ImageDecodeError: naming ``path`` for any decode failure.
    """
    try:
        with Image.open(io.BytesIO(data)) as img:
            with _TRUNCATION_LOCK:
                previous, ImageFile.LOAD_TRUNCATED_IMAGES = ImageFile.LOAD_TRUNCATED_IMAGES, False
                try:
                    img.load()
                finally:
                    ImageFile.LOAD_TRUNCATED_IMAGES = previous
            rgb = np.asarray(img.convert("RGB"))
    except Exception as err:  # Pillow raises OSError, SyntaxError, ValueError, DecompressionBombError...
        raise ImageDecodeError(path, f"{type(err).__name__}: {err}", relpath) from err
    return torch.from_numpy(rgb.copy()).permute(2, 0, 1).contiguous()


class ImageSource:
    """Images + labels under one root. Picklable; files are opened only in `load`.

    Attributes:
        kind: ``folder`` or ``wds``.
        root: the directory relpaths are relative to.
        classes: class names; ``classes[label]`` names a label.
        items: the images, in sample order.
    """

    def __init__(self, kind: str, root: str | os.PathLike, classes: Sequence[str], items: Sequence[SourceItem]):
        if kind not in KINDS:
            raise ValueError(f"unknown data kind {kind!r}; known: {list(KINDS)}")
        self.kind = kind
        self.root = str(root)
        self.classes = list(classes)
        self.items = list(items)
        self._index: dict[str, dict[str, tuple[int, int]]] = {}  # wds: shard -> member -> (offset, size)

    def __len__(self) -> int:
        return len(self.items)

    def __repr__(self) -> str:
        return f"ImageSource(kind={self.kind!r}, root={self.root!r}, classes={len(self.classes)}, items={len(self)})"

    def __getstate__(self) -> dict[str, Any]:
        # The wds offset index is per process (rebuilt lazily from tar headers), never shipped to workers.
        state = self.__dict__.copy()
        state["_index"] = {}
        return state

    @property
    def labels(self) -> list[int]:
        return [it.label for it in self.items]

    def path_of(self, i: int) -> str:
        """Human-readable location of item ``i`` (``/root/class/x.jpg`` or ``/root/shard.tar#key.jpg``)."""
        return os.path.join(self.root, self.items[i].relpath)

    def read_bytes(self, i: int) -> bytes:
        """The encoded bytes of item ``i``."""
        relpath = self.items[i].relpath
        if self.kind == "folder":
            with open(os.path.join(self.root, safe_relpath(relpath)), "rb") as fh:
                return fh.read()
        shard, member = _split_wds_relpath(relpath)
        entry = self._member_index(shard).get(member)
        if entry is None:
            raise CacheError(f"member {member!r} not found in shard {os.path.join(self.root, shard)}; the shards "
                             "changed since the cache was made")
        with open(os.path.join(self.root, shard), "rb") as fh:
            fh.seek(entry[0])
            return fh.read(entry[1])

    def load(self, i: int) -> torch.Tensor:
        """Decoded RGB uint8 [3, H, W] of item ``i``.

        Raises:
            ImageDecodeError: naming the file when it is missing, truncated or corrupt.
        """
        try:
            data = self.read_bytes(i)
        except OSError as err:
            raise ImageDecodeError(self.path_of(i), f"{type(err).__name__}: {err}", self.items[i].relpath) from err
        return decode_image(data, self.path_of(i), self.items[i].relpath)

    def subset(self, indices: Iterable[int]) -> "ImageSource":
        """A source holding ``items[i] for i in indices`` (shares this process's wds index)."""
        out = ImageSource(self.kind, self.root, self.classes, [self.items[i] for i in indices])
        out._index = self._index
        return out

    def _member_index(self, shard: str) -> dict[str, tuple[int, int]]:
        if shard not in self._index:
            self._index[shard] = _index_shard(os.path.join(self.root, shard), shard)
        return self._index[shard]


def _split_wds_relpath(relpath: str) -> tuple[str, str]:
    shard, sep, member = relpath.partition("#")
    if not sep or not member:
        raise CacheError(f"bad WebDataset item {relpath!r}: expected '<shard.tar>#<member>'")
    return safe_relpath(shard), safe_relpath(member)


def _safe_members(tar: tarfile.TarFile, path: str) -> Iterator[tarfile.TarInfo]:
    """The regular-file members of an open shard, refusing the whole shard if any member name is unsafe."""
    for info in tar:
        try:
            safe_relpath(info.name)
        except CacheError as err:
            raise CacheError(f"shard {path}: {err}") from None
        if info.isfile():
            yield info


def _index_shard(path: str, shard: str) -> dict[str, tuple[int, int]]:
    """Member name -> (data offset, size) of the regular files in a tar shard, from its headers only."""
    try:
        with tarfile.open(path, mode="r:") as tar:
            return {info.name: (info.offset_data, info.size) for info in _safe_members(tar, path)}
    except tarfile.ReadError as err:
        raise CacheError(f"cannot index shard {path}: {err}; only uncompressed .tar shards support random "
                         "access (decompress .tar.gz shards first)") from err


# ---------------------------------------------------------------------------------------------- discovery


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMG_EXTENSIONS)


def scan_folder(root: str | os.PathLike) -> ImageSource:
    """An ImageFolder tree: one sub-directory per class (sorted, hidden skipped), images found recursively."""
    root = Path(root).resolve()
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {str(root)!r} does not exist")
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    if not classes:
        raise ValueError(f"no class sub-directories in {str(root)!r}; expected root/<class>/<image> (ImageNet train "
                         "layout) or WebDataset .tar shards with --data-format wds")
    items = []
    for label, cls in enumerate(tqdm(classes, desc="listing images", unit="class", disable=len(classes) < 100)):
        files = [os.path.relpath(os.path.join(d, f), root) for d, dirs, names in os.walk(root / cls, followlinks=True)
                 for f in names if _is_image(f) and not f.startswith(".")]
        if not files:
            raise ValueError(f"class folder {str(root / cls)!r} holds no images with extensions {IMG_EXTENSIONS}")
        items += [SourceItem(PurePosixPath(Path(f)).as_posix(), label) for f in sorted(files)]
    return ImageSource("folder", root, classes, items)


def _shard_paths(path: str | os.PathLike | Sequence[str]) -> list[str]:
    if isinstance(path, (list, tuple)):
        paths = [str(p) for p in path]
    elif os.path.isdir(path):
        paths = sorted(glob.glob(os.path.join(str(path), "*.tar")))
    else:
        import braceexpand  # a webdataset dependency

        paths = list(braceexpand.braceexpand(str(path)))
    missing = [p for p in paths if not os.path.isfile(p)]
    if not paths or missing:
        raise FileNotFoundError(f"no WebDataset shards at {path!r}" + (f" (missing: {missing[:3]})" if missing else ""))
    return [os.path.abspath(p) for p in paths]


def _split_member(name: str) -> tuple[str, str]:
    """webdataset's key rule: the key ends at the first dot of the file name."""
    folder, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext.lower()


def _scan_shard(path: str) -> tuple[list[tuple[str, int]], dict[str, tuple[int, int]]]:
    """(image member name, label) for each sample of one shard, in tar order, and the shard's offset index."""
    images: dict[str, str] = {}
    labels: dict[str, int] = {}
    offsets: dict[str, tuple[int, int]] = {}
    with tarfile.open(path, mode="r:") as tar:
        for info in _safe_members(tar, path):
            offsets[info.name] = (info.offset_data, info.size)
            key, ext = _split_member(info.name)
            if "." + ext in IMG_EXTENSIONS and key not in images:  # the whole extension: not "seg.png" masks
                images[key] = info.name
            elif ext == "cls":
                labels[key] = _parse_label(tar.extractfile(info).read(), f"{path}#{info.name}")
    unlabelled = [k for k in images if k not in labels]
    if unlabelled:
        raise ValueError(f"shard {path}: samples without a .cls label, e.g. {unlabelled[:3]}")
    return [(name, labels[key]) for key, name in images.items()], offsets


def _parse_label(data: bytes, where: str) -> int:
    try:
        label = int(data.decode("ascii").strip())
    except (UnicodeDecodeError, ValueError):
        raise ValueError(f"{where}: .cls must hold an ASCII integer, got {data[:20]!r}") from None
    if label < 0:
        raise ValueError(f"{where}: negative label {label}")
    return label


def _wds_classes(root: str, max_label: int) -> list[str]:
    txt, js = os.path.join(root, "classes.txt"), os.path.join(root, "classes.json")
    if os.path.isfile(txt):
        names = [ln.strip() for ln in Path(txt).read_text().splitlines() if ln.strip()]
    elif os.path.isfile(js):
        names = [str(n) for n in json.loads(Path(js).read_text())]
    else:
        return [str(i) for i in range(max_label + 1)]
    if len(names) <= max_label:
        raise ValueError(f"{root}: class-name file lists {len(names)} classes but a .cls label is {max_label}")
    return names


def scan_wds(path: str | os.PathLike | Sequence[str]) -> ImageSource:
    """WebDataset image shards (a directory, brace pattern or list of ``.tar`` files)."""
    shards = _shard_paths(path)
    root = os.path.commonpath([os.path.dirname(p) for p in shards])
    items: list[SourceItem] = []
    index: dict[str, dict[str, tuple[int, int]]] = {}
    for p in tqdm(shards, desc="indexing shards", unit="shard", disable=len(shards) < 16):
        shard = safe_relpath(PurePosixPath(Path(os.path.relpath(p, root))).as_posix())
        if "#" in shard:  # '#' separates shard and member in relpaths
            raise ValueError(f"shard path {p!r} contains '#'; rename the shard")
        samples, index[shard] = _scan_shard(p)
        items += [SourceItem(f"{shard}#{name}", label) for name, label in samples]
    if not items:
        raise ValueError(f"no image samples (<key>.jpg|png + <key>.cls) in shards {shards[:3]}")
    source = ImageSource("wds", root, _wds_classes(root, max(it.label for it in items)), items)
    source._index = index
    return source


def detect_kind(path: str | os.PathLike | Sequence[str]) -> str:
    """``wds`` for tar shards (a list, a brace pattern, a ``.tar`` path or a directory of them), else ``folder``."""
    if isinstance(path, (list, tuple)) or "{" in str(path) or str(path).endswith(".tar"):
        return "wds"
    if os.path.isdir(path) and glob.glob(os.path.join(str(path), "*.tar")):
        return "wds"
    return "folder"


def open_source(path: str | os.PathLike | Sequence[str], kind: str | None = None) -> ImageSource:
    """Discover the images under ``path``: an ImageFolder tree (``folder``) or WebDataset shards (``wds``)."""
    kind = kind or detect_kind(path)
    if kind == "folder":
        return scan_folder(path)
    if kind == "wds":
        return scan_wds(path)
    raise ValueError(f"unknown data format {kind!r}; known: {list(KINDS)}")


# ---------------------------------------------------------------------------------------------- subsets


def select_subset(items: Sequence[SourceItem], shots: int | None = None, fraction: float | None = None,
                  seed: int = 0) -> list[int]:
    """Indices of a seeded per-class subset, sorted by (label, original position).

    One Generator (``default_rng(seed)``) draws one permutation per class, classes in label order; the
    first ``shots`` (all if fewer) or ``max(1, int(n * fraction))`` indices of it are kept.
    """
    if shots is not None and fraction is not None:
        raise ValueError("give shots or fraction, not both")
    if shots is None and fraction is None:
        return list(range(len(items)))
    if shots is not None and shots < 1:
        raise ValueError(f"--shots must be >= 1, got {shots}")
    if fraction is not None and not 0 < fraction <= 1:
        raise ValueError(f"--fraction must be in (0, 1], got {fraction}")
    rng = np.random.default_rng(seed)
    labels = np.asarray([it.label for it in items], dtype=np.int64)
    order = np.argsort(labels, kind="stable")  # grouped by label, original order inside a class
    _, counts = np.unique(labels, return_counts=True)
    chosen: list[int] = []
    for idx in np.split(order, np.cumsum(counts)[:-1]):
        k = min(shots, len(idx)) if shots is not None else max(1, int(len(idx) * fraction))
        chosen += sorted(int(i) for i in idx[rng.permutation(len(idx))[:k]])
    return chosen


def file_list_sha256(items: Iterable[SourceItem]) -> str:
    """SHA-256 of the ``"relpath\\tlabel\\n"`` lines: identifies the exact file list and order."""
    h = hashlib.sha256()
    for it in items:
        h.update(f"{it.relpath}\t{int(it.label)}\n".encode())
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------- manifest


def source_manifest_entry(source: ImageSource, subset_indices: Sequence[int] | None = None) -> dict[str, Any]:
    """The manifest's ``data`` section for the chosen subset of ``source`` (in sample order).

    ``num_files`` counts the whole source; ``sources`` lists the chosen ``[relpath, label]`` pairs.
    """
    chosen = source.items if subset_indices is None else [source.items[i] for i in subset_indices]
    return {"kind": source.kind, "root": source.root, "classes": list(source.classes), "num_files": len(source),
            "sources": [[it.relpath, int(it.label)] for it in chosen], "file_list_sha256": file_list_sha256(chosen)}


def source_from_manifest(manifest: Mapping[str, Any], root: str | os.PathLike | None = None) -> ImageSource:
    """The recorded subset, in row order (sample position ``i`` -> item ``i``).

    Args:
        manifest: a cache manifest (its ``data`` section is used).
        root: where the dataset lives now, if it moved since extraction; default the recorded root.

    Raises:
        CacheError: on unsafe paths or a file list that does not match its recorded hash.
    """
    data = manifest["data"]
    root = str(root) if root is not None else str(data["root"])
    items = [SourceItem(safe_relpath(str(rel)), int(label)) for rel, label in data["sources"]]
    if data["kind"] == "wds":
        for it in items:
            _split_wds_relpath(it.relpath)
    digest = file_list_sha256(items)
    if digest != data.get("file_list_sha256"):
        raise CacheError(f"the cache's file list does not match its recorded hash ({digest} != "
                         f"{data.get('file_list_sha256')}); the manifest is corrupt")
    if not os.path.isdir(root):
        raise FileNotFoundError(f"dataset root {root!r} recorded in the cache does not exist; point at the images "
                                "with --data DIR")
    return ImageSource(str(data["kind"]), root, data["classes"], items)
