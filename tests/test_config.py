"""Configs (featcache/config.py) and the options built from them (featcache/options.py).

Each default is written once (the option's default, parsed the way the command parses it, is the field's), choices
come from the registries, YAML round-trips, and bad keys, values and files are named in a ConfigError.
"""
from __future__ import annotations

import dataclasses

import click
import pytest
from click.testing import CliRunner

from featcache.cli import main
from featcache.config import (ExtractConfig, TrainConfig, from_dict, from_options, load_yaml, parse_int_list,
                              parse_pairs, save_yaml, setting)
from featcache.errors import ConfigError, MissingFileError
from featcache.options import config_options, names_of
from featcache.probe import ProbeConfig

CONFIGS = [ExtractConfig, TrainConfig, ProbeConfig]
pytestmark = pytest.mark.usefixtures("clean_accelerate")


def options_of(cls: type) -> dict[str, click.Option]:
    return {p.name: p for p in config_options(cls, "test") if p.name != "config_path"}


def cli_fields(cls: type) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(cls) if f.metadata.get("cli", True)]


# ---------------------------------------------------------------------------------------------- written once

@pytest.mark.parametrize("cls", CONFIGS, ids=lambda c: c.__name__)
def test_every_field_has_help_and_every_option_default_is_the_field_default(cls):
    options = options_of(cls)
    assert all(f.metadata.get("help") for f in dataclasses.fields(cls)), "a field without help text"
    assert len(options) == len(cli_fields(cls))
    parsed = from_options(cls, {name: opt.default for name, opt in options.items()})
    for f in cli_fields(cls):
        assert getattr(parsed, f.name) == getattr(cls(), f.name), f.name
    assert parsed == cls()


@pytest.mark.parametrize("cls", CONFIGS, ids=lambda c: c.__name__)
def test_help_text_comes_from_the_field(cls):
    options = options_of(cls)
    for f in cli_fields(cls):
        name = f.metadata.get("option", f.name)
        assert options[name].help.startswith(f.metadata["help"]), name


def test_commands_run_with_the_dataclass_defaults(monkeypatch, tmp_path):
    """What `featcache extract/train/probe` passes on when only the required options are given."""
    seen = []
    monkeypatch.setattr("featcache.extract.run_extract", lambda cfg: seen.append(cfg) or "c")
    monkeypatch.setattr("featcache.engine.train", lambda cfg: seen.append(cfg) or {})
    result = {k: 0 for k in ("top1", "top5", "train_top1", "weight_decay", "num_train", "num_val", "feature_dim")}
    monkeypatch.setattr("featcache.probe.run_probe", lambda cfg: seen.append(cfg) or dict(result, random_init=False))
    for args in (["extract", "--data", "d", "--out", "o"], ["train", "--cache", "c"],
                 ["probe", "--student", "s", "--data", "d", "--val", "v"]):
        res = CliRunner().invoke(main, args)
        assert res.exit_code == 0, res.output
    assert seen == [ExtractConfig(data="d", out="o"), TrainConfig(cache="c"),
                    ProbeConfig(student="s", data="d", val="v")]


def test_setting_copies_mutable_defaults():
    @dataclasses.dataclass
    class Toy:
        xs: list = setting([1, 2], "a list")

    a, b = Toy(), Toy()
    a.xs.append(3)
    assert b.xs == [1, 2]


# ------------------------------------------------------------------------------------ choices from registries

def choice_fields() -> list[tuple[str, str, object]]:
    return [(cls.__name__, f.name, f.metadata[key]) for cls in CONFIGS for f in dataclasses.fields(cls)
            for key in ("choices", "listed") if key in f.metadata]


@pytest.mark.parametrize("owner, name, ref", choice_fields(), ids=lambda x: x if isinstance(x, str) else None)
def test_every_choice_reference_resolves(owner, name, ref):
    assert names_of(ref), f"{owner}.{name}: {ref!r} names no choices"


