"""Print every import cycle, every import that runs up the layers, and every over-long function in featcache/.

Usage: ``python scripts/check_structure.py [--stats]``. Prints nothing and exits 0 when the package is clean;
otherwise one line per problem and exit 1. ``--stats`` adds a summary (modules, imports, function lengths).

What counts as an import of module A by module B (read with ``ast``, never by importing):
  * ``import A`` and ``from A import x`` anywhere in B, module level or inside a function (a lazy import is still
    a dependency), and every package above A whose ``__init__`` that runs — except B's own packages, which are
    already running; ``from P import x`` where P is B's own package counts as an import of P's ``__init__``
    unless ``x`` is a submodule;
  * ``importlib.import_module("A")`` with a constant name, and ``import_module(f"{__name__}.{...}")`` (a package
    loading its plugins) as an import of every submodule of that package;
  * ``from featcache import NAME`` as an import of the module that ``featcache/__init__.py``'s lazy table names;
  * ``import_module`` with a computed name is allowed only in the top layers (options, cli), where any module may
    be imported, and in the package face's lazy ``__getattr__``; elsewhere it is reported (unchecked target).
``featcache.testing`` (helpers for tests) is outside the layering, and the library must not import it.
A function's length is the number of lines from its first statement after the docstring to its last line.
"""
from __future__ import annotations

import ast
import re
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MAX_FUNCTION_LINES = 60
MAX_MEDIAN_LINES = 8

# Lowest first: a module may import its own layer or lower ones; a package stands for all its modules.
# The run directory's contract sits below the engine, which writes the run dir through it; sweep and report read it.
LAYERS: list[tuple[str, ...]] = [
    ("errors", "registry", "manifest", "durable", "storage", "locks", "config", "declared", "distributed", "__init__"),
    ("sources",),
    ("views",),
    ("models",),
    ("teachers",),
    ("stores",),
    ("datasets", "samplers", "streaming"),
    ("methods",),
    ("compat", "build", "extract", "extract_units", "convert", "info", "verify"),
    ("rundir",),
    ("progress", "trackers"),
    ("engine",),
    ("sweep", "report", "probe"),
    ("demo",),
    ("options", "cli", "__main__"),
]
RANK = {name: rank for rank, names in enumerate(LAYERS) for name in names}
# The CLI resolves "module:NAME" references from config fields; the package face imports its lazy table on attribute
# access, and each ``from featcache import NAME`` is counted as an import of the table's module by the importer.
DYNAMIC_OK = {*LAYERS[-1], "__init__"}
OUTSIDE = "testing"


