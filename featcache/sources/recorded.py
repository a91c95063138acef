"""A source as a cache manifest records it (its ``data`` section), and back."""
from __future__ import annotations

import os
from typing import Any, Mapping, Sequence

from ..errors import CacheError, MissingFileError
from ..manifest import safe_relpath
from .base import ImageSource, SourceItem, split_wds_relpath
from .subsets import file_list_sha256


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
            split_wds_relpath(it.relpath)
    digest = file_list_sha256(items)
    if digest != data.get("file_list_sha256"):
        raise CacheError(f"the cache's file list does not match its recorded hash ({digest} != "
                         f"{data.get('file_list_sha256')}); the manifest is corrupt")
    if not os.path.isdir(root):
        raise MissingFileError(f"dataset root {root!r} recorded in the cache does not exist; point at the images "
                               "with --data DIR")
    return ImageSource(str(data["kind"]), root, data["classes"], items)
