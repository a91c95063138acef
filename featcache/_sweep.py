"""The sweep's machinery: the cache check (read from the manifest, never from a teacher) and the runners (one
training per run, in this process or in ``--jobs N`` worker processes, with progress).

Private to :mod:`featcache.sweep`; split out to keep each module small.
"""
from __future__ import annotations

import json
import multiprocessing
import os
import threading
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping

from .config import ExtractConfig, TrainConfig

if TYPE_CHECKING:
    from .sweep import RunPlan

TrainFn = Callable[[TrainConfig], dict]
Prepare = Callable[["RunPlan", str], TrainConfig]


def cache_status(path: str | Path) -> tuple[bool, Any]:
    """``(complete, manifest)`` of the cache at ``path``; ``(False, None)`` if there is none."""
    from .errors import CacheError
    from .stores.base import open_reader

    if not Path(path).exists():
        return False, None
    try:
        reader = open_reader(path, require_complete=False)
    except CacheError:
        return False, None
    return reader.manifest.complete, reader.manifest


def extract_mismatch(extract: ExtractConfig, manifest: Mapping[str, Any]) -> list[str]:
    """Fields of an extraction config that disagree with an existing cache's manifest, read without a teacher.

    Only what the config states is compared (``None`` fields, e.g. a default ``img_size``, are not).
    """
    teacher = manifest.get("teacher", {})
    num_blocks = int(teacher.get("num_blocks", 0)) or 1
    subset, views, storage = manifest.get("subset", {}), manifest.get("views", {}), manifest.get("storage", {})
    checks = {
        "teacher": (extract.teacher, teacher.get("name")),
        "pretrained": (extract.pretrained, teacher.get("pretrained")),
        "checkpoint": (_abs(extract.checkpoint), _abs(teacher.get("checkpoint"))),
        "layers": (sorted(i % num_blocks for i in extract.layers), sorted(manifest.get("layers", []))),
        "img_size": (extract.img_size, manifest.get("img_size") if extract.img_size is not None else None),
        "shots": (extract.shots, subset.get("shots")),
        "fraction": (extract.fraction, subset.get("fraction")),
        "subset_seed": (extract.subset_seed, subset.get("subset_seed", extract.subset_seed)),
        "views": (extract.views, views.get("count")),
        "seed": (extract.seed, views.get("seed", extract.seed)),
        "view recipe": (_view_recipe(extract, manifest), views.get("recipe")),
        "format": (extract.format, storage.get("format", extract.format)),
        "dtype": (extract.dtype, storage.get("dtype", extract.dtype)),
    }
    return [k for k, (want, have) in checks.items() if want != have]


def _view_recipe(extract: ExtractConfig, manifest: Mapping[str, Any]) -> dict[str, Any] | None:
    """The view recipe ``extract`` would record, built from the manifest's geometry (no teacher needed)."""
    from .views import default_recipe

    interpolation = manifest.get("normalization", {}).get("interpolation")
    if interpolation is None or manifest.get("img_size") is None:
        return manifest.get("views", {}).get("recipe")  # nothing to compare against: not a mismatch
    recipe = default_recipe(int(extract.img_size or manifest["img_size"]), extract.scale, extract.ratio, extract.hflip,
                            extract.color_jitter, interpolation=interpolation)
    return json.loads(json.dumps(recipe.to_dict()))  # tuples -> lists, as the manifest stores them


def _abs(path: str | None) -> str | None:
    return str(Path(path).resolve()) if path else None



def _train_one(config: TrainConfig, train_fn: TrainFn | None, threads: int | None) -> dict:
    """Body of one run (also the worker entry point of ``--jobs N``: module level, so it pickles by name)."""
    if threads:
        import torch

        torch.set_num_threads(threads)
    if train_fn is None:
        from .engine import train as train_fn
    return train_fn(config)