def module_name(path: Path, root: Path) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def top_unit(module: str) -> str:
    """``featcache.stores.zarr_store`` -> ``stores``; ``featcache`` -> ``__init__``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def ancestors(name: str) -> set[str]:
    """``a.b.c`` -> {a, a.b}: the packages whose ``__init__`` runs before ``a.b.c``."""
    parts = name.split(".")
    return {".".join(parts[:i]) for i in range(1, len(parts))}


def from_base(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    """The absolute module an ``from X import ...`` names."""
    if node.level == 0:
        return node.module or ""
    parts = module.split(".")
    keep = len(parts) - node.level + (1 if is_package else 0)
    return ".".join(parts[:keep] + ([node.module] if node.module else []))


def lazy_table(root: Path, package: str) -> dict[str, str]:
    """Public name -> defining module, from the ``_LAZY = {**dict.fromkeys([...], "module"), ...}`` table."""
    init = root / package / "__init__.py"
    table: dict[str, str] = {}
    for call in (n for n in ast.walk(ast.parse(init.read_text())) if isinstance(n, ast.Call)):
        if getattr(call.func, "attr", None) == "fromkeys" and len(call.args) == 2:
            names, target = call.args
            if isinstance(names, ast.List) and isinstance(target, ast.Constant):
                table.update({n.value: target.value for n in names.elts if isinstance(n, ast.Constant)})
    return table


class ImportScan:
    """The imports of every module of one package tree, with the problems that reading them found."""

    def __init__(self, root: Path, package: str = "featcache"):
        self.root, self.package = root, package
        self.files = sorted((root / package).rglob("*.py"))
        self.known = {module_name(p, root) for p in self.files}
        self.lazy = lazy_table(root, package)
        self.problems: list[str] = []
        self.graph = {module_name(p, root): self.imports_of(p) for p in self.files
                      if top_unit(module_name(p, root)) != OUTSIDE}

    def imports_of(self, path: Path) -> set[str]:
        module = module_name(path, self.root)
        own = ancestors(module) | {module}
        found: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            found |= self.targets(module, path.name == "__init__.py", node)
        found |= set().union(*(ancestors(t) for t in found)) - own if found else set()
        if any(top_unit(t) == OUTSIDE for t in found):
            self.problems.append(f"library imports test helpers: {module} -> featcache.{OUTSIDE}")
        return {t for t in found if t in self.known and t != module and top_unit(t) != OUTSIDE}

    def targets(self, module: str, is_package: bool, node: ast.AST) -> set[str]:
        if isinstance(node, ast.Import):
            return {a.name for a in node.names}
        if isinstance(node, ast.ImportFrom):
            return self.from_targets(module, from_base(module, is_package, node), node)
        if isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) == "import_module":
            return self.dynamic_targets(module, node)
        return set()

    def from_targets(self, module: str, base: str, node: ast.ImportFrom) -> set[str]:
        out = set()
        for alias in node.names:
            sub = f"{base}.{alias.name}"
            if sub in self.known:
                out.add(sub)
            elif base == self.package and alias.name in self.lazy:
                out.add(self.lazy[alias.name])
            else:
                out.add(base)
        return out

    def dynamic_targets(self, module: str, node: ast.Call) -> set[str]:
        arg = node.args[0] if node.args else None
        if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
            return {arg.value}
        if isinstance(arg, ast.JoinedStr) and "__name__" in ast.unparse(arg.values[0]):
            return {m for m in self.known if m.startswith(module + ".")}
        if top_unit(module) not in DYNAMIC_OK:
            self.problems.append(f"computed import_module in {module} (line {node.lineno}): its target cannot be "
                                 "checked; import the module by name")
        return set()


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph.get(v, ())):
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


def function_lengths(scan: ImportScan) -> list[tuple[int, str]]:
    out = []
    for path in scan.files:
        module = module_name(path, scan.root)
        if top_unit(module) == OUTSIDE:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                body = node.body
                if len(body) > 1 and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                    body = body[1:]
                out.append((body[-1].end_lineno - body[0].lineno + 1, f"{module}:{node.name} (line {node.lineno})"))
    return out


def length_problems(lengths: list[tuple[int, str]]) -> list[str]:
    problems = [f"long function: {where} has {n} lines (limit {MAX_FUNCTION_LINES})" for n, where in sorted(lengths)
                if n > MAX_FUNCTION_LINES]
    median = statistics.median(n for n, _ in lengths) if lengths else 0
    if median > MAX_MEDIAN_LINES:
        problems.append(f"median function length {median} lines is over {MAX_MEDIAN_LINES}")
    return problems


def check(root: Path = ROOT, package: str = "featcache") -> tuple[list[str], ImportScan, list[tuple[int, str]]]:
    scan = ImportScan(root, package)
    lengths = function_lengths(scan)
    problems = [f"import cycle: {' <-> '.join(c)}" for c in cycles(scan.graph)]
    problems += upward_imports(scan.graph) + scan.problems + length_problems(lengths)
    return problems, scan, lengths


def main(argv: list[str]) -> int:
    problems, scan, lengths = check()
    for line in problems:
        print(line)
    if "--stats" in argv:
        ns = sorted(n for n, _ in lengths)
        print(f"{len(scan.graph)} modules, {sum(len(t) for t in scan.graph.values())} imports; {len(ns)} functions: "
              f"median {statistics.median(ns)} lines, p90 {ns[int(0.9 * (len(ns) - 1))]}, max {ns[-1]} "
              f"({max(lengths)[1]})")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
