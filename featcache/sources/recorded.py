"""A source as a cache manifest records it (its ``data`` section), and back."""
from __future__ import annotations

import os
from typing import Any, Mapping, Sequence

from ..errors import CacheError, MissingFileError
from ..manifest import safe_relpath
from .base import ImageSource, SourceItem, split_wds_relpath
from .hf import check_unchanged
from .packed import PackedItems, check_packed
from .subsets import file_list_sha256
from .urls import check_staged, is_url_spec

#: Sections of ``data`` a source may add (``ImageSource.recorded``): hf columns and files, staged shard copies.
RECORDED_KEYS = ("hf", "staged")


def source_manifest_entry(source: ImageSource, subset_indices: Sequence[int] | None = None) -> dict[str, Any]:
    """The manifest's ``data`` section for the chosen subset of ``source`` (in sample order).

    ``num_files`` counts the whole source; ``sources`` lists the chosen ``[relpath, label]`` pairs.
    """
    chosen = source.items if subset_indices is None else [source.items[i] for i in subset_indices]
    return {"kind": source.kind, "root": source.root, "classes": list(source.classes), "num_files": len(source),
            "sources": [[it.relpath, int(it.label)] for it in chosen], "file_list_sha256": file_list_sha256(chosen),
            **{k: source.recorded[k] for k in RECORDED_KEYS if k in source.recorded}}


def source_from_manifest(manifest: Mapping[str, Any], root: str | os.PathLike | None = None) -> ImageSource:
    """The recorded subset, in row order (sample position ``i`` -> item ``i``).

    Args:
        manifest: a cache manifest (its ``data`` section is used).
        root: where the dataset lives now, if it moved since extraction; default the recorded root. For shards
            staged from URLs, the URL spec typed again stages them anew into the recorded directory.

    A cache in FORMAT_VERSION 2 keeps the list in bulk arrays (``manifest.meta``, attached by the reader that opened
    it): their SHA-256s, sealed in the manifest, are checked when they are read, and every path is checked in one
    vectorised pass here (each again when its file is opened). A FORMAT_VERSION 1 manifest lists it inline.

    Raises:
        CacheError: on unsafe paths or a file list that does not match its recorded hash.
        SourceError: when the dataset files or staged shards changed since extraction.
    """
    data = manifest["data"]
    spec = str(root) if root is not None and "staged" in data and is_url_spec(str(root)) else None
    root = str(data["root"]) if root is None or spec is not None else str(root)
    items = _inline_items(data) if "sources" in data else _packed_items(manifest)
    if spec is None:
        _check_root(root, staged="staged" in data)
    source = ImageSource(str(data["kind"]), root, data["classes"], items,
                         recorded={k: data[k] for k in RECORDED_KEYS if k in data})
    if "staged" in data:
        check_staged(source, spec)
    if data["kind"] == "hf":
        check_unchanged(source)
    return source


def _packed_items(manifest: Mapping[str, Any]) -> PackedItems:
    meta = getattr(manifest, "meta", None)
    if meta is None:
        raise CacheError("this manifest keeps its file list in the cache's arrays; open the cache with open_reader and "
                         "pass reader.manifest")
    data = manifest["data"]
    arrays = {name: meta[name] for name in data["items"]["arrays"]}
    check_packed(arrays, int(data["items"]["count"]), len(data["classes"]), b"/#" if data["kind"] != "folder" else b"/")
    return PackedItems(meta)


def _inline_items(data: Mapping[str, Any]) -> list[SourceItem]:
    items = [SourceItem(safe_relpath(str(rel)), int(label)) for rel, label in data["sources"]]
    if data["kind"] == "wds":
        for it in items:
            split_wds_relpath(it.relpath)
    digest = file_list_sha256(items)
    if digest != data.get("file_list_sha256"):
        raise CacheError(f"the cache's file list does not match its recorded hash ({digest} != "
                         f"{data.get('file_list_sha256')}); the manifest is corrupt")
    return items


def _check_root(root: str, staged: bool) -> None:
    if os.path.isdir(root):
        return
    if staged:
        raise MissingFileError(f"the directory {root!r} the shards were staged in does not exist; pass the shards' "
                               "URL spec again with --data (they are staged anew and checked), or --data DIR where "
                               "the staged copies are now")
    raise MissingFileError(f"dataset root {root!r} recorded in the cache does not exist; point at the images "
                           "with --data DIR")
