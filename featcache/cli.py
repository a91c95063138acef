"""The ``featcache`` command line: a thin click group over the library.

Options mirror config keys (``--batch-size`` sets ``batch_size``); ``--config FILE.yaml`` supplies defaults
that explicit options override. Each command only parses, builds a config and calls one library function.
"""
from __future__ import annotations

import sys
from typing import Any

import click

from . import __version__


def parse_int_list(value: str | None) -> list[int] | None:
    """'0,1,11' -> [0, 1, 11]."""
    if value is None or isinstance(value, list):
        return value
    try:
        return [int(v) for v in str(value).split(",") if v.strip()]
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers like 0,1,11, got {value!r}") from None


def merge_config(config_path: str | None, cli_values: dict[str, Any], ctx: click.Context) -> dict[str, Any]:
    """YAML defaults overridden by the options the user typed (not click's own defaults)."""
    from .config import load_yaml

    values = load_yaml(config_path) if config_path else {}
    for key, value in cli_values.items():
        source = ctx.get_parameter_source(key)
        if key in values and source is not None and source.name == "DEFAULT":
            continue
        values[key] = value
    return values


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(__version__, prog_name="featcache")
def main() -> None:
    """featcache: run frozen timm teachers once (extract), distil many students from the cache (train, sweep)."""


# ----------------------------------------------------------------------------------------------------------------
# Stage 1: teachers, extract, info, verify
# ----------------------------------------------------------------------------------------------------------------

# ----------------------------------------------------------------------------------------------------------------
# Stores: convert
# ----------------------------------------------------------------------------------------------------------------

# ----------------------------------------------------------------------------------------------------------------
# Stage 2: train
# ----------------------------------------------------------------------------------------------------------------

# ----------------------------------------------------------------------------------------------------------------
# Evaluation: probe
# ----------------------------------------------------------------------------------------------------------------

# ----------------------------------------------------------------------------------------------------------------
# Sweeps: sweep, report, demo
# ----------------------------------------------------------------------------------------------------------------


if __name__ == "__main__":
    sys.exit(main())
