"""A sweep spec (YAML, no code, no tags) and the runs it expands to, each with a stable name and a validated config.

Precedence, lowest first: top-level recipe, the run's recipe, ``base``, the run's fields, the grid point. Run names
come from the overrides alone (``method=nkd,lr=0.0005``; a run recipe gives ``nkd_deit_tiny_from_deit3_small``;
``name:`` wins), so they are stable across re-runs and a re-run finds its own run directories.
"""
from __future__ import annotations

import copy
import inspect
import itertools
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from ..config import TrainConfig, from_dict, load_yaml
from ..errors import ConfigError, SweepError
from ..methods.task import method_specs

SPEC_KEYS = ("cache", "extract", "recipe", "base", "grid", "runs", "out", "threads")


@dataclass
class RunPlan:
    """One run of a sweep: its stable name and its validated config."""

    name: str
    config: TrainConfig

    @property
    def dir(self) -> Path:
        return Path(self.config.out)


@dataclass
class SweepSpec:
    """A parsed sweep spec (see :mod:`featcache.sweep`)."""

    cache: str
    out: str
    base: dict[str, Any] = field(default_factory=dict)  # fields for every run (over the recipes)
    defaults: dict[str, Any] = field(default_factory=dict)  # the top-level recipe's fields
    grid: dict[str, list[Any]] = field(default_factory=dict)
    runs: list[dict[str, Any]] = field(default_factory=list)
    extract: dict[str, Any] | None = None
    root: str = "."  # where relative recipe paths are looked up (besides the working directory)
    # Torch threads of every run. The weights depend on the thread count, so it is part of the spec, the same for
    # any --jobs (a --jobs 2 sweep gives the weights of a --jobs 1 one), and --jobs N uses N x threads cores.
    threads: int = 1

    @classmethod
    def from_dict(cls, spec: Mapping[str, Any], root: str | Path = ".") -> "SweepSpec":
        """Validate the spec's keys and read its recipes (relative paths: the working directory, then ``root``)."""
        unknown = sorted(set(spec) - set(SPEC_KEYS))
        if unknown:
            raise SweepError(f"unknown sweep spec keys {unknown}; known keys: {list(SPEC_KEYS)}")
        extract = dict(spec["extract"]) if spec.get("extract") else None
        cache = _cache_path(spec, extract)
        if not spec.get("out"):
            raise SweepError("a sweep spec needs `out: RUNS_DIR` (one directory per run is made below it)")
        grid = _grid(spec.get("grid") or {})
        runs = [dict(r) for r in (spec.get("runs") or [])]
        for run in runs:  # fail on a missing recipe now, not after other runs trained
            _recipe_defaults(run.get("recipe"), Path(root))
        return cls(cache=str(cache), out=str(spec["out"]), base=dict(spec.get("base") or {}),
                   defaults=_recipe_defaults(spec.get("recipe"), Path(root)), grid=grid, runs=runs,
                   extract=extract, root=str(root), threads=_threads(spec.get("threads", cls.threads)))

    @classmethod
    def load(cls, path: str | Path) -> "SweepSpec":
        """Read a spec YAML file; a ``recipe:`` path is tried relative to the working directory, then the file."""
        return cls.from_dict(load_yaml(path), root=Path(path).parent)


def _cache_path(spec: Mapping[str, Any], extract: dict[str, Any] | None) -> str:
    """``cache:``, or the ``out:`` of the ``extract:`` section (which then must agree with it)."""
    cache = spec.get("cache") or (extract or {}).get("out")
    if not cache:
        raise SweepError("a sweep spec needs `cache: PATH` (or `extract:` with an `out:` path)")
    if extract is not None:
        extract.setdefault("out", cache)
        if str(extract["out"]) != str(cache):
            raise SweepError(f"extract.out {extract['out']!r} differs from cache {cache!r}; give one path")
    return str(cache)


