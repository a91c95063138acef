"""Reports over run directories: a Markdown + CSV table and a PNG plot (accuracy per run, loss and top-1 curves).

Reads only the run-directory contract (:mod:`featcache.rundir`: the config, the metrics, the result), so it works
on runs made by ``featcache train`` or ``featcache sweep`` alike. Unfinished, failed or broken runs are listed and
labelled as such, never drawn as a zero. The hyperparameters that differ between the runs (what a sweep's grid
varies, read from each run's config) become table columns of their own.
"""
from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

import yaml

from . import rundir
from .config import load_yaml

#: Result columns, in table order; the swept hyperparameters go between ``student`` and ``top1``.
LEADING = ("run", "status", "method", "method_args", "student")
TRAILING = ("top1", "best_top1", "ema_top1", "top5", "train_time_s", "images_per_s", "online_teacher")
COLUMNS = LEADING + TRAILING
HEADERS = {"method_args": "method args", "top1": "top-1", "best_top1": "best top-1", "ema_top1": "EMA top-1",
           "top5": "top-5", "train_time_s": "train time (s)", "images_per_s": "images/s",
           "online_teacher": "online teacher"}
#: Shown with two decimals (accuracies in %, seconds, images/s).
METRICS = ("top1", "best_top1", "ema_top1", "top5", "train_time_s", "images_per_s")
#: Columns that are left out when no run has a value for them.
OPTIONAL = ("ema_top1",)
#: Config keys that never count as swept: shown as their own column already, or unable to change the result.
NOT_SWEPT = ("method", "method_args", "student", "online_teacher", "out", *rundir.NEUTRAL_KEYS)


@dataclass
class RunSummary:
    """What a report shows about one run directory."""

    name: str
    path: Path
    status: str  # done | incomplete | failed: <error> | unreadable: <error>
    row: dict[str, Any] = field(default_factory=dict)
    losses: list[tuple[int, float]] = field(default_factory=list)  # (step, loss) of train records
    evals: list[tuple[int, float]] = field(default_factory=list)  # (epoch from 1, top1) of eval records
    config: dict[str, Any] = field(default_factory=dict)  # what the run was asked to do (flattened)


def find_runs(runs_dir: str | Path) -> list[Path]:
    """Run directories below ``runs_dir`` (any directory holding a config, a result or a sweep config), sorted."""
    return rundir.find_runs(runs_dir)


def summarize_run(path: str | Path, root: str | Path | None = None, failure: str | None = None) -> RunSummary:
    """Read one run directory into a :class:`RunSummary` (never raises on a broken run).

    Args:
        path: the run directory.
        root: names are relative to it.
        failure: why the run failed, when its caller knows (a sweep's ``"failed: ..."`` result).
    """
    path = Path(path)
    name = run_name(path, root)
    try:
        summary = _summarize(path, name)
    except (OSError, ValueError, yaml.YAMLError) as err:
        status = f"unreadable: {type(err).__name__}"
        return RunSummary(name, path, status, {"run": name, "status": status})
    if failure and summary.status != "done":
        summary.status = summary.row["status"] = _short_failure(failure)
    return summary


def run_name(path: Path, root: str | Path | None = None) -> str:
    """How the report names a run: its path below ``root`` (a sweep's run name), else its folder name."""
    return str(path.relative_to(root)) if root is not None and path != Path(root) else path.name


def _short_failure(failure: str) -> str:
    """``"failed: TypeError: long message"`` -> ``"failed: TypeError"`` (the sweep's log has the message)."""
    parts = [p.strip() for p in failure.split(":")]
    return ": ".join(parts[:2]) if len(parts) > 1 and parts[1] else "failed"


def _summarize(path: Path, name: str) -> RunSummary:
    config = rundir.read_config(path)
    final = rundir.read_final(path)
    records = rundir.read_metrics(path)
    evals = [r for r in records if r.get("kind") == "eval" and r.get("top1") is not None]
    row = _row(name, final, config, evals)
    losses = [(int(r.get("step", i)), float(r["loss"])) for i, r in enumerate(records)
              if r.get("kind") == "train" and r.get("loss") is not None]
    epochs = [(int(r.get("epoch", i)) + 1, float(r["top1"])) for i, r in enumerate(evals)]  # "epoch 1/3" is 0
    return RunSummary(name, path, row["status"], row, losses, epochs, _flatten(_requested_config(path)))


def _requested_config(path: Path) -> dict[str, Any]:
    """The config the run was asked for: a sweep's ``sweep_run.yaml`` (before the engine filled in its defaults),
    else the engine's ``config.yaml``."""
    for name in (rundir.SWEEP_CONFIG, rundir.CONFIG_FILE):
        if (path / name).is_file():
            return load_yaml(path / name)
    return {}


