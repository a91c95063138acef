"""Which kind of source a path is, and the one entry point that discovers it."""
from __future__ import annotations

import glob
import os
from typing import Sequence

from ..errors import ConfigError
from .base import KINDS, ImageSource
from .folder import scan_folder
from .wds import is_shard_name, scan_wds


def detect_kind(path: str | os.PathLike | Sequence[str]) -> str:
    """``wds`` for tar shards (a list, a brace pattern, a tar path or a directory holding tars), else ``folder``.

    Compressed tars (``.tar.gz``...) count as shards, so that they are refused with the reason rather than taken
    for an ImageFolder without classes.
    """
    if isinstance(path, (list, tuple)) or "{" in str(path) or is_shard_name(str(path)):
        return "wds"
    if os.path.isdir(path) and any(is_shard_name(p) for p in glob.glob(os.path.join(glob.escape(str(path)), "*"))):
        return "wds"
    return "folder"


def open_source(path: str | os.PathLike | Sequence[str], kind: str | None = None) -> ImageSource:
    """Discover the images under ``path``: an ImageFolder tree (``folder``) or WebDataset shards (``wds``)."""
    kind = kind or detect_kind(path)
    if kind == "folder":
        return scan_folder(path)
    if kind == "wds":
        return scan_wds(path)
    raise ConfigError(f"unknown data format {kind!r}; known: {list(KINDS)}")