def _threads(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise SweepError(f"threads must be a whole number >= 1 (torch threads per run), got {value!r}")
    return value


def _grid(grid: Mapping[str, Any]) -> dict[str, list[Any]]:
    bad = [k for k, v in grid.items() if not isinstance(v, list) or not v]
    if bad:
        raise SweepError(f"grid values must be non-empty lists; fix {bad} (e.g. `lr: [0.001, 0.0005]`)")
    return dict(grid)


def _recipe_defaults(recipe: str | None, root: Path) -> dict[str, Any]:
    if not recipe:
        return {}
    path = Path(recipe)
    if not path.is_file() and not path.is_absolute():
        path = root / recipe
    if not path.is_file():
        raise SweepError(f"recipe {recipe!r} not found (looked at {str(path)!r}); recipes live in train/<method>/")
    return load_yaml(path)


def set_override(config: dict[str, Any], key: str, value: Any) -> None:
    """Set ``key`` in a config dict; dotted keys reach into dicts (``method_args.temperature``)."""
    head, _, rest = key.partition(".")
    if not rest:
        config[head] = copy.deepcopy(value)
        return
    inner = config.get(head)
    if inner is None:
        inner = config[head] = {}
    if not isinstance(inner, dict):
        raise SweepError(f"cannot set {key!r}: {head!r} is {inner!r}, not a mapping")
    set_override(inner, rest, value)


def _flatten(overrides: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in overrides.items():
        if isinstance(value, Mapping) and value:
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _format_value(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_format_value(v) for v in value) + "]"
    return str(value)


def run_name(overrides: Mapping[str, Any]) -> str:
    """Readable, filesystem-safe, stable name: ``{"method": "nkd", "lr": 1e-3}`` -> ``method=nkd,lr=0.001``.

    Nested mappings flatten to dotted keys (``method_args.temperature=2``).
    """
    if not overrides:
        return "base"
    return _sanitize(",".join(f"{k}={_format_value(v)}" for k, v in _flatten(overrides).items()))


def _sanitize(text: str) -> str:
    # Keep names readable but safe as one path component on every OS (no '/', ':', spaces, braces).
    text = re.sub(r"[^A-Za-z0-9._+=,\-]", "_", text)[:200]
    if text in ("", ".", ".."):
        raise SweepError(f"run name {text!r} is not a usable directory name; give the run a `name:`")
    return text


def expand_runs(spec: SweepSpec) -> list[RunPlan]:
    """Every run of the spec, each validated, in a stable order (``runs`` list x ``grid`` product)."""
    keys = list(spec.grid)
    points = [dict(zip(keys, combo)) for combo in itertools.product(*(spec.grid[k] for k in keys))] or [{}]
    plans, seen = [], {}
    for entry in spec.runs or [{}]:
        entry = dict(entry)
        given, recipe = entry.pop("name", None), entry.pop("recipe", None)
        if recipe is not None and given is None:
            given = Path(recipe).parent.name + "_" + Path(recipe).stem  # vitkd_deit_tiny_from_deit3_small
        for point in points:
            overrides = {**entry, **point}
            name = _plan_name(given, overrides, point)
            if name in seen:
                raise SweepError(f"two runs share the name {name!r} ({seen[name]} and {overrides}); "
                                 "give each `runs:` entry a distinct `name:`")
            seen[name] = overrides
            plans.append(RunPlan(name, _build_config(spec, name, overrides, recipe)))
    return plans


def _plan_name(given: str | None, overrides: Mapping[str, Any], point: Mapping[str, Any]) -> str:
    """The overrides' name, or the entry's ``name:`` followed by the grid point's."""
    if given is None:
        return run_name(overrides)
    return _sanitize(str(given)) + ("," + run_name(point) if point else "")


def _build_config(spec: SweepSpec, name: str, overrides: Mapping[str, Any], recipe: str | None = None
                  ) -> TrainConfig:
    """Precedence, lowest first: top-level recipe, the run's recipe, ``base``, the run's overrides, the grid point."""
    values = copy.deepcopy({**spec.defaults, **_recipe_defaults(recipe, Path(spec.root)), **spec.base})
    for key, value in overrides.items():
        set_override(values, key, value)
    values["cache"] = spec.cache
    values["out"] = str(Path(spec.out) / name)
    try:
        config = from_dict(TrainConfig, values)
        config.validate()
        check_method_args(config.method, config.method_args)
    except (ValueError, KeyError, TypeError) as err:
        raise SweepError(f"run {name!r} has an invalid config: {err}") from None
    return config


def check_method_args(method: str, method_args: Mapping[str, Any]) -> None:
    """Check a method spec's arguments name real ``__init__`` parameters, without building anything.

    A single method takes flat arguments (``{"temperature": 2}``); a composite (``vitkd+nkd``) takes one
    mapping per part (``{"vitkd": {...}, "nkd": {"gamma": 1.0}}``). The split is the one ``train`` uses
    (:func:`featcache.methods.task.method_specs`), so the sweep checks what training will do.

    Raises:
        ConfigError: naming the unknown method, the unknown argument, or listing the method's parameters.
    """
    for spec in method_specs(method, method_args):
        params = [p for p in inspect.signature(spec.cls.__init__).parameters if p not in ("self", "ctx")]
        unknown = sorted(set(spec.kwargs) - set(params))
        if unknown:
            raise ConfigError(f"method {spec.name!r} has no argument(s) {unknown}; its arguments are {params}")
