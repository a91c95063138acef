"""Running a sweep's trainings: one after the other in this process, or ``--jobs N`` at once in worker processes,
with progress lines read from each run's ``metrics.jsonl`` while they train.

A :class:`Job` is one run to train now. It locks its run directory before touching it (so a re-run never clears a
directory another live process is writing), then records the config the sweep asked for, so a run the sweep never
reached leaves nothing behind. Every run trains with the same torch thread budget whatever ``--jobs`` is, because
the weights depend on the thread count; ``--jobs N`` workers exit with the sweep's process, however it ends.
"""
from __future__ import annotations

import dataclasses
import multiprocessing
import os
import shutil
import signal
import sys
import threading
import time
from concurrent.futures import Future, ProcessPoolExecutor, as_completed
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping

from .. import locks, rundir
from ..config import TrainConfig
from .spec import RunPlan

TrainFn = Callable[[TrainConfig], dict]
Log = Callable[[str], None]

#: prctl(2) option: the signal the kernel sends this process when its parent exits (Linux).
PR_SET_PDEATHSIG = 1


@dataclass
class Job:
    """One run to train: its plan, and whether it continues from a checkpoint."""

    plan: RunPlan
    resume: bool = False
    quiet: bool = False  # no console output (--jobs N: side by side); train.log is still written

    @property
    def name(self) -> str:
        return self.plan.name

    def start(self) -> TrainConfig:
        """Record the config the sweep asks for in the run directory; return it with ``resume`` (and ``quiet``) set."""
        self.plan.dir.mkdir(parents=True, exist_ok=True)
        rundir.write_config(self.plan.dir, self.plan.config, rundir.SWEEP_CONFIG)
        return dataclasses.replace(self.plan.config, resume=self.resume, quiet=self.quiet or self.plan.config.quiet)

    @contextmanager
    def claim(self) -> Iterator[TrainConfig]:
        """Hold the run directory's lock for the job; a fresh (not resumed) job first clears what a run killed before
        its first checkpoint left there. Yields :meth:`start`'s config.

        Raises:
            LockedError: another process holds the run directory (its PID is named); nothing in it is touched.
        """
        with locks.hold(self.plan.dir / rundir.LOCK_FILE, self.plan.dir, "featcache sweep"):
            if not self.resume:
                clear_run(self.plan)
            yield self.start()


def clear_run(plan: RunPlan) -> None:
    """Delete a run directory's contents but its lock file (another writer would lock a new one)."""
    if plan.dir.is_dir():
        for leftover in plan.dir.iterdir():
            if leftover.name != rundir.LOCK_FILE:
                shutil.rmtree(leftover) if leftover.is_dir() else leftover.unlink()


def train_one(job: Job, train_fn: TrainFn | None = None, threads: int = 1) -> dict:
    """Train one job with ``threads`` torch threads, restored afterwards (also the entry point of ``--jobs N``
    workers: module level, so it pickles by name)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with job.claim() as config:
            if train_fn is None:
                from ..engine import train as train_fn
            return train_fn(config)
    finally:
        torch.set_num_threads(before)


def die_with_parent(parent: int) -> None:
    """``--jobs N`` worker initializer: exit when the sweep's process exits, SIGKILL included, so no orphan goes on
    writing a run directory. Linux: the kernel's parent-death signal; everywhere, and as a backstop, a thread that
    watches the parent PID."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL))
    if os.getppid() != parent:  # the parent died before the signal was armed
        os._exit(1)
    threading.Thread(target=_watch_parent, args=(parent,), daemon=True, name="featcache-parent-watch").start()


def _watch_parent(parent: int, interval: float = 0.5) -> None:
    while os.getppid() == parent:
        time.sleep(interval)
    os.kill(os.getpid(), signal.SIGKILL)


