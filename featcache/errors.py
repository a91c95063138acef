"""Every error featcache raises for a user to act on derives from :class:`FeatcacheError`.

The CLI catches this base alone and prints its message in one line; anything else is a bug and keeps its
traceback (the pattern of webdataset's ``single_node_only``: fail where it is detected and name the fix).
Each class also derives from the builtin a caller would expect (``ValueError`` for a bad value, ``KeyError`` for
an unknown name), so library users can keep catching those.
"""
from __future__ import annotations


class FeatcacheError(Exception):
    """Base of every error whose message tells the user what to fix."""

    def __str__(self) -> str:  # KeyError would quote its message; every featcache error reads as plain text
        return str(self.args[0]) if self.args else ""


class ConfigError(FeatcacheError, ValueError):
    """A config value, option, recipe or spec is invalid; the message names the value and the fix."""


class UnknownNameError(FeatcacheError, KeyError):
    """A registry lookup (method, store format, view op, encoding, ...) found no such name; the message lists them."""


class MissingFileError(FeatcacheError, FileNotFoundError):
    """A file the user named (checkpoint, data root, recipe) does not exist."""


class RunExistsError(FeatcacheError, FileExistsError):
    """A run directory already holds a run that was not asked to be resumed."""


class CacheError(FeatcacheError, RuntimeError):
    """A cache is missing, incomplete, corrupt or does not match what was asked of it."""


class CompatError(FeatcacheError, ValueError):
    """The cache cannot serve this training run; the message lists every problem and its fix."""


class DecodeError(FeatcacheError, RuntimeError):
    """An image could not be read or decoded; ``path`` is the file (``shard.tar#member`` for shards)."""

    def __init__(self, path: str, reason: str, relpath: str | None = None):
        super().__init__(f"cannot decode image {path}: {reason} (fix or remove the file, or pass --skip-corrupt "
                         f"to skip it and record the skip in the cache manifest)")
        self.path = path
        self.reason = reason
        self.relpath = relpath

    def __reduce__(self):  # pickled across DataLoader workers: rebuild from the constructor's arguments
        return type(self), (self.path, self.reason, self.relpath)


class ReplayDriftError(FeatcacheError, RuntimeError):
    """A replayed view does not reproduce the fingerprint stored at extraction."""


class SweepError(FeatcacheError, RuntimeError):
    """A sweep spec is invalid, or some of its runs failed."""


#: Kept for code written against v0.1, where the decode error had this name.
ImageDecodeError = DecodeError

__all__ = ["FeatcacheError", "ConfigError", "UnknownNameError", "MissingFileError", "RunExistsError", "CacheError",
           "CompatError", "DecodeError", "ImageDecodeError", "ReplayDriftError", "SweepError"]
