"""What featcache's own source declares, read without importing it: registry names, literal constants, defaults.

``featcache train --help`` lists the registered methods, view policies, store formats and dtypes, and shows each
option's default. Importing the modules that hold them would import torch and timm (seconds); so a reference
``"module:NAME"`` whose module is not imported yet is answered from the module's source with :mod:`ast`:

* ``NAME = Registry(...)``: the names of the ``@NAME.register("name")`` decorators in the files of its package
  (where featcache's plugins register: one file per method, per store);
* ``NAME = <literal>``: the literal (``VIEW_POLICIES = ("cycle", "random")``);
* ``def NAME(..., key=<literal>)`` / ``class NAME: key: T = <literal>``: the default of ``key``.

Every value is still written once, where the code uses it. Once the module is imported (a command is running, a
program registered its own plugin), the live object answers instead. tests/test_declared.py checks that the source
and the imported objects agree for every reference the command line uses.
"""
from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import sys
from pathlib import Path
from typing import Any

PACKAGE = Path(__file__).resolve().parent


def names(ref: str) -> list[str]:
    """The names a ``"module:NAME"`` registry, sequence or mapping holds (a registry's sorted, as it lists them)."""
    module, _, name = ref.partition(":")
    if module in sys.modules:
        found = getattr(sys.modules[module], name)
        return list(found.names() if hasattr(found, "names") else found)
    return source_names(ref)


def default(ref: str, key: str) -> Any:
    """The default of keyword ``key`` of the function, or of field ``key`` of the dataclass, ``ref`` names."""
    module, _, name = ref.partition(":")
    if module in sys.modules:
        return _live_default(getattr(sys.modules[module], name), key)
    return source_default(ref, key)


def source_names(ref: str) -> list[str]:
    """:func:`names` as the source declares it (never imports ``ref``'s module)."""
    module, _, name = ref.partition(":")
    return list(_static_value(module, name))


def source_default(ref: str, key: str) -> Any:
    """:func:`default` as the source declares it (never imports ``ref``'s module)."""
    module, _, name = ref.partition(":")
    node, _ = _definition(module, name)
    return _static_default(node, key, ref)


def _live_default(owner: Any, key: str) -> Any:
    if dataclasses.is_dataclass(owner):
        return {f.name: f.default for f in dataclasses.fields(owner)}[key]
    return inspect.signature(owner).parameters[key].default


def _static_value(module: str, name: str) -> Any:
    node, path = _definition(module, name)
    value = getattr(node, "value", None)
    if isinstance(value, ast.Call) and getattr(value.func, "id", None) == "Registry":
        return sorted(_registered(path.parent, name))
    if value is None:
        raise TypeError(f"{module}:{name} is not assigned a literal or a Registry in {path}")
    return ast.literal_eval(value)


def _static_default(node: ast.AST, key: str, ref: str) -> Any:
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        args = node.args
        positional = args.posonlyargs + args.args
        pairs = list(zip(positional[len(positional) - len(args.defaults):], args.defaults))
        pairs += [(a, d) for a, d in zip(args.kwonlyargs, args.kw_defaults) if d is not None]
        found = {a.arg: d for a, d in pairs}
    elif isinstance(node, ast.ClassDef):
        found = {s.target.id: s.value for s in node.body
                 if isinstance(s, ast.AnnAssign) and isinstance(s.target, ast.Name) and s.value is not None}
    else:
        raise TypeError(f"{ref} is neither a function nor a class")
    if key not in found:
        raise KeyError(f"{ref} declares no default for {key!r}")
    return ast.literal_eval(found[key])


def _definition(module: str, name: str) -> tuple[ast.AST, Path]:
    """The top-level statement that defines ``name`` in ``module``, following ``from .x import name``."""
    path = _module_file(module)
    for node in _parse(path).body:
        if name in _defined_names(node):
            return node, path
        if isinstance(node, ast.ImportFrom) and any((a.asname or a.name) == name for a in node.names):
            alias = next(a for a in node.names if (a.asname or a.name) == name)
            return _definition(_absolute(module, path, node), alias.name)
    raise LookupError(f"{module} defines no {name!r} ({path})")


def _defined_names(node: ast.AST) -> set[str]:
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return {node.name}
    targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AnnAssign) else []
    return {t.id for t in targets if isinstance(t, ast.Name)}


def _absolute(module: str, path: Path, node: ast.ImportFrom) -> str:
    """The module an ``from X import ...`` in ``module`` (file ``path``) names."""
    if node.level == 0:
        return node.module or ""
    parts = module.split(".")
    package = parts if path.name == "__init__.py" else parts[:-1]
    base = package[:len(package) - node.level + 1]
    return ".".join(base + ([node.module] if node.module else []))


def _module_file(module: str) -> Path:
    parts = module.split(".")
    if parts[0] != PACKAGE.name:
        raise ValueError(f"{module!r} is not a module of {PACKAGE.name}")
    base = PACKAGE.joinpath(*parts[1:])
    return base / "__init__.py" if base.is_dir() else base.with_suffix(".py")


def _registered(package: Path, registry: str) -> set[str]:
    """Names passed to ``@<registry>.register("name")`` in the modules of ``package``."""
    found = set()
    for path in package.glob("*.py"):
        for node in ast.walk(_parse(path)):
            for deco in getattr(node, "decorator_list", ()):
                if _is_register_call(deco, registry):
                    found.add(deco.args[0].value)
    return found


def _is_register_call(deco: ast.AST, registry: str) -> bool:
    return (isinstance(deco, ast.Call) and isinstance(deco.func, ast.Attribute) and deco.func.attr == "register"
            and isinstance(deco.func.value, ast.Name) and deco.func.value.id == registry
            and len(deco.args) == 1 and isinstance(deco.args[0], ast.Constant))


@functools.cache
def _parse(path: Path) -> ast.Module:
    return ast.parse(path.read_text(), filename=str(path))
