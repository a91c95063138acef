"""Reports over hand-written run directories (the run-dir contract), including broken and unfinished runs."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import yaml
from click.testing import CliRunner

from featcache.cli import main
from featcache.report import find_runs, summarize_run, write_report


def make_run(root: Path, name: str, method: str, top1s: list[float], final: bool = True, online: bool = False) -> Path:
    run = root / name
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump({"method": method, "method_args": {"temperature": 2.0},
                                                     "student": "deit_tiny", "online_teacher": online}))
    lines = []
    for epoch, top1 in enumerate(top1s):
        lines.append({"kind": "train", "epoch": epoch, "step": 10 * epoch + 5, "loss": 2.0 / (epoch + 1), "lr": 1e-3,
                      "images_per_s": 100.0})
        lines.append({"kind": "eval", "epoch": epoch, "step": 10 * epoch + 10, "top1": top1, "top5": top1 + 20})
    (run / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in lines) + "\n")
    if final:
        cost = ["kd: teacher forward"] if online else ["cache-only: no teacher compute at train time"]
        (run / "final.json").write_text(json.dumps({
            "top1": top1s[-1], "top5": top1s[-1] + 20, "best_top1": max(top1s), "train_time_s": 12.5,
            "images_per_s": 321.0, "steps": 10 * len(top1s), "method": method, "method_args": {"temperature": 2.0},
            "student": "deit_tiny", "online_teacher_cost": cost}))
    return run


def test_report_writes_table_csv_and_plot(tmp_path):
    make_run(tmp_path, "kd", "kd", [10.0, 30.0, 25.0])
    make_run(tmp_path, "nkd", "nkd", [12.0, 40.0])
    make_run(tmp_path, "online", "kd", [11.0], online=True)
    make_run(tmp_path, "killed", "vitkd", [5.0], final=False)
    (tmp_path / "killed" / "metrics.jsonl").open("a").write('{"kind": "train", "st')  # torn last line
    paths = write_report(tmp_path)
    table = Path(paths["md"]).read_text()
    assert "| kd | done | kd |" in table and "| 25.00 | 30.00 | 45.00 | 12.50 | 321.00 |" in table
    assert "| killed | incomplete | vitkd |" in table
    rows = {r["run"]: r for r in csv.DictReader(open(paths["csv"]))}
    assert set(rows) == {"kd", "nkd", "online", "killed"}
    assert float(rows["nkd"]["top1"]) == 40.0 and float(rows["kd"]["best_top1"]) == 30.0
    assert rows["online"]["online_teacher"] == "kd: teacher forward" and rows["kd"]["online_teacher"] == "no"
    assert float(rows["killed"]["top1"]) == 5.0 and rows["killed"]["train_time_s"] == ""
    png = Path(paths["png"]).read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_broken_run_is_listed_not_fatal(tmp_path):
    make_run(tmp_path, "good", "kd", [50.0])
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "final.json").write_text("{not json")
    summaries = [summarize_run(p, tmp_path) for p in find_runs(tmp_path)]
    assert [s.status for s in summaries] == ["unreadable: JSONDecodeError", "done"]
    assert "| bad | unreadable: JSONDecodeError |" in write_report(tmp_path)["table"]


def test_report_cli(tmp_path):
    make_run(tmp_path / "runs", "a", "kd", [20.0])
    result = CliRunner().invoke(main, ["report", str(tmp_path / "runs"), "--out", str(tmp_path / "rep")])
    assert result.exit_code == 0, result.output
    assert "| a | done | kd |" in result.output and (tmp_path / "rep" / "report.png").is_file()


def test_swept_hyperparameters_become_columns_and_failures_are_labelled(tmp_path):
    for temperature in (1.0, 4.0):
        run = make_run(tmp_path, f"kd-t{temperature}", "kd", [10.0, 20.0 + temperature])
        config = yaml.safe_load((run / "config.yaml").read_text())
        config.update(method_args={"temperature": temperature}, lr=1e-3, out=str(run), workers=temperature)
        (run / "sweep_run.yaml").write_text(yaml.safe_dump(config))  # what a sweep asked for wins over config.yaml
    make_run(tmp_path, "crashed", "kd", [], final=False)
    paths = write_report(tmp_path, failures={"crashed": "failed: TypeError: bad thing: x", "kd-t1.0": "skipped"})
    header, _, *rows = Path(paths["md"]).read_text().splitlines()[2:]
    assert header.split(" | ")[4:7] == ["student", "method_args.temperature", "top-1"]  # not out, not workers
    assert "| crashed | failed: TypeError | kd |" in paths["table"] and "| kd-t1.0 | done |" in paths["table"]
    assert "| deit_tiny | 4 | 24.00 | 24.00 |" in paths["table"]
    rows = {r["run"]: r for r in csv.DictReader(open(paths["csv"]))}
    assert rows["kd-t4.0"]["method_args.temperature"] == "4.0" and rows["crashed"]["top1"] == ""


def test_plot_labels_unfinished_runs_and_counts_epochs_from_one(tmp_path):
    from featcache.report import make_figure

    make_run(tmp_path, "const", "kd", [100.0, 100.0, 100.0])
    make_run(tmp_path, "killed", "vitkd", [5.0], final=False)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "final.json").write_text("{not json")
    fig = make_figure([summarize_run(p, tmp_path) for p in find_runs(tmp_path)])
    acc, loss, evals = fig.axes
    assert acc.get_ylim() == evals.get_ylim() == (0.0, 100.0)  # a constant 100 % is not auto-scaled to 96-104
    assert loss.get_yscale() == "log"  # losses of different methods differ by orders of magnitude
    assert min(x for line in evals.lines for x in line.get_xdata()) == 1  # the console's "epoch 1/3"
    assert all(float(t).is_integer() for t in evals.get_xticks())
    bars = [p for p in acc.patches if p.get_height() > 0]
    assert len(acc.patches) == len(bars) == 4  # two per run with a top-1; none (not a zero bar) for "bad"
    assert [p.get_hatch() for p in bars] == [None, None, "//", "//"]  # killed: its last evaluation, hatched
    assert "no top-1: unreadable: JSONDecodeError" in [t.get_text() for t in acc.texts]
    assert [t.get_text() for t in acc.get_xticklabels()] == ["bad (unreadable)", "const", "killed (incomplete)"]
    assert [line.get_linestyle() for line in evals.lines] == ["-", "--"]
