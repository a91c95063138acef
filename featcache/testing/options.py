"""What a command's options show and accept, as comparable text (tests of the lazily built command line)."""
from __future__ import annotations

from typing import Iterable

import click


def describe(params: Iterable[click.Parameter]) -> list[str]:
    """One line per option: its name, flags, default, help and choices, as ``--help`` and parsing use them."""
    return [repr((p.name, p.opts, p.default, getattr(p, "help", None), getattr(p.type, "choices", None)))
            for p in params]
