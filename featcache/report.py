"""Reports over run directories: a Markdown + CSV table and a PNG plot (accuracy per run, loss curves).

Reads only the run-directory contract (:mod:`featcache.rundir`: the config, the metrics, the result), so it works
on runs made by ``featcache train`` or ``featcache sweep`` alike. Unfinished or broken runs are listed as such.
"""
from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import yaml

from . import rundir

COLUMNS = ("run", "status", "method", "method_args", "student", "top1", "best_top1", "top5", "train_time_s",
           "images_per_s", "online_teacher")


@dataclass
class RunSummary:
    """What a report shows about one run directory."""

    name: str
    path: Path
    status: str  # done | incomplete | unreadable: <error>
    row: dict[str, Any] = field(default_factory=dict)
    losses: list[tuple[int, float]] = field(default_factory=list)  # (step, loss) of train records
    evals: list[tuple[int, float]] = field(default_factory=list)  # (epoch, top1) of eval records


def find_runs(runs_dir: str | Path) -> list[Path]:
    """Run directories below ``runs_dir`` (any directory holding a config, a result or a sweep config), sorted."""
    return rundir.find_runs(runs_dir)


def summarize_run(path: str | Path, root: str | Path | None = None) -> RunSummary:
    """Read one run directory into a :class:`RunSummary` (never raises on a broken run)."""
    path = Path(path)
    name = str(path.relative_to(root)) if root is not None and path != Path(root) else path.name
    try:
        return _summarize(path, name)
    except (OSError, ValueError, yaml.YAMLError) as err:
        status = f"unreadable: {type(err).__name__}"
        return RunSummary(name, path, status, {"run": name, "status": status})


def _summarize(path: Path, name: str) -> RunSummary:
    config = rundir.read_config(path)
    final = rundir.read_final(path)
    records = rundir.read_metrics(path)
    evals = [r for r in records if r.get("kind") == "eval" and r.get("top1") is not None]
    row = _row(name, final, config, evals)
    losses = [(int(r.get("step", i)), float(r["loss"])) for i, r in enumerate(records)
              if r.get("kind") == "train" and r.get("loss") is not None]
    epochs = [(int(r.get("epoch", i)), float(r["top1"])) for i, r in enumerate(evals)]
    return RunSummary(name, path, row["status"], row, losses, epochs)


def _row(name: str, final: dict[str, Any] | None, config: dict[str, Any], evals: list[dict[str, Any]]
         ) -> dict[str, Any]:
    """The table row: the result where the run finished, else its config and its last evaluation."""
    src = final or {}
    return {
        "run": name, "status": "done" if final is not None else "incomplete",
        "method": src.get("method", config.get("method")),
        "method_args": json.dumps(src.get("method_args", config.get("method_args", {})), sort_keys=True),
        "student": src.get("student", config.get("student")),
        "top1": src.get("top1", evals[-1]["top1"] if evals else None),
        "best_top1": src.get("best_top1", max((r["top1"] for r in evals), default=None)),
        "top5": src.get("top5", evals[-1].get("top5") if evals else None),
        "train_time_s": src.get("train_time_s"), "images_per_s": src.get("images_per_s"),
        "online_teacher": _online_note(src.get("online_teacher_cost"), config),
    }


def _online_note(cost: Any, config: dict[str, Any]) -> str:
    """The engine's cost sentences without the cache-only one: ``no`` when the run read only the cache."""
    lines = [cost] if isinstance(cost, str) else list(cost or [])
    lines = [c for c in lines if not str(c).startswith("cache-only")]
    if lines:
        return "; ".join(str(c) for c in lines)
    return "yes" if config.get("online_teacher") else "no"


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.2f}"
    return str(value).replace("|", "\\|")


def markdown_table(runs: Iterable[RunSummary]) -> str:
    """The runs as a Markdown table (one row per run, ``-`` for what a run does not have)."""
    header = ["run", "status", "method", "method args", "student", "top-1", "best top-1", "top-5",
              "train time (s)", "images/s", "online teacher"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for run in runs:
        lines.append("| " + " | ".join(_cell(run.row.get(c)) for c in COLUMNS) + " |")
    return "\n".join(lines) + "\n"


def write_csv(runs: Iterable[RunSummary], path: Path) -> None:
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(COLUMNS))
        writer.writeheader()
        for run in runs:
            writer.writerow({c: run.row.get(c) for c in COLUMNS})


def plot_runs(runs: list[RunSummary], path: Path) -> None:
    """Three panels: final and best top-1 per run (bars), training loss vs step, and top-1 vs epoch."""
    import matplotlib

    matplotlib.use("Agg")  # headless: never needs a display
    import matplotlib.pyplot as plt

    fig, (ax_acc, ax_loss, ax_eval) = plt.subplots(1, 3, figsize=(18, 5.5))
    _plot_accuracy(ax_acc, runs)
    _plot_curves(ax_loss, ax_eval, runs)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_accuracy(ax: Any, runs: list[RunSummary]) -> None:
    x = range(len(runs))
    ax.bar([i - 0.2 for i in x], [r.row.get("top1") or 0 for r in runs], width=0.4, label="final top-1")
    ax.bar([i + 0.2 for i in x], [r.row.get("best_top1") or 0 for r in runs], width=0.4, label="best top-1")
    ax.set_xticks(list(x), [r.name for r in runs], rotation=35, ha="right", fontsize=8)
    ax.set(ylabel="top-1 (%)", title="accuracy per run")
    ax.legend(fontsize=8)


def _plot_curves(ax_loss: Any, ax_eval: Any, runs: list[RunSummary]) -> None:
    for r in runs:
        if r.losses:
            ax_loss.plot(*zip(*r.losses), label=r.name, linewidth=1)
        if r.evals:
            ax_eval.plot(*zip(*r.evals), marker="o", markersize=3, label=r.name, linewidth=1)
    ax_loss.set(xlabel="step", ylabel="training loss", title="loss curves")
    ax_eval.set(xlabel="epoch", ylabel="top-1 (%)", title="evaluation")
    for ax in (ax_loss, ax_eval):
        if ax.lines:
            ax.legend(fontsize=7)


def write_report(runs_dir: str | Path, runs: Iterable[str | Path] | None = None, out: str | Path | None = None
                 ) -> dict[str, str]:
    """Write ``report.md``, ``report.csv`` and ``report.png`` for the runs below ``runs_dir``.

    Args:
        runs_dir: the directory holding the runs (a sweep's ``out``).
        runs: the run directories to show, in this order; default: every run found below ``runs_dir``.
        out: where the report files go; default ``runs_dir``.

    Returns:
        ``{"md": path, "csv": path, "png": path, "table": markdown text}``.
    """
    root = Path(runs_dir)
    dirs = [Path(r) for r in runs] if runs is not None else find_runs(root)
    summaries = [summarize_run(d, root) for d in dirs]
    out = Path(out) if out is not None else root
    out.mkdir(parents=True, exist_ok=True)
    table = markdown_table(summaries)
    paths = {"md": out / "report.md", "csv": out / "report.csv", "png": out / "report.png"}
    paths["md"].write_text(f"# featcache report: {root}\n\n{table}")
    write_csv(summaries, paths["csv"])
    plot_runs(summaries, paths["png"])
    return {**{k: str(v) for k, v in paths.items()}, "table": table}
