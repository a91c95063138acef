"""Sweeps: one cache, many students. Expand a spec into runs, train the unfinished ones, then report.

A sweep spec is YAML (no code, no tags)::

    cache: caches/deit3s_16shot          # the cache every run reads
    extract: {data: ..., teacher: ...}   # optional: ExtractConfig fields; run first unless the cache is complete
    recipe: train/vitkd/deit_tiny_from_deit3_small.yaml   # optional: TrainConfig defaults from a recipe
    base: {epochs: 30}                   # TrainConfig fields for every run, over the recipes
    grid: {method: [kd, nkd], lr: [1e-3, 5e-4]}           # cartesian product
    runs:                                # explicit list (each entry crossed with the grid)
      - {name: online-kd, method: kd, online_teacher: true}
      - {recipe: train/nkd/deit_tiny_from_deit3_small.yaml}   # a run may bring its own recipe
    out: runs/my_sweep                   # one directory per run below this

Precedence, lowest first: top-level recipe, the run's recipe, ``base``, the run's fields, the grid point.
Run names come from the overrides alone (``method=nkd,lr=0.0005``; a run recipe gives
``nkd_deit_tiny_from_deit3_small``; ``name:`` wins), so they are stable across re-runs and
a re-run finds its finished runs (``final.json`` present) and skips them; a run with checkpoints resumes.
Only the stage-2 trainer reads the cache; the teacher is never built unless a run asks for
``online_teacher`` or the cache must be extracted first.
"""
from __future__ import annotations

import copy
import dataclasses
import inspect
import itertools
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import yaml

from ._sweep import TrainFn, cache_status, execute, extract_mismatch
from .config import ExtractConfig, TrainConfig, from_dict, load_yaml, to_dict
from .errors import SweepError

