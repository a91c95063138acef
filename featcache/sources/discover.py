"""Which kind of source a path is, and the one entry point that discovers it."""
from __future__ import annotations

import glob
import os
from typing import Sequence

from ..errors import ConfigError
from .base import KINDS, ImageSource
from .folder import scan_folder
from .hf import is_hf_spec, scan_hf
from .urls import is_url_spec, scan_staged
from .wds import is_shard_name, scan_wds


def detect_kind(path: str | os.PathLike | Sequence[str]) -> str:
    """``hf`` for a ``save_to_disk`` directory or parquet files; ``wds`` for tar shards (a list, a brace pattern, a
    URL spec, a tar path or a directory holding tars); else ``folder``.

    Compressed tars (``.tar.gz``...) count as shards, so that they are refused with the reason rather than taken
    for an ImageFolder without classes.
    """
    if is_hf_spec(path):
        return "hf"
    if isinstance(path, (list, tuple)) or "{" in str(path) or is_shard_name(str(path)) or is_url_spec(path):
        return "wds"
    if os.path.isdir(path) and any(is_shard_name(p) for p in glob.glob(os.path.join(glob.escape(str(path)), "*"))):
        return "wds"
    return "folder"


def open_source(path: str | os.PathLike | Sequence[str], kind: str | None = None, *,
                stage_dir: str | os.PathLike | None = None, image_column: str = "image",
                label_column: str = "label") -> ImageSource:
    """Discover the images under ``path``: an ImageFolder tree (``folder``), WebDataset shards (``wds``: local, or
    named by URL and first copied into ``stage_dir``) or a Hugging Face dataset (``hf``: its image and label
    columns)."""
    kind = kind or detect_kind(path)
    if kind == "folder":
        return scan_folder(path)
    if kind == "wds":
        return scan_staged(path, stage_dir) if is_url_spec(path) else scan_wds(path)
    if kind == "hf":
        return scan_hf(path, image_column, label_column)
    raise ConfigError(f"unknown data format {kind!r}; known: {list(KINDS)}")


def open_local_source(path: str | os.PathLike, flag: str) -> ImageSource:
    """:func:`open_source` for commands that read images in place (``train --val``, ``probe``): shards named by URL
    are refused, since only ``extract`` stages them (it copies them once and records their hashes)."""
    if is_url_spec(path):
        raise ConfigError(f"{flag} {str(path)!r} names shards by URL, which this command does not copy: stage them "
                          "with `featcache extract --data-stage-dir DIR` (or copy them yourself) and pass DIR")
    return open_source(path)
