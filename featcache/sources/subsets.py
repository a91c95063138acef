"""Seeded per-class few-shot subsets, and the hash that identifies a file list."""
from __future__ import annotations

import hashlib
from typing import Iterable, Sequence

import numpy as np

from ..errors import ConfigError
from .base import SourceItem


def select_subset(items: Sequence[SourceItem], shots: int | None = None, fraction: float | None = None,
                  seed: int = 0) -> list[int]:
    """Indices of a seeded per-class subset, sorted by (label, original position).

    One Generator (``default_rng(seed)``) draws one permutation per class, classes in label order; the
    first ``shots`` (all if fewer) or ``max(1, int(n * fraction))`` indices of it are kept.
    """
    if shots is not None and fraction is not None:
        raise ConfigError("give shots or fraction, not both")
    if shots is None and fraction is None:
        return list(range(len(items)))
    if shots is not None and shots < 1:
        raise ConfigError(f"--shots must be >= 1, got {shots}")
    if fraction is not None and not 0 < fraction <= 1:
        raise ConfigError(f"--fraction must be in (0, 1], got {fraction}")
    rng = np.random.default_rng(seed)
    labels = np.asarray([it.label for it in items], dtype=np.int64)
    order = np.argsort(labels, kind="stable")  # grouped by label, original order inside a class
    _, counts = np.unique(labels, return_counts=True)
    chosen: list[int] = []
    for idx in np.split(order, np.cumsum(counts)[:-1]):
        k = min(shots, len(idx)) if shots is not None else max(1, int(len(idx) * fraction))
        chosen += sorted(int(i) for i in idx[rng.permutation(len(idx))[:k]])
    return chosen


def file_list_sha256(items: Iterable[SourceItem]) -> str:
    """SHA-256 of the ``"relpath\\tlabel\\n"`` lines: identifies the exact file list and order."""
    h = hashlib.sha256()
    for it in items:
        h.update(f"{it.relpath}\t{int(it.label)}\n".encode())
    return h.hexdigest()
