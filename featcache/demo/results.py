"""The demo's numbers: test top-1 per run and seed, their mean and spread per run, and the verdict from them.

Spread, everywhere in the demo: the range (max - min) of a run's test top-1 over its seeds (0 with one seed). A gap
between two runs counts only when the difference of their means exceeds the larger of their two ranges.
"""
from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .runs import BASELINE, FRESH_ONLINE, ONLINE, TABLE_ORDER, TEACHER_INIT, base_name, seed_of


@dataclass
class Seeded:
    """One run's results over its seeds."""

    run: str
    top1: dict[int, float] = field(default_factory=dict)  # seed -> final test top-1 (%)
    train_s: dict[int, float] = field(default_factory=dict)
    curves: dict[int, list[tuple[int, float]]] = field(default_factory=dict)  # seed -> (epoch, top-1)
    note: str = ""

    @property
    def mean(self) -> float:
        return statistics.fmean(self.top1.values())

    @property
    def spread(self) -> float:
        return max(self.top1.values()) - min(self.top1.values())

    @property
    def std(self) -> float:
        return statistics.stdev(self.top1.values()) if len(self.top1) > 1 else 0.0

    def cell(self) -> str:
        """``mean`` for one seed, ``mean (min-max)`` for several."""
        values = list(self.top1.values())
        return f"{self.mean:.1f}" if len(values) == 1 else f"{self.mean:.1f} ({min(values):.1f}-{max(values):.1f})"


def collect(runs_dir: Path, names: list[str], test_root: Path) -> dict[str, Seeded]:
    """Every finished run below ``runs_dir``, grouped by run over seeds; the baseline's grid is reduced to the
    learning rate with the best mean heldout top-1, whose students are then scored on ``test_root``."""
    from ..report import summarize_run

    grouped: dict[str, Seeded] = {}
    for name in names:
        summary = summarize_run(runs_dir / name)
        if summary.status != "done":
            continue
        seeded = grouped.setdefault(base_name(name), Seeded(base_name(name)))
        seed = seed_of(name)
        seeded.top1[seed], seeded.train_s[seed] = summary.row["top1"], summary.row["train_time_s"]
        seeded.curves[seed] = summary.evals
    results = choose_baseline(grouped, runs_dir, test_root)
    rank = {name: i for i, name in enumerate(TABLE_ORDER)}
    return dict(sorted(results.items(), key=lambda item: rank.get(item[0], len(rank))))


def choose_baseline(grouped: dict[str, Seeded], runs_dir: Path, test_root: Path) -> dict[str, Seeded]:
    """Replace the baseline's grid (scored on heldout/) by its best learning rate, scored on test/."""
    grid = {k: v for k, v in grouped.items() if k.startswith(BASELINE + ",lr=")}
    rest = {k: v for k, v in grouped.items() if k not in grid}
    if not grid:
        return rest
    best = max(grid.values(), key=lambda s: s.mean)
    scores = ", ".join(f"{k.partition('lr=')[2]}: {v.mean:.1f}" for k, v in grid.items())
    chosen = Seeded(BASELINE, train_s=best.train_s, curves=best.curves,
                    note=f"lr {best.run.partition('lr=')[2]} (heldout top-1 by lr: {scores})")
    for seed in best.top1:
        chosen.top1[seed] = student_test_top1(runs_dir / f"{best.run},seed={seed}", test_root)
    return {BASELINE: chosen, **rest}


def student_test_top1(run_dir: Path, test_root: Path) -> float:
    """Top-1 (%) of a run's exported student on ``test_root``, evaluated as ``featcache train --val`` does."""
    from .. import rundir
    from ..models import load_model, normalization
    from .teacher import eval_split, evaluate

    spec = rundir.read_student(run_dir)
    model = load_model(spec["model"], pretrained=False, checkpoint=str(rundir.student_weights(run_dir)),
                       img_size=spec["img_size"], num_classes=spec.get("num_classes"), **spec.get("model_kwargs", {}))
    images, labels = eval_split(test_root, spec["img_size"], normalization(model))  # its crop_pct, interpolation
    return evaluate(model, images, labels, spec["mean"], spec["std"])


