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
    threads: 1                           # optional: torch threads of every run, whatever --jobs is (default 1)

``spec`` expands it into named, validated runs; ``cache`` makes sure the cache exists (extracting it only when it
does not); ``jobs`` trains the runs. A re-run finds its finished runs (``final.json`` present) and skips them, and
resumes a run with checkpoints (:func:`featcache.rundir.run_status`). Only the stage-2 trainer reads the cache; the
teacher is never built unless a run asks for ``online_teacher`` or the cache must be extracted first.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable, Mapping

from .. import rundir
from ..config import load_yaml, to_dict
from ..errors import SweepError
from .cache import cache_status, ensure_cache, extract_mismatch
from .jobs import Job, ProgressMonitor, TrainFn, run_jobs
from .spec import SPEC_KEYS, RunPlan, SweepSpec, check_method_args, expand_runs, run_name, set_override

Log = Callable[[str], None]


def run_sweep(spec: SweepSpec | str | Path, jobs: int = 1, train_fn: TrainFn | None = None, report: bool = True,
              fail_fast: bool = False, raise_failures: bool = True, log: Log = print) -> dict[str, Any]:
    """Run a sweep: validate every run, make sure the cache exists, train the unfinished runs, report.

    Args:
        spec: a :class:`SweepSpec` or the path of a spec YAML file.
        jobs: trainings at once (separate processes reading the same cache); each trains with the spec's
            ``threads`` torch threads, so the weights do not depend on ``jobs``.
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
    _note_online(plans, log)
    todo, results = _todo(plans, log)
    results.update(run_jobs(todo, jobs, train_fn, fail_fast, log, threads=spec.threads))
    paths = _finish(spec, plans, results, report, log)
    failed = {k: v for k, v in results.items() if v.startswith("failed")}
    if failed and raise_failures:
        raise SweepError(f"{len(failed)} of {len(plans)} run(s) failed: {failed}; re-run the sweep to retry them")
    return {"runs": results, "report": paths, "seconds": time.perf_counter() - start}


def _note_online(plans: list[RunPlan], log: Log) -> None:
    online = [p.name for p in plans if p.config.online_teacher]
    if online:
        log(f"note: {len(online)} run(s) build the teacher to run it online, by request: {online}")


def run_state(plan: RunPlan) -> rundir.RunStatus:
    """The run's :func:`featcache.rundir.run_status`, after refusing a config changed under the same name.

    Raises:
        SweepError: when the run directory was made with a config that differs in a non-neutral key.
    """
    saved = plan.dir / rundir.SWEEP_CONFIG
    if saved.is_file():
        differ = rundir.changed_keys(load_yaml(saved), to_dict(plan.config))
        if differ:
            raise SweepError(f"run {plan.name!r} in {str(plan.dir)!r} was made with different {differ}; "
                             "use a new sweep `out:` or delete that run directory")
    return rundir.run_status(plan.dir)


def _todo(plans: list[RunPlan], log: Log) -> tuple[list[Job], dict[str, str]]:
    """The jobs to train (finished runs skipped, runs with a checkpoint resumed) and the skipped runs' results."""
    states = {p.name: run_state(p) for p in plans}
    skipped = {p.name: "skipped" for p in plans if states[p.name] == "done"}
    for name in skipped:
        log(f"[{name}] done, skipped")
    # A run killed before its first checkpoint left logs but nothing to resume from: its job starts it clean.
    todo = [Job(p, resume=states[p.name] == "partial") for p in plans if states[p.name] != "done"]
    return todo, skipped


def _finish(spec: SweepSpec, plans: list[RunPlan], results: Mapping[str, str], report: bool, log: Log
            ) -> dict[str, str] | None:
    width = max(len(p.name) for p in plans)
    log("sweep summary:")
    for p in plans:
        log(f"  {p.name:<{width}}  {results.get(p.name, '?')}")
    if not report:
        return None
    from ..report import write_report

    paths = write_report(spec.out, runs=[p.dir for p in plans], failures=results)
    log(f"report: {paths['md']}  {paths['csv']}  {paths['png']}")
    return paths


__all__ = ["SPEC_KEYS", "Job", "ProgressMonitor", "RunPlan", "SweepError", "SweepSpec", "TrainFn", "cache_status",
           "check_method_args", "ensure_cache", "expand_runs", "extract_mismatch", "run_jobs", "run_name",
           "run_state", "run_sweep", "set_override"]
