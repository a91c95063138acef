"""How many stored views are enough? Students trained from K = 1, 2, 4, 8, 16 cached views against the fresh-view
online baseline, on the digits teacher of ``featcache demo``, with and without the DeiT-style recipe.

The teacher is trained on every train image (as the demo trains it). For each recipe it then runs once over 16 views
of ``--shots`` images per class (one ``featcache sweep`` per recipe: one cache, then every run from it). A run
"from K views" reads only the first K stored views of each sample (``--max-views K``): since views are
f(seed, sample, view), those are the views a K-view extraction writes. The baseline is ``--online-teacher
--fresh-views``: new views every epoch from (seed, epoch, sample), the teacher run on each batch. Every run has the
same student, epochs and schedule, for each of ``--seeds``; KD and ViTKD+NKD use the demo's settings.
The recipes:

* ``plain``: the demo's views (RandomResizedCrop scale 0.35-1, no flip: digits are not mirror-symmetric);
* ``deit``: those + RandAugment rand-m9-mstd0.5-inc1 + random erasing 0.25 + Mixup 0.8 / CutMix 1.0 (switch 0.5).

Writes ``views_study.md`` (the table), ``views_study.csv`` and ``views_study.png`` (top-1 against K, one panel per
recipe and method, the fresh-view online run as a horizontal line) into ``--out``. Run from the repository root::

    python benchmarks/views_study.py --out /tmp/views_study --shots 50 --epochs 25 --seeds 0,1,2 --jobs 2
"""
from __future__ import annotations

import argparse
import csv
import json
import time
from pathlib import Path
from typing import Any

from featcache.demo import DemoConfig, demo_runs, demo_spec, ensure_teacher, write_digits
from featcache.sweep import SweepSpec, run_sweep

VIEWS = (1, 2, 4, 8, 16)
RECIPES: dict[str, dict[str, Any]] = {
    "plain": {},
    "deit": {"aa": "rand-m9-mstd0.5-inc1", "reprob": 0.25, "mixup": 0.8, "cutmix": 1.0, "mixup_switch_prob": 0.5},
}
METHODS = ("kd", "vitkd+nkd")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="views_study", help="output directory (digits, teacher, caches, runs, table)")
    p.add_argument("--shots", type=int, default=50, help="train images per class the students see [50 of ~144]")
    p.add_argument("--epochs", type=int, default=8, help="student epochs of every run")
    p.add_argument("--batch-size", type=int, default=32, help="student batch size")
    p.add_argument("--seeds", default="0", help="comma-separated seeds of the students' init, batch order, masks and "
                   "fresh views; every cell reports their mean and range (the cached views keep the demo's seed)")
    p.add_argument("--jobs", type=int, default=2, help="trainings at once")
    p.add_argument("--label-shots", type=int, default=None, help="labels per class [all]")
    p.add_argument("--recipes", default=",".join(RECIPES), help="comma-separated subset of: " + ", ".join(RECIPES))
    return p.parse_args(argv)


def study_runs(demo: DemoConfig) -> list[dict[str, Any]]:
    """KD and ViTKD+NKD (the demo's arguments) from K cached views, and each with fresh views online."""
    by_name = {r["name"]: r for r in demo_runs(demo)}
    runs = []
    for method in METHODS:
        args = by_name[method]["method_args"] if "method_args" in by_name[method] else {}
        runs += [{"name": f"{method}-K{k}", "method": method, "method_args": args, "max_views": k} for k in VIEWS]
        runs.append({"name": f"{method}-fresh-online", "method": method, "method_args": args, "online_teacher": True,
                     "fresh_views": True})
    return runs


def study_spec(demo: DemoConfig, out: Path, recipe: str, seed: int, args: argparse.Namespace) -> SweepSpec:
    """The demo's extraction (16 views of ``--shots`` images per class, plus the recipe's view flags) and student
    settings, with the study's runs for one student seed (one cache per recipe, whatever the seed)."""
    spec = demo_spec(demo, out, out / "teacher.safetensors")
    extract = {**spec.extract, **RECIPES[recipe], "views": max(VIEWS), "shots": args.shots,
               "out": str(out / f"cache_{recipe}")}
    base = {**spec.base, "epochs": args.epochs, "batch_size": args.batch_size, "label_shots": args.label_shots,
            "seed": seed}
    return SweepSpec.from_dict({"cache": extract["out"], "extract": extract, "base": base,
                                "runs": study_runs(demo), "out": str(runs_dir(out, recipe, seed))})


def runs_dir(out: Path, recipe: str, seed: int) -> Path:
    return out / f"runs_{recipe}" / f"seed{seed}"


