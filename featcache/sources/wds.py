"""WebDataset image shards: ``<key>.<image ext>`` + ``<key>.cls`` samples, every member accounted for."""
from __future__ import annotations

import json
import os
from pathlib import Path, PurePosixPath
from typing import Sequence

from tqdm import tqdm

from ..errors import ConfigError, MissingFileError, SourceError
from ..manifest import safe_relpath
from .base import IMG_EXTENSIONS, ImageSource, SourceItem, report_ignored
from .tars import compressed_refusal, compression_of, read_members

CLASS_FILES = ("classes.txt", "classes.json")
MAX_LABEL_BYTES = 32


def is_shard_name(name: str) -> bool:
    """A plain or compressed tar name (compressed ones are found so that they can be refused, not skipped)."""
    return name.lower().endswith(".tar") or compression_of(name) is not None


def shard_paths(path: str | os.PathLike | Sequence[str]) -> tuple[list[str], list[tuple[str, str]]]:
    """Absolute shard paths (a directory's ``*.tar``, a brace pattern or a list) and the directory entries left out.

    Raises:
        SourceError: for a compressed shard among them.
        MissingFileError: when there are no shards or some are missing.
    """
    ignored: list[tuple[str, str]] = []
    if isinstance(path, (list, tuple)):
        paths = [str(p) for p in path]
    elif os.path.isdir(path):
        paths, ignored = _directory_shards(str(path))
    else:
        paths = expand_spec(path)
    paths = [os.path.abspath(p) for p in paths]
    missing = [p for p in paths if not os.path.isfile(p)]
    if not paths or missing:
        raise MissingFileError(f"no WebDataset shards at {path!r}" + (f" (missing: {missing[:3]})" if missing else ""))
    for p in paths:
        if kind := compression_of(p):
            raise compressed_refusal(p, kind)
    return paths, ignored


def expand_spec(spec: str | os.PathLike | Sequence[str]) -> list[str]:
    """The entries of a shard spec: each string brace-expanded (webdataset's expansion), in order.

    Raises:
        ConfigError: for unbalanced braces.
    """
    import braceexpand  # a webdataset dependency

    specs = [str(s) for s in spec] if isinstance(spec, (list, tuple)) else [str(spec)]
    try:
        return [entry for s in specs for entry in braceexpand.braceexpand(s)]
    except braceexpand.UnbalancedBracesError:
        raise ConfigError(f"shard spec {spec!r} has unbalanced braces; write e.g. shards/train-{{000000..000099}}.tar"
                          ) from None


def _directory_shards(folder: str) -> tuple[list[str], list[tuple[str, str]]]:
    names = sorted(os.listdir(folder))
    shards = [os.path.join(folder, n) for n in names if is_shard_name(n)]
    ignored = [(n, "not a .tar shard") for n in names if not is_shard_name(n) and n not in CLASS_FILES]
    return shards, ignored


def split_member(name: str) -> tuple[str, str]:
    """webdataset's key rule: the key ends at the first dot of the file name."""
    folder, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext.lower()


def scan_shard(path: str) -> tuple[list[tuple[str, int]], dict[str, tuple[int, int]], list[tuple[str, str]]]:
    """(image member, label) per sample of one shard in tar order, its offset index, and the members not used."""
    files, ignored = read_members(path)
    images: dict[str, str] = {}
    labels: dict[str, int] = {}
    with open(path, "rb") as fh:
        for info in files:
            key, ext = split_member(info.name)
            if "." + ext in IMG_EXTENSIONS and key not in images:  # the whole extension: not "seg.png" masks
                images[key] = info.name
            elif "." + ext in IMG_EXTENSIONS:
                ignored.append((info.name, "a second image of its sample (the first one is used)"))
            elif ext == "cls":
                labels[key] = _read_label(fh, info.offset_data, info.size, f"{path}#{info.name}")
            else:
                ignored.append((info.name, f"neither a sample image ({'/'.join(IMG_EXTENSIONS)}) nor a .cls label"))
    unlabelled = [k for k in images if k not in labels]
    if unlabelled:
        raise SourceError(f"shard {path}: samples without a .cls label, e.g. {unlabelled[:3]}")
    ignored += [(f"{k}.cls", "a .cls label without an image") for k in labels if k not in images]
    offsets = {info.name: (info.offset_data, info.size) for info in files}
    return [(name, labels[key]) for key, name in images.items()], offsets, ignored


def _read_label(fh, offset: int, size: int, where: str) -> int:
    if size > MAX_LABEL_BYTES:
        raise SourceError(f"{where}: .cls holds {size} bytes; it must hold one ASCII integer")
    fh.seek(offset)
    return parse_label(fh.read(size), where)


def parse_label(data: bytes, where: str) -> int:
    try:
        label = int(data.decode("ascii").strip())
    except (UnicodeDecodeError, ValueError):
        raise SourceError(f"{where}: .cls must hold an ASCII integer, got {data[:20]!r}") from None
    if label < 0:
        raise SourceError(f"{where}: negative label {label}")
    return label


def wds_classes(root: str, max_label: int) -> list[str]:
    """Class names from ``classes.txt`` / ``classes.json`` beside the shards, else ``"0" .. "<max label>"``."""
    txt, js = os.path.join(root, "classes.txt"), os.path.join(root, "classes.json")
    if os.path.isfile(txt):
        names = [ln.strip() for ln in Path(txt).read_text().splitlines() if ln.strip()]
    elif os.path.isfile(js):
        names = _json_names(js)
    else:
        return [str(i) for i in range(max_label + 1)]
    if len(names) <= max_label:
        raise SourceError(f"{root}: class-name file lists {len(names)} classes but a .cls label is {max_label}")
    return names


def _json_names(path: str) -> list[str]:
    try:
        names = json.loads(Path(path).read_text())
    except ValueError as err:
        raise SourceError(f"{path} is not valid JSON ({err}); it must hold a list of class names") from None
    if not isinstance(names, list):
        raise SourceError(f"{path} holds a {type(names).__name__}; it must hold a list of class names")
    return [str(n) for n in names]


def scan_wds(path: str | os.PathLike | Sequence[str]) -> ImageSource:
    """WebDataset image shards (a directory, brace pattern or list of ``.tar`` files)."""
    shards, ignored = shard_paths(path)
    root = os.path.commonpath([os.path.dirname(p) for p in shards])
    items: list[SourceItem] = []
    index: dict[str, dict[str, tuple[int, int]]] = {}
    for p in tqdm(shards, desc="indexing shards", unit="shard", disable=len(shards) < 16):
        shard = safe_relpath(PurePosixPath(Path(os.path.relpath(p, root))).as_posix())
        if "#" in shard:  # '#' separates shard and member in relpaths
            raise SourceError(f"shard path {p!r} contains '#'; rename the shard")
        samples, index[shard], dropped = scan_shard(p)
        items += [SourceItem(f"{shard}#{name}", label) for name, label in samples]
        ignored += [(f"{shard}#{name}", reason) for name, reason in dropped]
    if not items:
        raise SourceError(f"no image samples (<key>.jpg|png + <key>.cls) in shards {shards[:3]}")
    report_ignored(root, ignored)
    source = ImageSource("wds", root, wds_classes(root, max(it.label for it in items)), items, ignored)
    source._index = index
    return source
