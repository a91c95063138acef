"""Print every import cycle, every import that runs up the layers, and every over-long function in featcache/.

Usage: ``python scripts/check_structure.py [--stats]``. Prints nothing and exits 0 when the package is clean;
otherwise one line per problem and exit 1. ``--stats`` adds the function-length summary (median, p90, max).

Imports are read with ``ast`` (module-level and function-level alike, since a lazy import is still a dependency);
``featcache.testing`` (helpers for tests) is outside the layering. A function's length is the number of lines from
its first statement after the docstring to its last line.
"""
from __future__ import annotations

import ast
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "featcache"
MAX_FUNCTION_LINES = 60
MAX_MEDIAN_LINES = 8

# Lowest first: a module may import its own layer or lower ones. Packages stand for all their modules.
LAYERS: list[tuple[str, ...]] = [
    ("errors", "registry", "manifest", "durable", "config", "__init__"),
    ("sources",),
    ("views",),
    ("models",),
    ("teachers",),
    ("stores",),
    ("datasets",),
    ("methods",),
    ("compat", "build", "extract", "convert", "info", "verify"),
    ("rundir",),
    ("engine",),
    ("sweep", "report", "probe"),  # probe reads a run directory's student through rundir
    ("demo",),
    ("options",),
    ("cli",),
]
RANK = {name: rank for rank, names in enumerate(LAYERS) for name in names}
# Functions allowed past the length limit: the CLI's command bodies are generated wiring, not logic.
ENTRY_POINTS = {"featcache.cli"}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def top_unit(module: str) -> str:
    """``featcache.stores.zarr_store`` -> ``stores``; ``featcache`` -> ``__init__``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def resolve(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    """The absolute module an ``from X import ...`` names."""
    if node.level == 0:
        return node.module or ""
    parts = module.split(".")
    keep = len(parts) - node.level + (1 if is_package else 0)
    return ".".join(parts[:keep] + ([node.module] if node.module else []))


def with_packages(name: str) -> set[str]:
    """``a.b.c`` -> {a, a.b, a.b.c}: importing a submodule runs every package ``__init__`` above it."""
    parts = name.split(".")
    return {".".join(parts[:i]) for i in range(1, len(parts) + 1)}


def imports_of(path: Path, known: set[str]) -> set[str]:
    module, is_package = module_name(path), path.name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = resolve(module, is_package, node)
            found.update([base, *(f"{base}.{a.name}" for a in node.names)])
    found = set().union(*(with_packages(n) for n in found)) if found else set()
    own = with_packages(module)  # a module's own packages are already running when it is imported
    return {name for name in found if name in known and name not in own}


def package_files() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if "testing" not in p.relative_to(PACKAGE).parts)


def import_graph() -> dict[str, set[str]]:
    files = package_files()
    known = {module_name(p) for p in files}
    return {module_name(p): imports_of(p, known) for p in files}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    sys.setrecursionlimit(10_000)
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    problems = []
    for module, targets in sorted(graph.items()):
        unit = top_unit(module)
        if unit not in RANK:
            problems.append(f"unlayered module {module}: add it to LAYERS in scripts/check_structure.py")
            continue
        for target in sorted(targets):
            other = top_unit(target)
            if other in RANK and RANK[other] > RANK[unit]:
                problems.append(f"upward import: {module} -> {target}")
    return problems


def function_lengths() -> list[tuple[int, str]]:
    out = []
    for path in package_files():
        module = module_name(path)
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                body = node.body
                if len(body) > 1 and isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None),
                                                                                  ast.Constant):
                    body = body[1:]
                length = body[-1].end_lineno - body[0].lineno + 1
                out.append((length, f"{module}:{node.name} (line {node.lineno})"))
    return out


def length_problems(lengths: list[tuple[int, str]]) -> list[str]:
    problems = [f"long function: {where} has {n} lines (limit {MAX_FUNCTION_LINES})" for n, where in sorted(lengths)
                if n > MAX_FUNCTION_LINES and where.split(":")[0] not in ENTRY_POINTS]
    median = statistics.median(n for n, _ in lengths)
    if median > MAX_MEDIAN_LINES:
        problems.append(f"median function length {median} lines is over {MAX_MEDIAN_LINES}")
    return problems


def main(argv: list[str]) -> int:
    graph = import_graph()
    lengths = function_lengths()
    problems = [f"import cycle: {' <-> '.join(c)}" for c in cycles(graph)]
    problems += upward_imports(graph) + length_problems(lengths)
    for line in problems:
        print(line)
    if "--stats" in argv:
        ns = sorted(n for n, _ in lengths)
        print(f"{len(graph)} modules, {sum(len(t) for t in graph.values())} imports; {len(ns)} functions: median "
              f"{statistics.median(ns)} lines, p90 {ns[int(0.9 * (len(ns) - 1))]}, max {ns[-1]} "
              f"({max(lengths)[1]})")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
