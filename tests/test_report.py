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