def collect(out: Path, recipes: list[str], seeds: list[int]) -> list[dict[str, Any]]:
    """One row per run: recipe, method, K (None for the fresh-view run), seed, final and best top-1, train seconds."""
    rows = []
    for recipe in recipes:
        for seed in seeds:
            for run in study_runs(DemoConfig()):
                final = json.loads((runs_dir(out, recipe, seed) / run["name"] / "final.json").read_text())
                rows.append({"recipe": recipe, "method": run["method"], "views": run.get("max_views"), "seed": seed,
                             "top1": final["top1"], "best_top1": final["best_top1"],
                             "train_s": final["train_time_s"]})
    return rows


def cells(rows: list[dict[str, Any]], recipe: str, method: str) -> dict[int | None, list[float]]:
    """K (None: fresh views online) -> top-1 of every seed, for one panel."""
    out: dict[int | None, list[float]] = {}
    for r in rows:
        if r["recipe"] == recipe and r["method"] == method:
            out.setdefault(r["views"], []).append(r["top1"])
    return out


def cell_text(values: list[float]) -> str:
    """``mean`` for one seed, ``mean (min-max)`` for several."""
    mean = sum(values) / len(values)
    return f"{mean:.2f}" if len(values) == 1 else f"{mean:.2f} ({min(values):.2f}-{max(values):.2f})"


def table(rows: list[dict[str, Any]]) -> str:
    """Markdown: one line per recipe and method, top-1 for each K and for fresh views online."""
    head = "| recipe | method | " + " | ".join(f"K={k}" for k in VIEWS) + " | fresh views, online |"
    lines = [head, "|" + "---|" * 2 + "---:|" * (len(VIEWS) + 1)]
    for recipe in dict.fromkeys(r["recipe"] for r in rows):
        for method in METHODS:
            panel = cells(rows, recipe, method)
            lines.append(f"| {recipe} | {method} | " + " | ".join(cell_text(panel[k]) for k in (*VIEWS, None)) + " |")
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    """Top-1 against K (log scale), one panel per recipe x method; the fresh-view online run as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recipes = list(dict.fromkeys(r["recipe"] for r in rows))
    fig, axes = plt.subplots(len(recipes), len(METHODS), figsize=(5 * len(METHODS), 3.4 * len(recipes)),
                             squeeze=False, sharey=True)
    for i, recipe in enumerate(recipes):
        for j, method in enumerate(METHODS):
            ax, panel = axes[i][j], cells(rows, recipe, method)
            mean = [sum(panel[k]) / len(panel[k]) for k in VIEWS]
            spread = [[m - min(panel[k]) for m, k in zip(mean, VIEWS)],
                      [max(panel[k]) - m for m, k in zip(mean, VIEWS)]]
            ax.errorbar(VIEWS, mean, yerr=spread, fmt="o-", capsize=3, label="from K cached views (mean, min-max)")
            fresh = panel[None]
            ax.axhline(sum(fresh) / len(fresh), ls="--", c="k", label="fresh views, online (mean)")
            if len(fresh) > 1:
                ax.axhspan(min(fresh), max(fresh), color="k", alpha=0.08)
            ax.set(xscale="log", xticks=list(VIEWS), xticklabels=[str(k) for k in VIEWS], title=f"{recipe}: {method}",
                   xlabel="K (stored views per image)", ylabel="test top-1 (%)")
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def write_outputs(out: Path, rows: list[dict[str, Any]], seconds: float) -> str:
    text = table(rows)
    (out / "views_study.md").write_text(text + f"\n\nwall clock {seconds:.0f} s\n")
    with open(out / "views_study.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    plot(rows, out / "views_study.png")
    return text


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    start, out = time.perf_counter(), Path(args.out).resolve()
    demo = DemoConfig(out=str(out), epochs=args.epochs)
    info = write_digits(out / "digits", demo.img_size, demo.test_fraction, demo.seed, demo.max_train)
    teacher = ensure_teacher(demo, out / "digits", out)
    recipes = [r for r in args.recipes.split(",") if r]
    seeds = [int(v) for v in args.seeds.split(",") if v.strip()]
    for recipe in recipes:
        for seed in seeds:
            run_sweep(study_spec(demo, out, recipe, seed, args), jobs=args.jobs, report=False)
    rows = collect(out, recipes, seeds)
    seconds = time.perf_counter() - start
    print(f"digits: {info['train']} train / {info['test']} test; teacher {teacher['test_top1']:.1f} % test top-1 "
          f"(trained on all train images); students: {args.shots} images per class, {args.epochs} epochs, batch "
          f"{args.batch_size}, labels per class: {args.label_shots or 'all'}, seeds {seeds}")
    print(write_outputs(out, rows, seconds))
    print(f"wall clock {seconds:.0f} s; table, CSV and plot in {out}")


if __name__ == "__main__":
    main()
