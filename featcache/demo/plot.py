"""The demo's figure: test top-1 per run (mean, min-max over seeds) against the teacher, top-1 per epoch, and
what the cache saved in the timed trainings."""
from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from .results import Seeded
from .runs import BASELINE
from .timing import speedups


def write_figure(results: dict[str, Seeded], teacher_top1: float, timing: dict[str, Any] | None, path: Path) -> None:
    """Save the three panels as a PNG (headless: never needs a display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_acc, ax_epochs, ax_time) = plt.subplots(1, 3, figsize=(18, 6), gridspec_kw={"width_ratios": [5, 5, 3]})
    _accuracy(ax_acc, results, teacher_top1)
    _epochs(ax_epochs, results, teacher_top1)
    if timing:
        _timing(ax_time, timing)
    else:
        ax_time.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _accuracy(ax: Any, results: dict[str, Seeded], teacher_top1: float) -> None:
    """Horizontal bars of the mean, whiskers from min to max over seeds, the value written at the bar's end."""
    runs = list(results.values())[::-1]  # top to bottom in table order
    means = [r.mean for r in runs]
    whiskers = [[r.mean - min(r.top1.values()) for r in runs], [max(r.top1.values()) - r.mean for r in runs]]
    colors = ["0.55" if r.run == BASELINE else "C0" for r in runs]
    ax.barh(range(len(runs)), means, xerr=whiskers, color=colors, capsize=4, error_kw={"elinewidth": 1.2})
    for i, r in enumerate(runs):
        ax.text(2, i, f"{r.cell()}  [{len(r.top1)} seed(s)]", va="center", fontsize=9, color="white",
                fontweight="bold")
    ax.axvline(teacher_top1, color="k", linestyle="--", linewidth=1.2, label=f"teacher {teacher_top1:.1f} %")
    ax.set_yticks(range(len(runs)), [r.run for r in runs], fontsize=10)
    ax.set(xlim=(0, 100), xlabel="test top-1 (%): mean, whiskers min-max over seeds")
    ax.set_title("students from one cache vs the teacher")
    ax.legend(loc="lower right", fontsize=9)


def _epochs(ax: Any, results: dict[str, Seeded], teacher_top1: float) -> None:
    """Top-1 after each epoch, mean over seeds (the baseline's curve is on heldout/, where its lr was chosen)."""
    for i, r in enumerate(results.values()):
        curves = [c for c in r.curves.values() if c]
        if not curves:
            continue
        length = min(len(c) for c in curves)
        epochs = [e for e, _ in curves[0][:length]]
        mean = [statistics.fmean(c[j][1] for c in curves) for j in range(length)]
        label = f"{r.run} (heldout/)" if r.run == BASELINE else r.run
        ax.plot(epochs, mean, color=f"C{i % 10}", linewidth=1.4, label=label,
                linestyle="--" if r.run == BASELINE else "-")
    ax.axhline(teacher_top1, color="k", linestyle=":", linewidth=1)
    ax.set(xlabel="epoch", ylabel="top-1 (%) on test/, mean over seeds", ylim=(0, 100))
    ax.set_title("convergence: top-1 after each epoch")
    ax.legend(fontsize=8, loc="lower right", ncol=2)


def _timing(ax: Any, timing: dict[str, Any]) -> None:
    """Seconds of the two timed trainings and the cached time the ideal speedup predicts."""
    measured, ideal, _ = speedups(timing)
    labels = ["online teacher", "from the cache", "ideal from\nthe cache"]
    seconds = [timing["online_s"], timing["cached_s"], timing["online_s"] / ideal]
    ax.bar(range(3), seconds, color=["C3", "C0", "0.75"])
    for i, s in enumerate(seconds):
        ax.text(i, s, f"{s:.1f} s", ha="center", va="bottom", fontsize=9)
    ax.set_xticks(range(3), labels, fontsize=9)
    ax.set(ylabel=f"seconds for {timing['steps']} KD steps ({timing['threads']} thread(s))")
    ax.set_title(f"speedup {measured:.2f}x, ideal {ideal:.2f}x ({measured / ideal:.2f} of ideal)")
