"""The package keeps its layering: no import cycle, no upward import, short functions (scripts/check_structure.py)."""
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_no_cycles_no_upward_imports_no_long_functions():
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "check_structure.py")], capture_output=True,
                         text=True)
    assert out.returncode == 0 and not out.stdout, out.stdout + out.stderr


def test_checker_reports_a_planted_cycle(tmp_path, monkeypatch):
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import check_structure as cs
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    graph = {"featcache.views": {"featcache.stores.base"}, "featcache.stores.base": {"featcache.views"}}
    assert cs.cycles(graph) == [["featcache.stores.base", "featcache.views"]]
    assert cs.upward_imports(graph) == ["upward import: featcache.views -> featcache.stores.base"]