def _flatten(values: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"method_args": {"temperature": 2}}`` -> ``{"method_args.temperature": 2}``."""
    out: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, Mapping) and value:
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _row(name: str, final: dict[str, Any] | None, config: dict[str, Any], evals: list[dict[str, Any]]
         ) -> dict[str, Any]:
    """The table row: the result where the run finished, else its config and its last evaluation."""
    src = final or {}
    last = evals[-1] if evals else {}
    row = {
        "run": name, "status": "done" if final is not None else "incomplete",
        "method": src.get("method", config.get("method")),
        "method_args": json.dumps(src.get("method_args", config.get("method_args", {})), sort_keys=True),
        "student": src.get("student", config.get("student")),
        "top1": src.get("top1", last.get("top1")),
        "best_top1": src.get("best_top1", max((r["top1"] for r in evals), default=None)),
        "ema_top1": src.get("ema_top1", last.get("ema_top1")),
        "top5": src.get("top5", last.get("top5")),
        "train_time_s": src.get("train_time_s"), "images_per_s": src.get("images_per_s"),
        "online_teacher": _online_note(src.get("online_teacher_cost"), config),
    }
    return {k: float(v) if k in METRICS and isinstance(v, (int, float)) else v for k, v in row.items()}


def _online_note(cost: Any, config: dict[str, Any]) -> str:
    """The engine's cost sentences without the cache-only one: ``no`` when the run read only the cache."""
    lines = [cost] if isinstance(cost, str) else list(cost or [])
    lines = [c for c in lines if not str(c).startswith("cache-only")]
    if lines:
        return "; ".join(str(c) for c in lines)
    return "yes" if config.get("online_teacher") else "no"


# ------------------------------------------------------------------------------------------------ table


def swept_keys(runs: Iterable[RunSummary]) -> list[str]:
    """Config keys (dotted for nested ones) whose value differs between the runs that have them, in first-seen
    order (a key missing from a run's config, e.g. one written by an older version, is not a difference)."""
    configs = [r.config for r in runs if r.config]
    keys = list(dict.fromkeys(k for c in configs for k in c))
    return [k for k in keys if k not in NOT_SWEPT
            and len({json.dumps(c[k], sort_keys=True, default=str) for c in configs if k in c}) > 1]


def table_columns(runs: list[RunSummary]) -> list[str]:
    """The row keys shown, in order: the leading columns, the swept hyperparameters, then the results."""
    trailing = [c for c in TRAILING if c not in OPTIONAL or any(r.row.get(c) is not None for r in runs)]
    return [*LEADING, *swept_keys(runs), *trailing]


def _values(runs: list[RunSummary], columns: list[str]) -> list[list[Any]]:
    return [[r.row.get(c, r.config.get(c)) for c in columns] for r in runs]


def _cell(value: Any, column: str) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.2f}" if column in METRICS else f"{value:g}"
    return str(value).replace("|", "\\|")


def markdown_table(runs: Iterable[RunSummary]) -> str:
    """The runs as a Markdown table (one row per run, ``-`` for what a run does not have)."""
    runs = list(runs)
    columns = table_columns(runs)
    lines = ["| " + " | ".join(HEADERS.get(c, c) for c in columns) + " |", "|" + "---|" * len(columns)]
    for values in _values(runs, columns):
        lines.append("| " + " | ".join(_cell(v, c) for v, c in zip(values, columns)) + " |")
    return "\n".join(lines) + "\n"


def write_csv(runs: Iterable[RunSummary], path: Path) -> None:
    """The table as CSV: the same columns under their row keys, empty where a run has no value."""
    runs = list(runs)
    columns = table_columns(runs)
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(columns)
        writer.writerows(_values(runs, columns))


# ------------------------------------------------------------------------------------------------ plot


