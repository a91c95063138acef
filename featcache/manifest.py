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
import hashlib
import json
import re
from pathlib import PurePosixPath
from typing import Any, Mapping

from .errors import CacheError

# 2: per-sample sources and per-view records in bulk ``.npy`` arrays (``data.items``, ``records``); 1 kept them
# inline (``data.sources``) and per unit. Both are read.
FORMAT_VERSION = 2

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

# What a cache may change after it was created: its completion, the files it skipped, the specs of the bulk records
# written when it is finalized (their bytes are pinned by the units' CRC-32s) and, inside the sealed keys, the data
# root (a dataset may move) and the error convert measures per target. Everything else is sealed.
UNSEALED_KEYS = ("complete", "skipped", "seal", "records")

_BLOCK_RE = re.compile(r"^block_(\d+)$")
_SCHEME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


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
        num_files, items{count, arrays}}, subset{shots, fraction, subset_seed},
        views{count, seed, recipe, param_names}, targets{name: {shape, encoding}} (logical),
        arrays{name: {shape, dtype, compressor}} (stored), storage{format, dtype, shard_size, codec, topk},
        num_samples, num_rows, complete, skipped[...], records{name: {sha256, dtype, shape}}.

    A manifest built in memory lists its sources inline (``data.sources``: ``[[relpath, label], ...]``, as
    FORMAT_VERSION 1 caches store them); a writer moves them into the cache's bulk arrays. ``meta`` is the mapping of
    those arrays a reader attaches to the manifest it opened (None otherwise); it travels with copies and pickles.
    """

    meta: Mapping[str, Any] | None = None

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
        out = Manifest(copy.deepcopy(dict(self)))
        out.meta = self.meta
        return out

    def sealed(self) -> "Manifest":
        """A copy carrying its ``seal``: a digest of every sealed entry (see :func:`seal_entries`)."""
        out = Manifest.from_json(self.to_json())  # the digests are of the JSON a backend stores
        out.meta = self.meta
        out["seal"] = seal_entries(out)
        return out

    def seal_digest(self) -> str | None:
        """One digest of the seal (unit markers record it), None for a manifest written before seals."""
        return _digest(self["seal"]) if "seal" in self else None

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


# ------------------------------------------------------------------------------------------------ integrity

def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:16]


def seal_entries(manifest: Mapping[str, Any]) -> dict[str, str]:
    """Digest of every sealed entry: each top-level key, and each key of a top-level mapping (``teacher.final_norm``,
    ``data.classes``, ``targets.block_0``), so an edit is reported by the name of what changed.

    Left out: :data:`UNSEALED_KEYS`, ``data.root`` and ``targets.<name>.measured_error``.
    """
    body = {k: copy.deepcopy(v) for k, v in manifest.items() if k not in UNSEALED_KEYS}
    if isinstance(body.get("data"), dict):
        body["data"].pop("root", None)
    for target in (body.get("targets") or {}).values() if isinstance(body.get("targets"), dict) else ():
        if isinstance(target, dict):
            target.pop("measured_error", None)
    entries: dict[str, str] = {}
    for key, value in body.items():
        if isinstance(value, dict) and value:
            entries.update({f"{key}.{sub}": _digest(v) for sub, v in value.items()})
        else:
            entries[key] = _digest(value)
    return entries


def check_manifest(data: Any, where: str) -> Manifest:
    """Validate a manifest read from ``where`` (a file) before anything trusts it; return it as a Manifest.

    Checked: its schema (types of the keys every reader uses), its own consistency (row count = samples x views,
    block targets = layers, logits width = the teacher's classes, one source per sample), every path in it, and its
    seal: a manifest sealed at creation must still match, so an edited ``layers``, ``num_rows``, ``data.classes``
    or ``teacher.final_norm`` is refused, naming the entries that differ.

    Raises:
        CacheError: one line naming the file, what is wrong and the fix.
    """
    if not isinstance(data, Mapping):
        raise CacheError(f"{where} holds a JSON {type(data).__name__}, not a featcache manifest (a JSON object); the "
                         "cache is damaged: re-extract it with --overwrite")
    m = data if isinstance(data, Manifest) else Manifest(data)
    problems = _schema_problems(m) or _consistency_problems(m) or _path_problems(m)
    if problems:
        raise CacheError(f"{where}: {'; '.join(problems[:3])}; the manifest is damaged or was edited: restore it, "
                         "or re-extract the cache with --overwrite")
    _check_seal(m, where)
    return m


_SCHEMA: dict[str, type | tuple[type, ...]] = {
    "format_version": int, "num_rows": int, "num_samples": int, "layers": list, "img_size": int, "teacher": dict,
    "normalization": dict, "data": dict, "data.root": str, "views": dict, "views.count": int,
    "views.param_names": list, "storage": dict, "storage.format": str, "storage.dtype": str,
    "storage.shard_size": int, "targets": dict, "arrays": dict,
}


def _lookup(m: Mapping[str, Any], path: str) -> Any:
    value: Any = m
    for part in path.split("."):
        value = value.get(part, KeyError) if isinstance(value, Mapping) else KeyError
    return value


def _schema_problems(m: Mapping[str, Any]) -> list[str]:
    out = []
    for path, kind in _SCHEMA.items():
        value = _lookup(m, path)
        if value is KeyError:
            out.append(f"{path} is missing")
        elif not isinstance(value, kind) or kind is int and isinstance(value, bool):
            out.append(f"{path} is {type(value).__name__} {_short(value)}, expected {kind.__name__}")
    return out


def _short(value: Any) -> str:
    text = json.dumps(value, sort_keys=True, default=str)
    return text if len(text) <= 40 else text[:37] + "..."


def _consistency_problems(m: Manifest) -> list[str]:
    out = _count_problems(m)
    for section in ("targets", "arrays"):
        for name, spec in m[section].items():
            shape = spec.get("shape") if isinstance(spec, dict) else None
            if not isinstance(shape, list) or not all(isinstance(s, int) and s >= 0 for s in shape):
                out.append(f"{section}.{name}.shape is {_short(shape)}, expected a list of sizes")
    blocks = sorted(block_index(n) for n in m["targets"] if is_block(n))
    if blocks != sorted(m["layers"]):
        out.append(f"block targets {[block_name(b) for b in blocks]} do not match layers {m['layers']}")
    classes, logits = m["teacher"].get("num_classes"), m["targets"].get("logits")
    logits = logits.get("shape") if isinstance(logits, dict) else None
    if isinstance(classes, int) and logits not in (None, [classes]):
        out.append(f"targets.logits.shape {logits} does not match teacher.num_classes {classes}")
    return out


def _count_problems(m: Manifest) -> list[str]:
    out = []
    rows, samples, views, shard = m["num_rows"], m["num_samples"], m["views"]["count"], m["storage"]["shard_size"]
    if m["format_version"] > FORMAT_VERSION:
        out.append(f"format_version {m['format_version']} is newer than this featcache reads ({FORMAT_VERSION}); "
                   "upgrade featcache")
    if views < 1 or shard < 1 or samples < 0:
        out.append(f"views.count {views}, storage.shard_size {shard} and num_samples {samples} must be positive")
    elif rows != samples * views:
        out.append(f"num_rows {rows} is not num_samples {samples} x views.count {views}")
    if "num_units" in m and shard >= 1 and m["num_units"] != m.num_units:
        out.append(f"num_units {m['num_units']} does not match num_rows / storage.shard_size ({m.num_units})")
    if not isinstance(m.get("complete", False), bool):
        out.append(f"complete is {_short(m['complete'])}, expected true or false")
    sources = m["data"].get("sources")
    if sources is not None and (not isinstance(sources, list) or len(sources) != samples):
        out.append(f"data.sources lists {len(sources) if isinstance(sources, list) else _short(sources)} images for "
                   f"num_samples {samples}")
    items = m["data"].get("items")
    if items is not None and not (isinstance(items, dict) and items.get("count") == samples and
                                  isinstance(items.get("arrays"), dict)):
        out.append(f"data.items {_short(items)} does not describe num_samples {samples} images")
    return out


def _path_problems(m: Manifest) -> list[str]:
    """``data.root`` must be an absolute local path, ``teacher.checkpoint`` a local one; every source a safe relative
    path with a label in range."""
    root, checkpoint = m["data"]["root"], m["teacher"].get("checkpoint")
    if _SCHEME_RE.match(root):
        return [f"data.root {root!r} is a URL; featcache reads local paths only"]
    if "\x00" in root or not PurePosixPath(root).is_absolute():
        return [f"data.root {root!r} is not an absolute path"]
    if checkpoint is not None and (not isinstance(checkpoint, str) or "\x00" in checkpoint or
                                   _SCHEME_RE.match(checkpoint)):
        return [f"teacher.checkpoint {_short(checkpoint)} is not a local file path"]
    if not isinstance(m.get("teacher_kwargs", {}), dict):
        return [f"teacher_kwargs is {_short(m['teacher_kwargs'])}, expected an object of timm keyword arguments"]
    classes = m["data"].get("classes")
    num_classes = len(classes) if isinstance(classes, list) else None
    for i, entry in enumerate(m["data"].get("sources") or []):
        problem = _source_problem(entry, num_classes)
        if problem:
            return [f"data.sources[{i}] {_short(entry)}: {problem}"]
    return []


def _source_problem(entry: Any, num_classes: int | None) -> str | None:
    if not (isinstance(entry, list) and len(entry) == 2 and isinstance(entry[0], str) and isinstance(entry[1], int)):
        return "expected [relative path, label]"
    try:
        safe_relpath(entry[0])
    except CacheError as err:
        return str(err)
    if num_classes is not None and not 0 <= entry[1] < num_classes:
        return f"label {entry[1]} is outside the {num_classes} classes"
    return None


def _check_seal(m: Manifest, where: str) -> None:
    seal = m.get("seal")
    if seal is None:  # written before featcache sealed its manifests: the checks above are all there is
        return
    now = seal_entries(m)
    differ = sorted(k for k in set(now) | set(seal if isinstance(seal, dict) else {}) if
                    not isinstance(seal, dict) or seal.get(k) != now.get(k))
    if differ:
        raise CacheError(f"{where} was edited after extraction: {', '.join(differ[:8])}"
                         f"{' ...' if len(differ) > 8 else ''} differ from what the cache was written with; restore "
                         "the original manifest, or re-extract the cache with --overwrite")