class ProgressMonitor(threading.Thread):
    """Prints the evaluations the engine appends to each run's ``metrics.jsonl`` while the runs train.

    Works the same for one in-process run and for ``--jobs N`` worker processes, whose own output interleaves.
    """

    def __init__(self, plans: list[RunPlan], log: Log, interval: float = 2.0):
        super().__init__(daemon=True)
        self.plans, self.log, self.interval = plans, log, interval
        self.tails = {p.name: rundir.MetricsTail(p.dir) for p in plans}
        self.shown = {p.name: -1 for p in plans}  # last epoch printed: a resumed run's old records stay quiet
        self.halt = threading.Event()
        self.lock = threading.Lock()  # poll() runs on this thread and, before "done" lines, on the caller's
        for plan in plans:  # what killed runs logged before this sweep started counts as shown
            for record in self.tails[plan.name].read():
                self._show(plan, record, quiet=True)

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
                for record in self.tails[plan.name].read():
                    self._show(plan, record)

    def _show(self, plan: RunPlan, record: Mapping[str, Any], quiet: bool = False) -> None:
        epoch = int(record.get("epoch", 0))
        if record.get("kind") == "eval" and record.get("top1") is not None and epoch > self.shown[plan.name]:
            self.shown[plan.name] = epoch
            if not quiet:
                self.log(f"[{plan.name}] epoch {epoch + 1}/{plan.config.epochs}: top-1 {record['top1']:.1f} %")


def run_jobs(jobs: list[Job], processes: int = 1, train_fn: TrainFn | None = None, fail_fast: bool = False,
             log: Log = print, threads: int = 1) -> dict[str, str]:
    """Train every job (``processes`` at a time, ``threads`` torch threads each), printing progress; returns
    ``{name: "done" | "failed: ..."}``.

    Raises:
        Exception: the first failure, re-raised, when ``fail_fast``; otherwise failures are only recorded.
    """
    if not jobs:
        log("nothing to train: every run is finished")
        return {}
    monitor = ProgressMonitor([j.plan for j in jobs], log)
    monitor.start()

    def ordered_log(message: str) -> None:  # a run's last epochs first, then its result line
        monitor.poll()
        log(message)

    try:
        if processes <= 1 or len(jobs) == 1:
            return _run_serial(jobs, train_fn, fail_fast, ordered_log, threads)
        return _run_parallel(jobs, processes, train_fn, fail_fast, ordered_log, threads)
    finally:
        monitor.stop()


def _run_serial(jobs: list[Job], train_fn: TrainFn | None, fail_fast: bool, log: Log, threads: int
                ) -> dict[str, str]:
    results: dict[str, str] = {}
    for i, job in enumerate(jobs, 1):
        log(f"[{job.name}] {'resuming' if job.resume else 'training'} ({i}/{len(jobs)})")
        try:
            _record_done(results, job, train_one(job, train_fn, threads), log)
        except Exception as err:  # one broken run must not lose the others' work
            _record_failure(results, job, err, log)
            if fail_fast:
                raise
    return results


def _run_parallel(jobs: list[Job], processes: int, train_fn: TrainFn | None, fail_fast: bool, log: Log,
                  threads: int) -> dict[str, str]:
    log(f"running {min(processes, len(jobs))} trainings at once, {threads} torch thread(s) each")
    results: dict[str, str] = {}
    context = multiprocessing.get_context("spawn")  # fork + torch threads can deadlock
    with ProcessPoolExecutor(max_workers=processes, mp_context=context, initializer=die_with_parent,
                             initargs=(os.getpid(),)) as pool:
        # Runs side by side would draw their bars over one another: each keeps its lines in its own train.log.
        futures = {pool.submit(train_one, dataclasses.replace(job, quiet=True), train_fn, threads): job
                   for job in jobs}
        for future in as_completed(futures):
            try:
                _record_done(results, futures[future], future.result(), log)
            except Exception as err:
                _record_failure(results, futures[future], err, log)
                if fail_fast:
                    _cancel(futures)
                    raise
    return results


def _cancel(futures: Mapping[Future, Job]) -> None:
    for future in futures:
        future.cancel()


def _record_done(results: dict[str, str], job: Job, final: Any, log: Log) -> None:
    results[job.name] = "done"
    log(f"[{job.name}] done: top-1 {_fmt_top1(final)}")


def _record_failure(results: dict[str, str], job: Job, err: Exception, log: Log) -> None:
    results[job.name] = f"failed: {type(err).__name__}: {err}"
    log(f"[{job.name}] FAILED: {type(err).__name__}: {err}")


def _fmt_top1(final: Any) -> str:
    top1 = final.get("top1") if isinstance(final, Mapping) else None
    return f"{top1:.2f}" if isinstance(top1, (int, float)) else "n/a"