class ProgressMonitor(threading.Thread):
    """Prints the evaluations the engine appends to each run's ``metrics.jsonl`` while the runs train.

    Works the same for one in-process run and for ``--jobs N`` worker processes, whose own output interleaves.
    """

    def __init__(self, plans: list["RunPlan"], log: Callable[[str], None], interval: float = 2.0):
        super().__init__(daemon=True)
        self.plans, self.log, self.interval = plans, log, interval
        self.offsets = {p.name: 0 for p in plans}
        self.shown = {p.name: -1 for p in plans}  # last epoch printed: a resumed run's old records stay quiet
        self.halt = threading.Event()
        self.lock = threading.Lock()  # poll() runs on this thread and, before "done" lines, on the caller's
        quiet, self.log = self.log, lambda message: None
        self.poll()  # skip what killed runs logged before this sweep started
        self.log = quiet

    def run(self) -> None:
        while not self.halt.wait(self.interval):
            self.poll()

    def stop(self) -> None:
        self.halt.set()
        self.join()
        self.poll()

    def poll(self) -> None:
        with self.lock:
            for plan in self.plans:
                self._poll_one(plan)

    def _poll_one(self, plan: "RunPlan") -> None:
        path = plan.dir / "metrics.jsonl"
        try:
            size = path.stat().st_size
            start = self.offsets[plan.name] if size >= self.offsets[plan.name] else 0  # truncated on resume
            with open(path, "rb") as fh:
                fh.seek(start)
                data = fh.read()
        except OSError:
            return
        end = data.rfind(b"\n") + 1  # only whole lines: the engine may be mid-write
        self.offsets[plan.name] = start + end
        for line in data[:end].decode(errors="replace").splitlines():
            self._show(plan, line)

    def _show(self, plan: "RunPlan", line: str) -> None:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            return
        epoch = int(record.get("epoch", 0))
        if record.get("kind") == "eval" and record.get("top1") is not None and epoch > self.shown[plan.name]:
            self.shown[plan.name] = epoch
            self.log(f"[{plan.name}] epoch {epoch + 1}/{plan.config.epochs}: "
                     f"top-1 {record['top1']:.1f} %")


def execute(todo: list["RunPlan"], states: Mapping[str, str], prepare: Prepare, jobs: int,
            train_fn: TrainFn | None, fail_fast: bool, log: Callable[[str], None]) -> dict[str, str]:
    """Train every plan of ``todo`` (``prepare`` records each and returns its config); ``{name: status}``."""
    if not todo:
        log("nothing to train: every run is finished")
        return {}
    monitor = ProgressMonitor(todo, log)
    monitor.start()

    def ordered_log(message: str) -> None:  # a run's last epochs first, then its result line
        monitor.poll()
        log(message)

    try:
        if jobs <= 1 or len(todo) == 1:
            return _execute_serial(todo, states, prepare, train_fn, fail_fast, ordered_log)
        return _execute_parallel(todo, states, prepare, jobs, train_fn, fail_fast, ordered_log)
    finally:
        monitor.stop()


def _execute_serial(todo, states, prepare, train_fn, fail_fast, log) -> dict[str, str]:
    results = {}
    for i, plan in enumerate(todo, 1):
        log(f"[{plan.name}] {'resuming' if states[plan.name] == 'resume' else 'training'} ({i}/{len(todo)})")
        try:
            final = _train_one(prepare(plan, states[plan.name]), train_fn, None)
            results[plan.name] = "done"
            log(f"[{plan.name}] done: top-1 {_fmt_top1(final)}")
        except Exception as err:  # one broken run must not lose the others' work
            results[plan.name] = f"failed: {type(err).__name__}: {err}"
            log(f"[{plan.name}] FAILED: {type(err).__name__}: {err}")
            if fail_fast:
                raise
    return results


def _execute_parallel(todo, states, prepare, jobs, train_fn, fail_fast, log) -> dict[str, str]:
    threads = max(1, (os.cpu_count() or 1) // jobs)
    log(f"running {min(jobs, len(todo))} trainings at once, {threads} torch thread(s) each")
    results = {}
    context = multiprocessing.get_context("spawn")  # fork + torch threads can deadlock
    with ProcessPoolExecutor(max_workers=jobs, mp_context=context) as pool:
        futures = {pool.submit(_train_one, prepare(p, states[p.name]), train_fn, threads): p for p in todo}
        for future in as_completed(futures):
            plan = futures[future]
            try:
                final = future.result()
                results[plan.name] = "done"
                log(f"[{plan.name}] done: top-1 {_fmt_top1(final)}")
            except Exception as err:
                results[plan.name] = f"failed: {type(err).__name__}: {err}"
                log(f"[{plan.name}] FAILED: {type(err).__name__}: {err}")
                if fail_fast:
                    for f in futures:
                        f.cancel()
                    raise
    return results


def _fmt_top1(final: Any) -> str:
    top1 = final.get("top1") if isinstance(final, Mapping) else None
    return f"{top1:.2f}" if isinstance(top1, (int, float)) else "n/a"
