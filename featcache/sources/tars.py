"""Tar shards read from their headers alone, with every member accounted for.

A member is used (a regular file, read later at its byte offset), ignored with a reason (links, sparse files,
devices; never followed), or structure (directories). The headers are checked as a whole, because ``tarfile``
stops without a word at a truncated or corrupt header after the first one: every member's data must lie inside
the file, and the last header must be followed by tar's end-of-archive block of zeros with nothing but zeros
after it (a concatenated second archive would otherwise be dropped). Compressed shards are refused: members are
read at their offsets, which only an uncompressed tar has.
"""
from __future__ import annotations

import os
import tarfile

from ..errors import CacheError, SourceError
from ..manifest import safe_relpath

BLOCK = tarfile.BLOCKSIZE
_SUFFIX_KIND = {".tar.gz": "gzip", ".tgz": "gzip", ".tar.bz2": "bzip2", ".tbz2": "bzip2", ".tar.xz": "xz",
                ".txz": "xz", ".tar.zst": "zstd", ".tar.zstd": "zstd"}
COMPRESSED_SUFFIXES = tuple(_SUFFIX_KIND)
_MAGIC = {b"\x1f\x8b": "gzip", b"BZh": "bzip2", b"\xfd7zXZ\x00": "xz", b"\x28\xb5\x2f\xfd": "zstd"}
_FIX = "re-copy or re-create the shard"


def compressed_refusal(path: str, kind: str) -> SourceError:
    """The error for a compressed shard, with the command that decompresses it."""
    suffix = next((s for s in COMPRESSED_SUFFIXES if path.lower().endswith(s)), None)
    if suffix:
        named, command = "", f"{kind} -dc {path} > {path[:-len(suffix)]}.tar"
    else:
        ext = {"gzip": "gz", "bzip2": "bz2", "xz": "xz", "zstd": "zst"}[kind]
        named, command = ", though it is named like a plain tar", f"mv {path} {path}.{ext} && {kind} -d {path}.{ext}"
    return SourceError(f"shard {path} is {kind}-compressed{named}; featcache reads members at their byte offsets, "
                       f"so shards must be uncompressed tar files: decompress it (`{command}`)")


def compression_of(path: str) -> str | None:
    """The compression a shard's name says (``.tar.gz``...), else None."""
    return next((kind for suffix, kind in _SUFFIX_KIND.items() if path.lower().endswith(suffix)), None)


def _magic_compression(path: str) -> str | None:
    """The compression a file's first bytes show; asked only of a file that tarfile cannot read (a plain tar's
    first bytes are a member name, which may begin like a magic number)."""
    with open(path, "rb") as fh:
        head = fh.read(8)
    return next((kind for magic, kind in _MAGIC.items() if head.startswith(magic)), None)


def read_members(path: str) -> tuple[list[tarfile.TarInfo], list[tuple[str, str]]]:
    """The regular-file members of shard ``path`` in tar order, and ``(member, reason)`` for the other members.

    Raises:
        SourceError: for a compressed, truncated or corrupt shard (naming it and the byte where it breaks).
        CacheError: for a member name that is absolute or climbs out with ``..``.
    """
    if kind := compression_of(path):
        raise compressed_refusal(path, kind)
    try:
        infos, end = headers(path)
        check_complete(path, infos, end)
    except tarfile.TarError as err:  # from the first header: not a tar at all
        if kind := _magic_compression(path):
            raise compressed_refusal(path, kind) from None
        raise SourceError(f"shard {path} cannot be read as a tar file ({err}); {_FIX}") from None
    except OSError as err:
        raise SourceError(f"cannot read shard {path}: {err.strerror or err}") from None
    files, ignored = [], []
    for info in infos:
        reason = member_reason(info, path)
        if reason is None:
            files.append(info)
        elif reason:
            ignored.append((info.name, reason))
    return files, ignored


def member_reason(info: tarfile.TarInfo, path: str) -> str | None:
    """None for a regular file, ``""`` for a directory (structure), else why the member is not read."""
    try:
        safe_relpath(info.name)
    except CacheError as err:
        raise CacheError(f"shard {path}: {err}") from None
    if info.issparse():
        return "sparse member (its bytes are not stored in one piece)"
    if info.isfile():
        return None
    if info.isdir():
        return ""
    if info.issym() or info.islnk():
        return f"link member ({'symlink' if info.issym() else 'hard link'}), not followed"
    return "not a regular file (device or FIFO member)"


def headers(path: str) -> tuple[list[tarfile.TarInfo], int]:
    """Every member header of a shard and the byte where the end-of-archive block should start.

    Raises:
        tarfile.TarError: when the first header is not a tar header.
        SourceError: when a later header cannot be read (truncated or corrupt), naming the byte and the member.
    """
    with tarfile.open(path, mode="r:") as tar:
        infos: list[tarfile.TarInfo] = []
        try:
            for info in tar:
                infos.append(info)
        except tarfile.TarError as err:
            check_data_inside(path, infos)  # the member tarfile was skipping over may be the one cut short
            raise SourceError(f"shard {path} has a truncated or corrupt header at byte {tar.offset}{_after(infos)} "
                              f"({err}): members after it would be lost; {_FIX}") from None
        return infos, tar.offset


def _after(infos: list[tarfile.TarInfo]) -> str:
    return f" (after member {infos[-1].name!r})" if infos else ""


def check_data_inside(path: str, infos: list[tarfile.TarInfo]) -> None:
    """Every regular member's data lies inside the file."""
    size = os.path.getsize(path)
    for info in infos:
        if info.isfile() and info.offset_data + info.size > size:
            raise SourceError(f"shard {path} is truncated: member {info.name!r} needs bytes up to "
                              f"{info.offset_data + info.size}, the file has {size}; {_FIX}")


def check_complete(path: str, infos: list[tarfile.TarInfo], end: int) -> None:
    """Every member's data inside the file, then an end-of-archive block and only zeros up to the end of the file."""
    check_data_inside(path, infos)
    with open(path, "rb") as fh:
        fh.seek(end)
        marker = fh.read(BLOCK)
        if marker != bytes(BLOCK):
            what = "ends without tar's end-of-archive block" if not marker else "has a truncated or corrupt header"
            raise SourceError(f"shard {path} {what} at byte {end}{_after(infos)}: members after it would be lost; "
                              f"{_FIX}")
        _check_zeros(fh, path, end + BLOCK)


def _check_zeros(fh, path: str, start: int) -> None:
    while chunk := fh.read(1 << 20):
        if chunk.strip(b"\0"):
            raise SourceError(f"shard {path} holds data after its end-of-archive block (byte {start}), e.g. a second "
                              "archive appended to it, which tarfile would drop silently; re-create the shard")


def index_shard(path: str) -> dict[str, tuple[int, int]]:
    """Member name -> (data offset, size) of the regular files of a shard, from its checked headers."""
    files, _ = read_members(path)
    return {info.name: (info.offset_data, info.size) for info in files}