def beats(run: Seeded, base: Seeded) -> bool:
    """The module's rule: the gap of the means exceeds the larger of the two ranges over seeds."""
    return run.mean - base.mean > max(run.spread, base.spread)


def markdown_table(results: dict[str, Seeded], teacher_top1: float) -> str:
    """Test top-1 per run: mean and (min-max) over seeds, std, seeds, train time; the teacher on top."""
    lines = ["| run | test top-1 %, mean (min-max) | std | seeds | train s (mean) | note |",
             "|---|---:|---:|---:|---:|---|",
             f"| teacher | {teacher_top1:.1f} | | | | trained once, extracted once |"]
    for r in results.values():
        lines.append(f"| {r.run} | {r.cell()} | {r.std:.1f} | {len(r.top1)} | {statistics.fmean(r.train_s.values()):.0f}"
                     f" | {r.note or _role(r.run)} |")
    return "\n".join(lines)


def _role(run: str) -> str:
    if run in TEACHER_INIT:
        return "student = the teacher's every 2nd block + LoRA (label-free)"
    if run == ONLINE:
        return "cached views replayed, teacher online (first seed: parity with kd)"
    if run == FRESH_ONLINE:
        return "new views every epoch, teacher online"
    return "from the cache"


def verdict(results: dict[str, Seeded], teacher_top1: float) -> list[str]:
    """Sentences from the measured numbers: each distilled run against the baseline (by the spread rule), the best
    student trained from scratch against the teacher, and cached against fresh-view online KD."""
    base = results.get(BASELINE)
    if base is None or not base.top1:
        return [f"no verdict: the {BASELINE} baseline has no result"]
    distilled = [r for r in results.values() if r.run != BASELINE]
    better = [r.run for r in distilled if beats(r, base)]
    lines = [f"verdict: {len(better)} of {len(distilled)} distilled run(s) beat the {BASELINE} baseline by more "
             f"than the spread: {', '.join(better) or 'none'}"]
    for r in distilled:
        lines.append(f"  {r.run}: {r.cell()} % ({r.mean - base.mean:+.1f} points vs {BASELINE} {base.cell()} %; "
                     f"spread {max(r.spread, base.spread):.1f}: {'counts' if beats(r, base) else 'does not count'})")
    return lines + _teacher_gap(results, teacher_top1) + _online_lines(results)


def _teacher_gap(results: dict[str, Seeded], teacher_top1: float) -> list[str]:
    scratch = [r for r in results.values() if r.run != BASELINE and r.run not in TEACHER_INIT]
    if not scratch:
        return []
    best = max(scratch, key=lambda r: r.mean)
    gap = round(teacher_top1 - best.mean, 1)
    side = "level with" if gap == 0 else f"{gap:.1f} points below" if gap > 0 else f"{-gap:.1f} points above"
    return [f"  best student trained from scratch: {best.run} {best.cell()} %, {side} the teacher's {teacher_top1:.1f} %"]


def _online_lines(results: dict[str, Seeded]) -> list[str]:
    lines = []
    cached, fresh, online = results.get("kd"), results.get(FRESH_ONLINE), results.get(ONLINE)
    if cached and fresh:
        gap = fresh.mean - cached.mean
        within = "within" if abs(gap) <= max(cached.spread, fresh.spread) else "beyond"
        lines.append(f"  KD from {len(cached.top1)} seed(s) of cached views {cached.cell()} % vs fresh views every "
                     f"epoch with the teacher online {fresh.cell()} %: {gap:+.1f} points, {within} the spread")
    if cached and online:
        seed = min(online.top1)
        same = "identical" if online.top1[seed] == cached.top1.get(seed) else "not identical"
        lines.append(f"  parity, seed {seed}: KD with the teacher online on the cached views {online.top1[seed]:.2f} % "
                     f"vs {cached.top1.get(seed, float('nan')):.2f} % from the cache ({same})")
    return lines
