"""The cache schema: what a cache says about itself, whatever backend stores it.

A cache holds, for every stored view (one *row*), a set of named target arrays and a set of per-view
records. Rows are ordered ``row = sample_position * views + view`` and grouped into *units* of
``shard_size`` consecutive rows: a unit is what one writer writes in one go (one Zarr shard, one tar
shard, one HDF5 chunk range) and what resume counts.

Target arrays (names are the API, shared by all backends):
    ``block_{i}``  teacher block ``i`` output, pre final norm, prefix tokens kept: [rows, tokens, dim]
    ``logits``     teacher logits: [rows, classes] (stored as ``logits__topk_values``/``logits__topk_indices``
                   under a top-k encoding)

Per-view records (small, read whole): see :data:`RECORD_DTYPES`; ``params`` column names are in
``manifest["views"]["param_names"]``, ``fingerprint`` is the CRC-32 of the replayed uint8 view, ``valid`` is 0 for
skipped images. docs/FORMAT.md documents every key.
"""
from __future__ import annotations

import copy
import json
import re
from pathlib import PurePosixPath
from typing import Any, Mapping

from .errors import CacheError

FORMAT_VERSION = 1

RECORD_DTYPES: dict[str, str] = {
    "sample": "int64",
    "view": "int32",
    "label": "int64",
    "seed": "int64",
    "params": "float64",
    "fingerprint": "uint32",
    "valid": "uint8",
}

# Keys of the manifest that define *what* is cached. Re-running extraction with a different value for
# any of them against an existing cache is refused, with the differing keys named.
IDENTITY_KEYS = ("teacher", "layers", "img_size", "normalization", "data", "subset", "views", "storage")

_BLOCK_RE = re.compile(r"^block_(\d+)$")


def block_name(index: int) -> str:
    """Name of the target array holding teacher block ``index``'s output."""
    return f"block_{index}"


def block_index(name: str) -> int | None:
    """The block index a target name holds (``block_11`` -> 11), or None for other targets (``logits``)."""
    match = _BLOCK_RE.match(name)
    return int(match.group(1)) if match else None


def is_block(name: str) -> bool:
    """True for ``block_{i}`` feature targets."""
    return block_index(name) is not None


class Manifest(dict):
    """The cache's self-description: a JSON-serialisable dict with a few typed accessors.

    Kept as a plain dict so every backend stores it the same way (Zarr group attributes, a JSON file
    beside tar shards, an HDF5 attribute holding JSON) and so users can read it without featcache.

    Expected top-level keys (see docs/FORMAT.md for the full list):
        format_version, featcache_version, teacher{name, timm_name, pretrained_tag, checkpoint,
        weights_sha256, num_classes, embed_dim, num_blocks, num_prefix_tokens, patch_size, grid_size,
        final_norm{type, eps, weight, bias}}, versions{timm, torch, torchvision, ...}, layers[int],
        img_size, normalization{mean, std, interpolation}, data{kind, root, file_list_sha256, classes,
        num_files, sources[[relpath, label], ...]}, subset{shots, fraction, subset_seed},
        views{count, seed, recipe, param_names}, targets{name: {shape, encoding}} (logical),
        arrays{name: {shape, dtype, compressor}} (stored), storage{format, dtype, shard_size, codec, topk},
        num_samples, num_rows, complete, skipped[...].
    """

    @property
    def layers(self) -> list[int]:
        return list(self["layers"])

    @property
    def num_rows(self) -> int:
        return int(self["num_rows"])

    @property
    def views_per_sample(self) -> int:
        return int(self["views"]["count"])

    @property
    def shard_size(self) -> int:
        return int(self["storage"]["shard_size"])

    @property
    def num_units(self) -> int:
        return -(-self.num_rows // self.shard_size)

    @property
    def target_names(self) -> list[str]:
        return list(self["targets"])

    @property
    def complete(self) -> bool:
        return bool(self.get("complete", False))

    def unit_rows(self, unit: int) -> range:
        start = unit * self.shard_size
        return range(start, min(start + self.shard_size, self.num_rows))

    def unit_of(self, row: int) -> int:
        """The unit that stores ``row``."""
        return row // self.shard_size

    def to_json(self) -> str:
        return json.dumps(self, sort_keys=True, indent=1)

    @classmethod
    def from_json(cls, text: str) -> "Manifest":
        return cls(json.loads(text))

    def copy(self) -> "Manifest":
        return Manifest(copy.deepcopy(dict(self)))

    def identity(self) -> dict[str, Any]:
        """The keys that define what is cached. The data root is left out: the file-list hash already pins the
        images, and a dataset that moved (or is mounted elsewhere) is still the same dataset."""
        ident = {k: copy.deepcopy(self.get(k)) for k in IDENTITY_KEYS}
        if isinstance(ident.get("data"), dict):
            ident["data"].pop("root", None)
        return ident


def diff_keys(a: Mapping[str, Any], b: Mapping[str, Any], prefix: str = "") -> list[str]:
    """Dotted paths of the keys whose values differ between two nested mappings."""
    out: list[str] = []
    for key in sorted(set(a) | set(b)):
        path = f"{prefix}{key}"
        va, vb = a.get(key), b.get(key)
        if isinstance(va, Mapping) and isinstance(vb, Mapping):
            out += diff_keys(va, vb, prefix=path + ".")
        elif va != vb:
            out.append(path)
    return out


def safe_relpath(path: str) -> str:
    """Validate a relative path that came from a manifest or a shard; return it unchanged.

    Raises:
        CacheError: for absolute paths, ``..`` components, NUL bytes or backslashes.
    """
    p = PurePosixPath(path)
    if not path or "\x00" in path or "\\" in path or p.is_absolute() or ".." in p.parts:
        raise CacheError(f"unsafe path {path!r} in cache or shard: paths must be relative and stay inside the root")
    return path
