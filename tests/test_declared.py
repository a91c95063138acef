"""`--help` of every command is quick: registry names and defaults are read from the source (featcache/declared.py),
and what the source says equals what the imported modules say."""
from __future__ import annotations

import dataclasses
import importlib
import json
import subprocess
import sys

import pytest

from featcache import declared
from featcache.cli import main
from featcache.config import ExtractConfig, ProbeConfig, TrainConfig
from featcache.testing.options import describe

COMMANDS = sorted(main.commands)
HEAVY = ("torch", "timm", "numpy", "accelerate", "zarr", "PIL")
#: The modules holding every registry, sequence and signature the command line reads.
LIBRARY = ("featcache.methods", "featcache.datasets", "featcache.sources", "featcache.stores",
           "featcache.stores.precision", "featcache.sweep", "featcache.demo", "featcache.verify", "featcache.info")


def from_fresh_process() -> dict:
    """Each command's options as built by a process that imported nothing else, and the modules it loaded."""
    code = ("import json, sys\nfrom featcache.cli import main\nfrom featcache.testing.options import describe\n"
            "out = {n: describe(c.params) for n, c in main.commands.items()}\n"
            "print(json.dumps({'options': out, 'modules': sorted(sys.modules)}))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(done.stdout)


def test_options_read_from_the_source_equal_those_built_from_the_imported_modules():
    fresh = from_fresh_process()
    assert not [m for m in fresh["modules"] if m.split(".")[0] in HEAVY], "building the options imported a library"
    for module in LIBRARY:
        importlib.import_module(module)
    for name in COMMANDS:
        command = main.commands[name]
        live = command.build_options() if command.build_options else []
        decorated = command.params[:len(command.params) - len(live)]  # click's own, before the built ones
        assert fresh["options"][name] == describe([*decorated, *live]), name


@pytest.mark.parametrize("cls", [ExtractConfig, TrainConfig, ProbeConfig], ids=lambda c: c.__name__)
def test_every_choice_reference_reads_the_same_names_from_the_source(cls):
    from featcache.options import resolve

    for f in dataclasses.fields(cls):
        for key in ("choices", "listed"):
            ref = f.metadata.get(key)
            if isinstance(ref, str):
                live = resolve(ref)
                assert declared.source_names(ref) == list(live.names() if hasattr(live, "names") else live), ref


def test_source_defaults_follow_imports_and_read_functions_and_classes():
    assert declared.source_default("featcache.sweep:run_sweep", "jobs") == 1  # sweep/__init__.py
    assert declared.source_default("featcache.demo:DemoConfig", "out") == "featcache_demo"
    assert {"kd", "vitkd"} <= set(declared.source_names("featcache.methods:METHODS"))  # methods/__init__ -> base
    with pytest.raises(LookupError, match="no 'NOPE'"):
        declared.source_names("featcache.datasets:NOPE")


@pytest.mark.parametrize("name", ["", *COMMANDS])
def test_help_imports_no_heavy_library(name):
    """`featcache NAME --help` loads neither torch, timm, numpy nor accelerate: their import is what made help take
    seconds (the time itself is measured by hand, not asserted: timed unit tests fail on a loaded CI box)."""
    code = ("import sys\nfrom featcache.cli import main\n"
            f"try:\n    main({[name] if name else []!r} + ['--help'])\nexcept SystemExit:\n    pass\n"
            "print(sorted(m for m in ('torch', 'timm', 'numpy', 'accelerate') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "[]", out
