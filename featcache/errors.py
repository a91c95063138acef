"""Every error featcache raises for a user to act on derives from :class:`FeatcacheError`.

The CLI catches this base alone and prints its message in one line; anything else is a bug and keeps its
traceback (the pattern of webdataset's ``single_node_only``: fail where it is detected and name the fix).
Each class also derives from the builtin a caller would expect (``ValueError`` for a bad value, ``KeyError`` for
an unknown name), so library users can keep catching those.
"""
from __future__ import annotations


def worker_message(text: str, cls: type) -> str:
    """The original message inside the text of an error torch's DataLoader re-raised from a worker.

    ``torch._utils.ExceptionWrapper.reraise`` rebuilds a worker's exception as ``cls(text)``, where ``text`` is
    ``"Caught <cls> in DataLoader worker process N."``, then the worker's ``"Original Traceback ..."`` ending with
    the formatted exception line ``"<module>.<cls>: <message>"``; the message is what follows the last such line.
    Any other text is returned as it is.
    """
    if not text.startswith(f"Caught {cls.__name__} ") or "\nOriginal Traceback" not in text:
        return text
    _, found, message = text.rpartition(f"\n{cls.__module__}.{cls.__qualname__}: ")
    return message.rstrip("\n") if found else text


class FeatcacheError(Exception):
    """Base of every error whose message tells the user what to fix.

    An error raised in a DataLoader worker reaches the main process with its original one-line message (see
    :func:`worker_message`), not with the worker's traceback: it is the user's error, not a bug.
    """

    def __init__(self, *args: object):
        if args and isinstance(args[0], str):
            args = (worker_message(args[0], type(self)), *args[1:])
        super().__init__(*args)

    def __str__(self) -> str:  # KeyError would quote its message; every featcache error reads as plain text
        return str(self.args[0]) if self.args else ""


class ConfigError(FeatcacheError, ValueError):
    """A config value, option, recipe or spec is invalid; the message names the value and the fix."""


class MethodArgumentError(ConfigError, TypeError):
    """A method got a keyword argument it does not take (a ``--method-arg`` typo).

    Also a ``TypeError``, as Python's own error for an unknown keyword is, so callers that catch that keep working.
    """


class UnknownNameError(FeatcacheError, KeyError):
    """A registry lookup (method, store format, view op, encoding, ...) found no such name; the message lists them."""


class MissingFileError(FeatcacheError, FileNotFoundError):
    """A file the user named (checkpoint, data root, recipe) does not exist."""


class WeightsUnavailableError(FeatcacheError, FileNotFoundError):
    """Pretrained weights are neither in the local hub cache nor downloadable; the message names the offline ways."""


class RunExistsError(FeatcacheError, FileExistsError):
    """A run directory already holds a run that was not asked to be resumed."""


class CacheError(FeatcacheError, RuntimeError):
    """A cache is missing, incomplete, corrupt or does not match what was asked of it."""


class CompatError(FeatcacheError, ValueError):
    """The cache cannot serve this training run; the message lists every problem and its fix."""


class DecodeError(FeatcacheError, RuntimeError):
    """An image could not be read or decoded; ``path`` is the file (``shard.tar#member`` for shards).

    ``fix`` is what the user can do; the default suits extraction (whose ``--skip-corrupt`` records the skip).
    A single argument is a whole message (torch's DataLoader rebuilds a worker's error from its text).
    """

    EXTRACT_FIX = "fix or remove the file, or pass --skip-corrupt to skip it and record the skip in the cache manifest"

    def __init__(self, path: str, reason: str | None = None, relpath: str | None = None, fix: str | None = None):
        message = path if reason is None else f"cannot decode image {path}: {reason} ({fix or self.EXTRACT_FIX})"
        super().__init__(message)
        self.path = path if reason is not None else None
        self.reason = reason
        self.relpath = relpath
        self.fix = fix

    def __reduce__(self):  # pickled across DataLoader workers: rebuild from the constructor's arguments
        if self.reason is None:
            return type(self), (str(self),)
        return type(self), (self.path, self.reason, self.relpath, self.fix)


class ReplayDriftError(FeatcacheError, RuntimeError):
    """A replayed view does not reproduce the fingerprint stored at extraction."""


class SourceError(FeatcacheError, ValueError):
    """The images (an ImageFolder tree or WebDataset shards) cannot be used as they are: no images, a symlink that
    leaves the root, a truncated or compressed shard, a bad label; the message names the file and the fix."""


class LockedError(FeatcacheError, RuntimeError):
    """Another live process is writing the directory (its lock is held); the message names that process's PID."""


class SweepError(FeatcacheError, RuntimeError):
    """A sweep spec is invalid, or some of its runs failed."""


class RankFailed(FeatcacheError, RuntimeError):
    """Another process of a multi-process extraction failed (the message quotes its error) or stopped answering."""


#: Kept for code written against v0.1, where the decode error had this name.
ImageDecodeError = DecodeError

__all__ = ["FeatcacheError", "ConfigError", "UnknownNameError", "MissingFileError", "WeightsUnavailableError",
           "RunExistsError", "CacheError", "CompatError", "DecodeError", "ImageDecodeError", "LockedError",
           "RankFailed", "ReplayDriftError", "SourceError", "SweepError"]