SPEC_KEYS = ("cache", "extract", "recipe", "base", "grid", "runs", "out")
#: Written by the sweep into each run directory: the config it asked for (the engine's config.yaml is resolved).
SPEC_FILE = "sweep_run.yaml"
#: Fields that may change between re-runs of the same run without making it a different run.
VOLATILE_KEYS = ("resume", "workers", "log_every")


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
    """A parsed sweep spec (see the module docstring)."""

    cache: str
    out: str
    base: dict[str, Any] = field(default_factory=dict)  # fields for every run (over the recipes)
    defaults: dict[str, Any] = field(default_factory=dict)  # the top-level recipe's fields
    grid: dict[str, list[Any]] = field(default_factory=dict)
    runs: list[dict[str, Any]] = field(default_factory=list)
    extract: dict[str, Any] | None = None
    root: str = "."  # where relative recipe paths are looked up (besides the working directory)

    @classmethod
    def from_dict(cls, spec: Mapping[str, Any], root: str | Path = ".") -> "SweepSpec":
        """Validate the spec's keys and read its recipes (relative paths: the working directory, then ``root``)."""
        unknown = sorted(set(spec) - set(SPEC_KEYS))
        if unknown:
            raise SweepError(f"unknown sweep spec keys {unknown}; known keys: {list(SPEC_KEYS)}")
        extract = dict(spec["extract"]) if spec.get("extract") else None
        cache = spec.get("cache") or (extract or {}).get("out")
        if not cache:
            raise SweepError("a sweep spec needs `cache: PATH` (or `extract:` with an `out:` path)")
        if extract is not None:
            extract.setdefault("out", cache)
            if str(extract["out"]) != str(cache):
                raise SweepError(f"extract.out {extract['out']!r} differs from cache {cache!r}; give one path")
        if not spec.get("out"):
            raise SweepError("a sweep spec needs `out: RUNS_DIR` (one directory per run is made below it)")
        grid = spec.get("grid") or {}
        bad = [k for k, v in grid.items() if not isinstance(v, list) or not v]
        if bad:
            raise SweepError(f"grid values must be non-empty lists; fix {bad} (e.g. `lr: [0.001, 0.0005]`)")
        runs = [dict(r) for r in (spec.get("runs") or [])]
        for run in runs:  # fail on a missing recipe now, not after other runs trained
            _recipe_defaults(run.get("recipe"), Path(root))
        return cls(cache=str(cache), out=str(spec["out"]), base=dict(spec.get("base") or {}),
                   defaults=_recipe_defaults(spec.get("recipe"), Path(root)), grid=dict(grid), runs=runs,
                   extract=extract, root=str(root))

    @classmethod
    def load(cls, path: str | Path) -> "SweepSpec":
        """Read a spec YAML file; a ``recipe:`` path is tried relative to the working directory, then the file."""
        path = Path(path)
        spec = load_yaml(path)
        return cls.from_dict(spec, root=path.parent)


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
    entries = spec.runs or [{}]
    plans, seen = [], {}
    for entry in entries:
        entry = dict(entry)
        given = entry.pop("name", None)
        recipe = entry.pop("recipe", None)
        if recipe is not None and given is None:
            given = Path(recipe).parent.name + "_" + Path(recipe).stem  # vitkd_deit_tiny_from_deit3_small
        for point in points:
            overrides = {**entry, **point}
            name = run_name(overrides) if given is None else _sanitize(str(given)) + (
                "," + run_name(point) if point else "")
            if name in seen:
                raise SweepError(f"two runs share the name {name!r} ({seen[name]} and {overrides}); "
                                 "give each `runs:` entry a distinct `name:`")
            seen[name] = overrides
            plans.append(RunPlan(name, _build_config(spec, name, overrides, recipe)))
    return plans


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
    mapping per part (``{"vitkd": {...}, "nkd": {"gamma": 1.0}}``).

    Raises:
        ValueError: naming the unknown argument and listing the method's parameters.
    """
    from ._engine import split_method_args  # the engine's own split, so the sweep checks what train will do
    from .methods import METHODS, parse_method_spec

    per_method = split_method_args([name for name, _ in parse_method_spec(method)], method_args)
    for name, args in per_method.items():
        params = [p for p in inspect.signature(METHODS.get(name).__init__).parameters if p not in ("self", "ctx")]
        unknown = sorted(set(args) - set(params))
        if unknown:
            raise ValueError(f"method {name!r} has no argument(s) {unknown}; its arguments are {params}")


# --------------------------------------------------------------------------------------------------------------
# Stage 1: make sure the cache exists (and never build the teacher when it does)
# --------------------------------------------------------------------------------------------------------------

def ensure_cache(spec: SweepSpec, log: Callable[[str], None] = print) -> None:
    """Use the sweep's cache as it is when complete (the teacher is not built); otherwise extract it first."""
    complete, manifest = cache_status(spec.cache)
    extract = _extract_config(spec)
    if complete:
        if extract is not None:
            differ = extract_mismatch(extract, manifest)
            if differ:
                raise SweepError(f"the complete cache at {spec.cache!r} was extracted with different {differ} than "
                                 "the spec's `extract:`; point `cache:` at a new path, or set extract.overwrite")
        log(f"cache complete: the teacher will not be run ({spec.cache})")
        return
    if extract is None:
        state = "is incomplete" if manifest is not None else "does not exist"
        raise SweepError(f"cache {spec.cache!r} {state}; add an `extract:` section to the spec, or run "
                         "`featcache extract --out` with that path first")
    from .extract import run_extract

    log(f"cache {spec.cache!r} {'is incomplete' if manifest is not None else 'is missing'}: extracting it once")
    run_extract(extract)


def _extract_config(spec: SweepSpec) -> ExtractConfig | None:
    if spec.extract is None:
        return None
    try:
        config = from_dict(ExtractConfig, spec.extract)
        config.validate()
    except ValueError as err:
        raise SweepError(f"the spec's `extract:` section is invalid: {err}") from None
    return config


# --------------------------------------------------------------------------------------------------------------
# Stage 2: train every unfinished run
# --------------------------------------------------------------------------------------------------------------