def test_config_module_imports_no_registry():
    import subprocess
    import sys

    code = ("import sys, featcache.config, featcache.options, featcache.cli; "
            "print(sorted(m for m in sys.modules if m.startswith('featcache.') or m in ('torch', 'zarr')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert eval(out) == ["featcache.cli", "featcache.config", "featcache.errors", "featcache.options"]


@pytest.fixture
def toy_plugins(monkeypatch):
    """A store format, a method and a view policy registered for one test only."""
    import featcache.datasets
    from featcache.methods import METHODS
    from featcache.stores import WRITERS

    for registry in (WRITERS, METHODS):
        monkeypatch.setattr(registry, "_items", dict(registry._items))
    WRITERS.register("toystore")(type("ToyWriter", (), {}))
    METHODS.register("toymethod")(type("ToyMethod", (), {}))
    monkeypatch.setattr(featcache.datasets, "VIEW_POLICIES", (*featcache.datasets.VIEW_POLICIES, "toypolicy"))


def test_registered_plugins_appear_in_the_choices(toy_plugins):
    assert "toystore" in options_of(ExtractConfig)["format"].type.choices
    train = options_of(TrainConfig)
    assert "toymethod" in train["method"].help
    assert "toypolicy" in train["view_policy"].type.choices
    assert {"fp32", "fp16", "bf16"} == set(train["cache_dtype"].type.choices)


def test_a_yaml_value_outside_the_choices_is_named(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("cache: c\nview_policy: sometimes\n")
    res = CliRunner().invoke(main, ["train", "--config", str(recipe)])
    assert res.exit_code == 1 and "view_policy: 'sometimes' is not one of cycle, random" in res.output
    assert "Traceback" not in res.output


# --------------------------------------------------------------------------------------- CLI text -> values

def test_option_text_becomes_field_values(monkeypatch, tmp_path):
    seen = []
    monkeypatch.setattr("featcache.engine.train", lambda cfg: seen.append(cfg) or {})
    recipe = tmp_path / "r.yaml"
    recipe.write_text("cache: from_yaml\nepochs: 7\nlr: 0.5\nmethod_args: {vitkd: {alpha: 1}}\n")
    res = CliRunner().invoke(main, ["train", "--config", str(recipe), "--lr", "0.25", "--grad-clip", "0",
                                    "--betas", "0.8", "0.9", "--pretrained", "--student-kwargs", '{"depth": 2}',
                                    "--method-arg", "nkd.gamma=2", "--method-arg", "lam=1e-4", "--resume"])
    assert res.exit_code == 0, res.output
    cfg = seen[0]
    assert (cfg.cache, cfg.epochs, cfg.lr, cfg.grad_clip, cfg.betas, cfg.pretrained, cfg.resume) == (
        "from_yaml", 7, 0.25, None, (0.8, 0.9), True, True)
    assert cfg.student_kwargs == {"depth": 2}
    assert cfg.method_args == {"vitkd": {"alpha": 1}, "nkd": {"gamma": 2}, "lam": 1e-4}


def test_extract_tuples_lists_and_toggles(monkeypatch):
    seen = []
    monkeypatch.setattr("featcache.extract.run_extract", lambda cfg: seen.append(cfg) or "c")
    res = CliRunner().invoke(main, ["extract", "--data", "d", "--out", "o", "--scale", "0.2", "0.9", "--layers",
                                    "0,1,11", "--no-pretrained", "--skip-corrupt", "--teacher-kwargs", '{"depth": 4}'])
    assert res.exit_code == 0, res.output
    assert (seen[0].scale, seen[0].layers, seen[0].pretrained, seen[0].skip_corrupt, seen[0].teacher_kwargs) == (
        (0.2, 0.9), [0, 1, 11], False, True, {"depth": 4})


@pytest.mark.parametrize("args, named", [
    (["--teacher-kwargs", "{depth: 4"], "--teacher-kwargs"),
    (["--teacher-kwargs", "[4]"], "--teacher-kwargs"),
    (["--layers", "0,x"], "--layers"),
])
def test_bad_option_text_is_named_in_one_line(monkeypatch, args, named):
    monkeypatch.setattr("featcache.extract.run_extract", lambda cfg: pytest.fail("ran with a bad option"))
    res = CliRunner().invoke(main, ["extract", "--data", "d", "--out", "o", *args])
    assert res.exit_code != 0 and named in res.output and "Traceback" not in res.output


def test_a_malformed_method_arg_is_a_usage_error():
    res = CliRunner().invoke(main, ["train", "--cache", "c", "--method-arg", "alpha"])
    assert res.exit_code == 2 and "--method-arg" in res.output and "key=value" in res.output


def test_parsers():
    assert parse_int_list("0, 1,-1") == [0, 1, -1]
    with pytest.raises(ConfigError, match="--layers"):
        parse_int_list("a")
    assert parse_pairs(["a=[1, 2]", "b.c=x"], base={"b": {"d": 1}}) == {"a": [1, 2], "b": {"d": 1, "c": "x"}}


# ------------------------------------------------------------------------------------------ YAML and keys

@pytest.mark.parametrize("cfg", [
    ExtractConfig(data="d", out="o", layers=[0, -1], scale=(0.2, 1.0), teacher_kwargs={"depth": 4}, topk=5),
    TrainConfig(cache="c", method_args={"vitkd": {"alpha": 1e-4}}, betas=(0.8, 0.9), grad_clip=None, lr=3e-4),
    ProbeConfig(student="s", data="d", val="v", weight_decays=(0.1, 0.2)),
], ids=lambda c: type(c).__name__)
def test_yaml_round_trip(cfg, tmp_path):
    save_yaml(cfg, tmp_path / "config.yaml")
    assert from_dict(type(cfg), load_yaml(tmp_path / "config.yaml")) == cfg


def test_unknown_keys_are_named_with_the_known_ones():
    with pytest.raises(ConfigError, match=r"unknown TrainConfig keys \['batch'\]; known keys: \[.*'batch_size'"):
        from_dict(TrainConfig, {"epochs": 1, "batch": 3})


def test_unknown_yaml_key_through_the_cli(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("cache: c\nbatch: 3\n")
    res = CliRunner().invoke(main, ["train", "--config", str(recipe)])
    assert res.exit_code == 1 and "['batch']" in res.output and "Traceback" not in res.output


@pytest.mark.parametrize("text, match", [
    ("a: !!python/object/apply:os.system ['echo hi']\n", "no !!python tags"),
    ("a: [1, 2\n", "not a plain YAML file"),
    ("- 1\n- 2\n", "expected a YAML mapping"),
])
def test_bad_yaml_names_the_file(tmp_path, text, match):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=match) as err:
        load_yaml(path)
    assert str(path) in str(err.value)
    res = CliRunner().invoke(main, ["extract", "--config", str(path)])
    assert res.exit_code == 1 and str(path) in res.output and "Traceback" not in res.output


def test_missing_yaml_file():
    with pytest.raises(MissingFileError, match="nowhere.yaml"):
        load_yaml("nowhere.yaml")


@pytest.mark.parametrize("cfg, match", [
    (ExtractConfig(), "--data"), (ExtractConfig(data="d", out="o", shots=1, fraction=0.5), "not both"),
    (ExtractConfig(data="d", out="o", views=0), "--views"), (ExtractConfig(data="d", out="o", layers=[]), "--layers"),
    (TrainConfig(), "--cache"), (TrainConfig(cache="c", epochs=0), "--epochs"),
    (TrainConfig(cache="c", keep_decoded=True), "--keep-decoded needs --workers 0 \\(got 2\\)"),
])
def test_validate_raises_config_errors(cfg, match):
    with pytest.raises(ConfigError, match=match):
        cfg.validate()


def test_a_method_arg_that_is_not_yaml_is_named():
    with pytest.raises(ConfigError, match="--method-arg: '\\[1, 2' is not a YAML value"):
        parse_pairs(["layers=[1, 2"])
