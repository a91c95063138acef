"""featcache: run frozen timm teachers once, distil many students from the cache.

The main entry points are re-exported here and imported on first use (PEP 562 module ``__getattr__``), so that
``import featcache`` and ``featcache --help`` load neither torch nor any backend::

    from featcache import ExtractConfig, run_extract, TrainConfig, train
    path = run_extract(ExtractConfig(data="imgs/", out="cache.zarr", teacher="deit3_small"))
    train(TrainConfig(cache=path, method="vitkd+nkd", out="runs/a"))
"""
from __future__ import annotations

import importlib
from typing import Any

from . import errors as _errors
from .errors import *  # noqa: F401,F403  (no imports of its own; every caller may catch these)

__version__ = "0.1.0"

#: Public name -> the module that defines it, imported on first access.
_LAZY: dict[str, str] = {
    **dict.fromkeys(["ExtractConfig", "TrainConfig", "ProbeConfig", "load_yaml", "save_yaml"], "featcache.config"),
    **dict.fromkeys(["Manifest", "FORMAT_VERSION"], "featcache.manifest"),
    **dict.fromkeys(["open_reader", "create_writer", "READERS", "WRITERS"], "featcache.stores"),
    **dict.fromkeys(["METHODS"], "featcache.methods"),
    **dict.fromkeys(["load_teacher"], "featcache.teachers"),
    **dict.fromkeys(["run_extract"], "featcache.extract"),
    **dict.fromkeys(["cache_info"], "featcache.info"),
    **dict.fromkeys(["verify_cache"], "featcache.verify"),
    **dict.fromkeys(["run_probe"], "featcache.probe"),
    **dict.fromkeys(["train"], "featcache.engine"),
    **dict.fromkeys(["run_sweep"], "featcache.sweep"),
    **dict.fromkeys(["write_report"], "featcache.report"),
}

__all__ = ["__version__", *_errors.__all__, *_LAZY]


def __getattr__(name: str) -> Any:
    """Import the module behind a public name on first access, and keep the name so the next access is free."""
    if name not in _LAZY:
        raise AttributeError(f"module 'featcache' has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
