"""Lossless compressors: the part of ``--codec`` that backends apply to stored bytes, transparently to readers.

A compressor spec is a small dict recorded per stored array (``manifest["arrays"][name]["compressor"]``):
    ``{"name": "none"}``                                                  stored as is.
    ``{"name": "zstd", "level": L}``              from ``zstd[:L]``        Zstandard (default level 3).
    ``{"name": "blosc", "cname": "zstd", "clevel": L, "shuffle": S}``  from ``blosc-zstd[:L][:S]``  Blosc(zstd) with
        byte (``shuffle``, the default), bit (``bitshuffle``) or no (``noshuffle``) shuffle; default level 5.
Each backend maps the spec to its own machinery (zarr v3 codecs, numcodecs per tar member, HDF5 filters). The lossy
part of ``--codec`` (``bitround:N``, ``int8``) changes what is stored, not how: see :mod:`featcache.stores.encodings`.
"""
from __future__ import annotations

from typing import Any, Mapping

from ..errors import ConfigError

SHUFFLES = ("shuffle", "bitshuffle", "noshuffle")
NONE: dict[str, Any] = {"name": "none"}
LOSSLESS_FORMS = "none, zstd[:level] or blosc-zstd[:level][:shuffle|bitshuffle|noshuffle]"


def parse_lossless(part: str) -> dict[str, Any]:
    """One lossless ``--codec`` part (``zstd:5``) -> its compressor spec.

    Raises:
        ConfigError: naming the part and the accepted forms.
    """
    name, *args = part.split(":")
    try:
        if name == "none" and not args:
            return dict(NONE)
        if name == "zstd" and len(args) <= 1:
            return {"name": "zstd", "level": int(args[0]) if args else 3}
        if name == "blosc-zstd" and len(args) <= 2:
            return _parse_blosc(args)
    except ValueError:
        pass
    raise ConfigError(f"bad lossless codec {part!r}; use {LOSSLESS_FORMS}")


def lossless_label(spec: Mapping[str, Any] | None) -> str:
    """The ``--codec`` part that :func:`parse_lossless` turns into ``spec`` (``blosc-zstd:5:bitshuffle``)."""
    spec = spec or NONE
    if spec["name"] == "zstd":
        return f"zstd:{spec['level']}"
    if spec["name"] == "blosc":
        return f"blosc-{spec['cname']}:{spec['clevel']}:{spec['shuffle']}"
    return str(spec["name"])


def _parse_blosc(args: list[str]) -> dict[str, Any]:
    # Level and shuffle may come in either order: blosc-zstd:bitshuffle and blosc-zstd:3:bitshuffle are both fine.
    level = next((int(a) for a in args if a.lstrip("-").isdigit()), 5)
    shuffle = next((a for a in args if not a.lstrip("-").isdigit()), "shuffle")
    if shuffle not in SHUFFLES:
        raise ValueError(shuffle)
    return {"name": "blosc", "cname": "zstd", "clevel": level, "shuffle": shuffle}


def numcodecs_compressor(spec: Mapping[str, Any] | None, itemsize: int | None = None) -> Any:
    """A numcodecs codec for a compressor spec (``None`` for ``{"name": "none"}``).

    Used by the wds backend per tar member and usable by any backend that compresses bytes itself.

    Args:
        spec: the compressor spec.
        itemsize: the element size Blosc shuffles by (bytes otherwise count as 1-byte elements and shuffling does
            nothing).

    Raises:
        ConfigError: for a spec naming another compressor.
    """
    import numcodecs

    spec = dict(spec or NONE)
    if spec["name"] == "none":
        return None
    if spec["name"] == "zstd":
        return numcodecs.Zstd(level=int(spec.get("level", 3)))
    if spec["name"] == "blosc":
        shuffle = {"noshuffle": numcodecs.Blosc.NOSHUFFLE, "shuffle": numcodecs.Blosc.SHUFFLE,
                   "bitshuffle": numcodecs.Blosc.BITSHUFFLE}[spec.get("shuffle", "shuffle")]
        return numcodecs.Blosc(cname=spec.get("cname", "zstd"), clevel=int(spec.get("clevel", 5)), shuffle=shuffle,
                               typesize=itemsize)
    raise ConfigError(f"unknown compressor {spec!r}; expected none, zstd or blosc")