def run_state(plan: RunPlan) -> str:
    """``done`` (final.json exists), ``resume`` (checkpoints exist) or ``new``; refuses a changed config."""
    saved = plan.dir / SPEC_FILE
    if saved.is_file():
        old = {k: v for k, v in load_yaml(saved).items() if k not in VOLATILE_KEYS}
        new = {k: v for k, v in to_dict(plan.config).items() if k not in VOLATILE_KEYS}
        differ = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
        if differ:
            raise SweepError(f"run {plan.name!r} in {str(plan.dir)!r} was made with different {differ}; "
                             "use a new sweep `out:` or delete that run directory")
    if (plan.dir / "final.json").is_file():
        return "done"
    # A checkpoint counts once its state file is written (the engine writes it last).
    return "resume" if any(plan.dir.glob("checkpoints/step_*/featcache_state.json")) else "new"


def _clear_partial(plan: RunPlan) -> None:
    """A run killed before its first checkpoint left logs but nothing to resume from: start it clean."""
    if plan.dir.is_dir():
        for leftover in plan.dir.iterdir():
            shutil.rmtree(leftover) if leftover.is_dir() else leftover.unlink()


def _prepare(plan: RunPlan, state: str) -> TrainConfig:
    """Record the config the sweep asks for in the run directory; set ``resume``."""
    plan.dir.mkdir(parents=True, exist_ok=True)
    (plan.dir / SPEC_FILE).write_text(yaml.safe_dump(to_dict(plan.config), sort_keys=False))
    return dataclasses.replace(plan.config, resume=state == "resume")


def run_sweep(spec: SweepSpec | str | Path, jobs: int = 1, train_fn: TrainFn | None = None,
              report: bool = True, fail_fast: bool = False, raise_failures: bool = True,
              log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run a sweep: validate every run, make sure the cache exists, train the unfinished runs, report.

    Args:
        spec: a :class:`SweepSpec` or the path of a spec YAML file.
        jobs: trainings at once (separate processes reading the same cache; torch threads split between them).
        train_fn: the trainer, ``featcache.engine.train`` by default (tests inject a wrapper; with ``jobs > 1``
            it must be a module-level function so it pickles by name).
        report: write ``report.md/.csv/.png`` into the sweep's ``out`` at the end.
        fail_fast: stop at the first failed run instead of finishing the others.
        raise_failures: raise :class:`SweepError` at the end if a run failed (else only return its status).
        log: where progress lines go.

    Returns:
        ``{"runs": {name: "done" | "skipped" | "failed: ..."}, "report": paths or None, "seconds": float}``.

    Raises:
        SweepError: on an invalid spec or config (before any training), or when runs failed (after the rest ran).
    """
    spec = SweepSpec.load(spec) if isinstance(spec, (str, Path)) else spec
    start = time.perf_counter()
    plans = expand_runs(spec)  # validates every config before anything runs
    log(f"sweep: {len(plans)} run(s) -> {spec.out}")
    ensure_cache(spec, log)
    online = [p.name for p in plans if p.config.online_teacher]
    if online:
        log(f"note: {len(online)} run(s) build the teacher to run it online, by request: {online}")
    states = {p.name: run_state(p) for p in plans}
    for p in plans:
        if states[p.name] == "done":
            log(f"[{p.name}] done, skipped")
    todo = [p for p in plans if states[p.name] != "done"]
    for plan in todo:
        if states[plan.name] == "new":
            _clear_partial(plan)
    results = {p.name: "skipped" for p in plans if states[p.name] == "done"}
    results.update(execute(todo, states, _prepare, jobs, train_fn, fail_fast, log))
    paths = _finish(spec, plans, results, report, log)
    failed = {k: v for k, v in results.items() if v.startswith("failed")}
    if failed and raise_failures:
        raise SweepError(f"{len(failed)} of {len(plans)} run(s) failed: {failed}; re-run the sweep to retry them")
    return {"runs": results, "report": paths, "seconds": time.perf_counter() - start}


def _finish(spec: SweepSpec, plans: list[RunPlan], results: Mapping[str, str], report: bool,
            log: Callable[[str], None]) -> dict[str, str] | None:
    width = max(len(p.name) for p in plans)
    log("sweep summary:")
    for p in plans:
        log(f"  {p.name:<{width}}  {results.get(p.name, '?')}")
    if not report:
        return None
    from .report import write_report

    paths = write_report(spec.out, runs=[p.dir for p in plans])
    log(f"report: {paths['md']}  {paths['csv']}  {paths['png']}")
    return paths