def plot_runs(runs: list[RunSummary], path: Path) -> None:
    """Write :func:`make_figure` as a PNG (headless: never needs a display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = make_figure(runs)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def make_figure(runs: list[RunSummary]) -> Any:
    """Three panels: final and best top-1 per run (bars), training loss vs step (log scale), top-1 vs epoch."""
    import matplotlib.pyplot as plt

    curves = [r for r in runs if r.losses or r.evals]
    columns = min(max(len(curves), 1), 4)
    rows = math.ceil(len(curves) / columns)
    fig, (ax_acc, ax_loss, ax_eval) = plt.subplots(1, 3, figsize=(18, 5.5 + 0.25 * rows))
    _plot_accuracy(ax_acc, runs)
    for run in curves:  # one colour per run in both curve panels, named once in the legend below them
        _plot_curves(ax_loss, ax_eval, run, f"C{curves.index(run) % 10}")
    _style_losses(ax_loss, runs)
    _style_evals(ax_eval, runs)
    if curves:
        fig.legend(*ax_eval.get_legend_handles_labels() if ax_eval.lines else ax_loss.get_legend_handles_labels(),
                   loc="lower center", bbox_to_anchor=(0.67, 0), ncol=columns, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, (0.25 * rows + 0.1) / (5.5 + 0.25 * rows), 1, 1))
    return fig


def _plot_accuracy(ax: Any, runs: list[RunSummary]) -> None:
    """Bars where a run has a top-1 (hatched when it did not finish); its status written where it has none."""
    for i, run in enumerate(runs):
        hatch = None if run.status == "done" else "//"
        for offset, key, color in ((-0.2, "top1", "C0"), (0.2, "best_top1", "C1")):
            if run.row.get(key) is not None:
                ax.bar(i + offset, run.row[key], width=0.4, color=color, hatch=hatch, edgecolor="white")
        if run.row.get("top1") is None:
            ax.text(i, 2, f"no top-1: {run.status}", rotation=90, ha="center", va="bottom", fontsize=8, color="0.35")
    ax.set_xticks(range(len(runs)), [_run_label(r) for r in runs], rotation=35, ha="right", fontsize=8)
    ax.set(ylabel="top-1 (%)", ylim=(0, 100), xlim=(-0.6, max(len(runs), 1) - 0.4))
    ax.set_title("accuracy per run", pad=24)
    _accuracy_legend(ax, any(r.status != "done" and r.row.get("top1") is not None for r in runs))


def _run_label(run: RunSummary) -> str:
    return run.name if run.status == "done" else f"{run.name} ({run.status.split(':')[0]})"


def _accuracy_legend(ax: Any, with_unfinished: bool) -> None:
    from matplotlib.patches import Patch

    handles = [Patch(color="C0", label="final top-1"), Patch(color="C1", label="best top-1")]
    if with_unfinished:
        handles.append(Patch(facecolor="0.6", hatch="//", edgecolor="white", label="not finished: last evaluation"))
    ax.legend(handles=handles, fontsize=8, loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=len(handles),
              frameon=False)


def _plot_curves(ax_loss: Any, ax_eval: Any, run: RunSummary, color: str) -> None:
    """The run's loss per step and top-1 per epoch, dashed when it did not finish; markers where points are few."""
    style = {"color": color, "label": _run_label(run), "linewidth": 1, "linestyle": _line(run)}
    if run.losses:
        ax_loss.plot(*zip(*run.losses), marker="o" if len(run.losses) < 3 else None, markersize=3, **style)
    if run.evals:
        ax_eval.plot(*zip(*run.evals), marker="o", markersize=4, clip_on=False, **style)


def _style_losses(ax: Any, runs: list[RunSummary]) -> None:
    """Log scale: the methods' losses differ by orders of magnitude (symlog if a loss is not positive)."""
    from matplotlib.ticker import MaxNLocator

    positive = all(loss > 0 for run in runs for _, loss in run.losses)
    ax.set_yscale("log" if positive else "symlog")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
    ax.set(xlabel="optimizer step", ylabel="training loss (log scale)", title="training loss")


def _style_evals(ax: Any, runs: list[RunSummary]) -> None:
    """Epochs counted from 1 as the console counts them, integer ticks, a fixed 0-100 % axis."""
    from matplotlib.ticker import MaxNLocator

    last = max((e for run in runs for e, _ in run.evals), default=1)
    ax.set(xlabel="epoch", ylabel="top-1 (%)", title="evaluation after each epoch", ylim=(0, 100),
           xlim=(0.8, max(last, 1) + 0.2))
    ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))


def _line(run: RunSummary) -> str:
    return "-" if run.status == "done" else "--"


# ------------------------------------------------------------------------------------------------ files


def write_report(runs_dir: str | Path, runs: Iterable[str | Path] | None = None, out: str | Path | None = None,
                 failures: Mapping[str, str] | None = None) -> dict[str, str]:
    """Write ``report.md``, ``report.csv`` and ``report.png`` for the runs below ``runs_dir``.

    Args:
        runs_dir: the directory holding the runs (a sweep's ``out``).
        runs: the run directories to show, in this order; default: every run found below ``runs_dir``.
        out: where the report files go; default ``runs_dir``.
        failures: ``{run name: "failed: ..."}`` for runs known to have failed (a sweep's results); others that
            did not finish are ``incomplete``.

    Returns:
        ``{"md": path, "csv": path, "png": path, "table": markdown text}``.
    """
    root = Path(runs_dir)
    dirs = [Path(r) for r in runs] if runs is not None else find_runs(root)
    failed = {k: v for k, v in (failures or {}).items() if str(v).startswith("failed")}
    summaries = [summarize_run(d, root, failed.get(run_name(d, root))) for d in dirs]
    out = Path(out) if out is not None else root
    out.mkdir(parents=True, exist_ok=True)
    table = markdown_table(summaries)
    paths = {"md": out / "report.md", "csv": out / "report.csv", "png": out / "report.png"}
    paths["md"].write_text(f"# featcache report: {root}\n\n{table}")
    write_csv(summaries, paths["csv"])
    plot_runs(summaries, paths["png"])
    return {**{k: str(v) for k, v in paths.items()}, "table": table}
