"""The package keeps its layering: no import cycle, no upward import, short functions (scripts/check_structure.py)."""
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def checker():
    import importlib.util

    spec = importlib.util.spec_from_file_location("check_structure", ROOT / "scripts" / "check_structure.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_package_is_clean():
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "check_structure.py")], capture_output=True,
                         text=True)
    assert out.returncode == 0 and not out.stdout, out.stdout + out.stderr


def write_tree(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        path = root / "featcache" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))


CLEAN = {
    "__init__.py": '_LAZY = {**dict.fromkeys(["train"], "featcache.engine")}\n',
    "errors.py": "",
    "views.py": "from .errors import *\n",
    "stores/__init__.py": "from . import base, zarr_store\n",
    "stores/base.py": "from ..views import x\n",
    "stores/zarr_store.py": "from . import base\nfrom .base import y\n",
    "methods/__init__.py": 'import importlib\nfor n in ("kd",):\n    importlib.import_module(f"{__name__}.{n}")\n',
    "methods/kd.py": "from ..stores import base\n",
    "engine.py": "from .methods import kd\n",
    "testing/__init__.py": "from featcache.engine import train\n",
}


def test_a_clean_tree_passes_and_plugin_loading_is_an_edge(tmp_path, checker):
    write_tree(tmp_path, CLEAN)
    problems, scan, _ = checker.check(tmp_path)
    assert [p for p in problems if not p.startswith("median")] == []
    assert "featcache.methods.kd" in scan.graph["featcache.methods"]  # import_module(f"{__name__}.{n}")
    assert "featcache.stores.base" in scan.graph["featcache.stores.zarr_store"]
    assert "featcache.stores" not in scan.graph["featcache.stores.zarr_store"]  # `from . import base`: a submodule


@pytest.mark.parametrize("rel, text, expected", [
    # a submodule importing a name from its own package's __init__, which imports that submodule back
    ("stores/zarr_store.py", "from featcache.stores import open_reader\n", "import cycle"),
    ("views.py", "from .errors import *\nimport importlib\nimportlib.import_module('featcache.engine')\n",
     "upward import: featcache.views -> featcache.engine"),
    ("views.py", "from featcache import train\n", "upward import: featcache.views -> featcache.engine"),
    ("views.py", "import importlib\ndef f(n):\n    return importlib.import_module(n)\n", "computed import_module"),
    ("views.py", "from featcache.testing import x\n", "library imports test helpers"),
    ("errors.py", "def f():\n    from .engine import train\n", "upward import: featcache.errors -> featcache.engine"),
])
def test_planted_problems_are_found(tmp_path, checker, rel, text, expected):
    write_tree(tmp_path, {**CLEAN, rel: text})
    problems, _, _ = checker.check(tmp_path)
    assert any(p.startswith(expected) for p in problems), problems


def test_long_functions_are_reported(tmp_path, checker):
    body = "".join(f"    x{i} = {i}\n" for i in range(61))
    write_tree(tmp_path, {**CLEAN, "engine.py": "from .methods import kd\ndef loop():\n" + body})
    problems, _, _ = checker.check(tmp_path)
    assert any(p.startswith("long function: featcache.engine:loop") for p in problems), problems
