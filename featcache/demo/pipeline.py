"""The whole demo in stages: digits -> teacher -> one extraction + the sweep -> timing -> report."""
from __future__ import annotations

import csv
import os
import time
from pathlib import Path
from typing import Any, Callable

from .config import DemoConfig
from .results import Seeded, collect, markdown_table, verdict

Log = Callable[[str], None]


class Stopwatch:
    """Times named stages and prints them as they finish (the demo's per-stage timings)."""

    def __init__(self, log: Log = print):
        self.log, self.times, self.start = log, {}, time.perf_counter()

    def stage(self, name: str, fn: Callable[[], Any]) -> Any:
        self.log(f"\n== {name} ==")
        t0 = time.perf_counter()
        result = fn()
        self.times[name] = time.perf_counter() - t0
        self.log(f"== {name}: {self.times[name]:.1f} s ==")
        return result

    @property
    def total(self) -> float:
        return time.perf_counter() - self.start


def run_demo(cfg: DemoConfig | None = None, jobs: int | None = None, log: Log = print) -> dict[str, Any]:
    """Run the whole demo; returns the report paths, the results, the verdict and per-stage seconds."""
    from ..sweep import run_sweep
    from .digits import write_digits
    from .runs import demo_spec
    from .teacher import ensure_teacher
    from .timing import model_flops, timed_trainings

    cfg = cfg or DemoConfig()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    watch = Stopwatch(log)
    data = out / "digits"
    info = watch.stage("1/5 digits", lambda: write_digits(data, cfg.img_size, cfg.test_fraction, cfg.seed,
                                                            cfg.max_train, cfg.heldout_fraction))
    log(f"digits: {info['train']} train / {info['heldout']} heldout / {info['test']} test images, {cfg.img_size} px, "
        f"in {data}")
    teacher = watch.stage("2/5 teacher", lambda: ensure_teacher(cfg, data, out, log))
    spec = demo_spec(cfg, out, out / "teacher.safetensors")
    jobs = jobs or min(os.cpu_count() or 1, 4)
    sweep = watch.stage("3/5 extract once + sweep", lambda: run_sweep(spec, jobs=jobs, report=False,
                                                                       raise_failures=False, log=log))
    timing = watch.stage("4/5 timing", lambda: timed_trainings(cfg, out, log))
    flops = model_flops(cfg)
    results = watch.stage("5/5 report", lambda: collect(Path(spec.out), list(sweep["runs"]), data / "test"))
    labelled = f" + {cfg.labelled_batch} labelled (distilled runs)" if cfg.labelled_batch else ""
    setting = (f"students: {cfg.label_shots} labels per class + the teacher's targets for {cfg.views} cached views "
               f"of all {info['train']} train images; {cfg.epochs} epochs, batch {cfg.batch_size}{labelled}, "
               f"lr {cfg.lr:g} (warm-up {cfg.warmup_epochs:g} epochs + cosine), seeds {cfg.student_seeds}")
    return {**report(out, cfg, results, teacher["test_top1"], timing, flops, setting, watch, log),
            "failed": {k: v for k, v in sweep["runs"].items() if v.startswith("failed")},
            "teacher_top1": teacher["test_top1"]}


def report(out: Path, cfg: DemoConfig, results: dict[str, Seeded], teacher_top1: float, timing: dict[str, Any],
           flops: dict[str, int], setting: str, watch: Stopwatch, log: Log) -> dict[str, Any]:
    """Print and write the table, the setting, the verdict, the timing and the figure; return what they are made of."""
    from .plot import write_figure
    from .timing import speedup_lines

    table = markdown_table(results, teacher_top1)
    lines = verdict(results, teacher_top1)
    speed = speedup_lines(timing, flops)
    timings = ", ".join(f"{k.split(' ', 1)[1]} {v:.0f} s" for k, v in watch.times.items())
    total = f"total {watch.total:.0f} s ({timings})"
    paths = {"md": out / "demo_report.md", "csv": out / "demo_report.csv", "png": out / "demo_report.png"}
    write_figure(results, teacher_top1, timing, paths["png"])
    _write_csv(results, paths["csv"])
    spread = ("spread: the range (max - min) of a run's test top-1 over its seeds; a gap counts only when the "
              "difference of the means exceeds the larger of the two runs' ranges")
    paths["md"].write_text("\n\n".join([table, setting, spread, "\n".join(lines), "\n".join(speed), total]) + "\n")
    for text in ("\n" + table, setting, spread, "\n".join(lines), "\n".join(speed), "\n" + total):
        log(text)
    log(f"report: {paths['md']}\ntable:  {paths['csv']}\nplot:   {paths['png']}")
    return {"report": {k: str(v) for k, v in paths.items()}, "results": results, "verdict": lines, "speedup": speed,
            "timing": timing, "flops": flops, "seconds": dict(watch.times), "total_s": watch.total}


def _write_csv(results: dict[str, Seeded], path: Path) -> None:
    """One row per run and seed: the numbers the table's means and ranges are made of."""
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["run", "seed", "test_top1", "train_time_s", "note"])
        for r in results.values():
            for seed, top1 in sorted(r.top1.items()):
                writer.writerow([r.run, seed, f"{top1:.2f}", f"{r.train_s.get(seed, float('nan')):.1f}", r.note])
