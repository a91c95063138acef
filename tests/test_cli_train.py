"""`featcache train` end to end on the stage-1 example cache (CPU), composites, errors and option parsing."""
from __future__ import annotations

import json

import click
import pytest
import yaml
from click.testing import CliRunner
from featcache.testing.caches import make_cache, make_val

from featcache.cli import main, parse_method_args


@pytest.fixture(scope="module")
def example(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli_train")
    data, cache = make_cache(root)  # deit3_small --img-size 32 --layers 0,1,11 --views 2 --shots 2, 3 classes
    return {"root": root, "cache": cache, "val": make_val(root)}


pytestmark = pytest.mark.usefixtures("clean_accelerate")


def run(*args: str):
    result = CliRunner().invoke(main, ["train", *args])
    return result


def common(example, out) -> list[str]:
    return ["--cache", example["cache"], "--student", "deit_tiny", "--no-pretrained", "--img-size", "32",
            "--val", str(example["val"]), "--epochs", "1", "--batch-size", "3", "--workers", "0", "--log-every", "1",
            "--out", str(out)]


def test_train_vitkd_end_to_end(example, tmp_path):
    out = tmp_path / "vitkd"
    result = run(*common(example, out), "--method", "vitkd", "--method-arg", "student_shallow=[0, 1]", "--workers", "1")
    assert result.exit_code == 0, result.output
    assert json.loads(result.output[result.output.index("{"):])["steps"] == 2
    for name in ("config.yaml", "metrics.jsonl", "metrics.csv", "student.safetensors", "student.json", "final.json"):
        assert (out / name).is_file(), name
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["method_args"] == {"student_shallow": [0, 1]} and saved["img_size"] == 32
    kinds = [json.loads(x)["kind"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert kinds == ["train", "train", "eval"]


def test_composite_logs_both_parts(example, tmp_path):
    out = tmp_path / "both"
    result = run(*common(example, out), "--method", "vitkd+nkd:0.5", "--student-kwargs", '{"depth": 2}',
                 "--method-arg", "nkd.temperature=2", "--method-arg", "vitkd.alpha=1e-4")
    assert result.exit_code == 0, result.output
    record = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert {"vitkd/loss", "vitkd/mimic", "vitkd/generation", "nkd/loss", "ce", "loss"} <= set(record)
    assert yaml.safe_load((out / "config.yaml").read_text())["method_args"] == {
        "nkd": {"temperature": 2}, "vitkd": {"alpha": 1e-4}}


def test_config_file_supplies_defaults_and_errors_are_clean(example, tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"method": "kd", "teacher": "vit_base", "method_args": {"temperature": 4}}))
    result = run("--config", str(recipe), *common(example, tmp_path / "r"))
    assert result.exit_code != 0
    assert "Error:" in result.output and "not 'vit_base'" in result.output and "Traceback" not in result.output


def test_parse_method_args_types_values_with_yaml():
    assert parse_method_args(("alpha=3e-5", "lam=0.5", "mimic=linear", "layers=[0, 1]", "flag=true")) == {
        "alpha": 3e-5, "lam": 0.5, "mimic": "linear", "layers": [0, 1], "flag": True}
    assert parse_method_args(("nkd.gamma=2",), base={"vitkd": {"alpha": 1}}) == {"vitkd": {"alpha": 1},
                                                                              "nkd": {"gamma": 2}}
    with pytest.raises(click.BadParameter, match="key=value"):
        parse_method_args(("alpha",))


def test_train_help_lists_every_config_field():
    import dataclasses

    from featcache.config import TrainConfig

    result = CliRunner().invoke(main, ["train", "--help"], terminal_width=200)
    assert result.exit_code == 0
    for f in dataclasses.fields(TrainConfig):
        option = "--method-arg" if f.name == "method_args" else "--" + f.name.replace("_", "-")
        assert option in result.output, option


@pytest.mark.slow
def test_two_processes_under_torchrun_share_the_data_and_write_once(example, tmp_path):
    """`featcache train` as launched by Accelerate/torchrun on 2 CPU processes (gloo): sharded batches, one writer."""
    import os
    import subprocess
    import sys

    out = tmp_path / "ddp"
    env = dict(os.environ, ACCELERATE_USE_CPU="true", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "featcache.cli", "train",
           *common(example, out), "--batch-size", "2", "--method", "vitkd+nkd", "--student-kwargs", '{"depth": 2}']
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count('"steps"') == 1, "only the main process prints the result"
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "train"] == [1, 2]  # 6 samples / 2 processes / batch 2
    assert [r["kind"] for r in records].count("eval") == 1
    assert json.loads((out / "final.json").read_text())["steps"] == 2
