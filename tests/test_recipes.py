"""Every recipe under train/ loads, validates and names real methods with real arguments."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from featcache.config import TrainConfig, from_dict, load_yaml
from featcache.methods import parse_method_spec
from featcache.sweep import check_method_args

TRAIN = Path(__file__).resolve().parents[1] / "train"
RECIPES = sorted(TRAIN.rglob("*.yaml"))


def test_recipes_exist_for_the_paper_settings():
    names = {str(p.relative_to(TRAIN)) for p in RECIPES}
    for required in ("vitkd/deit_tiny_from_deit3_small.yaml", "vitkd/deit_tiny_from_deit3_small_nkd.yaml",
                     "kd/deit_tiny_from_deit3_small.yaml", "nkd/deit_tiny_from_deit3_small.yaml",
                     "featreg/deit_tiny_from_deit3_small.yaml"):
        assert required in names


@pytest.mark.parametrize("path", RECIPES, ids=[str(p.relative_to(TRAIN)) for p in RECIPES])
def test_recipe_loads_and_validates(path):
    values = load_yaml(path)
    cfg = from_dict(TrainConfig, values)
    cfg.validate()
    methods = [name for name, _ in parse_method_spec(cfg.method)]
    check_method_args(cfg.method, cfg.method_args)
    # Names are the API: <method>/<student>_from_<teacher>.yaml, the folder being the (first) method.
    assert path.parent.name == methods[0], f"{path}: folder {path.parent.name!r} != method {methods[0]!r}"
    assert re.fullmatch(r"[a-z0-9_]+_from_[a-z0-9_]+", path.stem), path.stem
    text = path.read_text()
    assert "featcache extract" in text and "--out" in text, f"{path}: header must give the extract command"
    assert "!!" not in text  # no YAML tags: recipes are data, never code


@pytest.mark.parametrize("path", [p for p in RECIPES if "deit3_small" in p.stem and p.parent.name in
                                  ("vitkd", "kd", "nkd", "featreg")], ids=lambda p: str(p.relative_to(TRAIN)))
def test_deit3_small_recipes_follow_the_vitkd_schedule(path):
    cfg = from_dict(TrainConfig, load_yaml(path))
    assert (cfg.student, cfg.epochs, cfg.warmup_epochs, cfg.weight_decay, cfg.grad_clip) == ("deit_tiny", 300, 20,
                                                                                              0.05, 5.0)
    assert cfg.label_smoothing == 0.1 and cfg.min_lr == 1e-5
    # AdamW lr 1e-3 at a total batch of 1024: batch_size x grad_accum on one process, scaled linearly otherwise.
    assert cfg.lr == 1e-3 and cfg.lr_base_batch == 1024 and cfg.batch_size * cfg.grad_accum == 1024


def test_extract_command_in_header_matches_the_cache(tmp_path):
    for path in RECIPES:
        cfg = from_dict(TrainConfig, load_yaml(path))
        header = " ".join(line.lstrip("# ").rstrip("\\") for line in path.read_text().splitlines()
                          if line.startswith("#"))
        match = re.search(r"featcache extract .*?--out (\S+)", header)
        assert match and match.group(1) == cfg.cache, f"{path}: the extract command writes another cache"


def test_unknown_method_argument_is_named():
    with pytest.raises(ValueError, match=r"no argument\(s\) \['alpah'\]"):
        check_method_args("vitkd", {"alpah": 1.0})
