"""Reports over run directories: a Markdown + CSV table and a PNG plot (accuracy per run, loss curves).

Reads only the run-directory contract (``config.yaml``, ``metrics.jsonl``, ``final.json``), so it works on
runs made by ``featcache train`` or ``featcache sweep`` alike. Unfinished or broken runs are listed as such.
"""
from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import yaml

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
    """Run directories below ``runs_dir`` (any directory holding a config.yaml, final.json or sweep_run.yaml),
    sorted."""
    root = Path(runs_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"runs directory {str(root)!r} does not exist")
    found = {p.parent for name in ("config.yaml", "final.json", "sweep_run.yaml") for p in root.rglob(name)}
    return sorted(found)


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """Records of a metrics.jsonl, skipping a torn last line (a run killed mid-write)."""
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


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
    config = {}
    for fname in ("config.yaml", "sweep_run.yaml"):
        if (path / fname).is_file():
            config = yaml.safe_load((path / fname).read_text()) or {}
            break
    final = json.loads((path / "final.json").read_text()) if (path / "final.json").is_file() else None
    records = read_metrics(path / "metrics.jsonl")
    evals = [r for r in records if r.get("kind") == "eval" and r.get("top1") is not None]
    src = final or {}
    row = {
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
    losses = [(int(r.get("step", i)), float(r["loss"])) for i, r in enumerate(records)
              if r.get("kind") == "train" and r.get("loss") is not None]
    epochs = [(int(r.get("epoch", i)), float(r["top1"])) for i, r in enumerate(evals)]
    return RunSummary(name, path, row["status"], row, losses, epochs)


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
    names = [r.name for r in runs]
    x = range(len(runs))
    ax_acc.bar([i - 0.2 for i in x], [r.row.get("top1") or 0 for r in runs], width=0.4, label="final top-1")
    ax_acc.bar([i + 0.2 for i in x], [r.row.get("best_top1") or 0 for r in runs], width=0.4, label="best top-1")
    ax_acc.set_xticks(list(x), names, rotation=35, ha="right", fontsize=8)
    ax_acc.set(ylabel="top-1 (%)", title="accuracy per run")
    ax_acc.legend(fontsize=8)
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
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


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
