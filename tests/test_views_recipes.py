"""The extract command in every recipe's header is a valid `featcache extract` call whose views follow the official
settings: RandAugment rand-m9-mstd0.5-inc1 + random erasing 0.25 (ViTKD, NKD, ScaleKD), plus Mixup/CutMix for
function matching."""
from __future__ import annotations

import shlex
from pathlib import Path

import pytest

from featcache.cli import main
from featcache.config import TrainConfig, from_dict, load_yaml
from featcache.extract import _CHECK_NORM, view_recipe
from featcache.options import load_config

TRAIN = Path(__file__).resolve().parents[1] / "train"
RECIPES = sorted(TRAIN.rglob("*.yaml"))
OFFICIAL = ("vitkd", "nkd", "scalekd")


def header_extract(path: Path) -> list[str]:
    """The `featcache extract ...` arguments written in a recipe's header comment (with its continuation lines)."""
    lines = [line.lstrip("# ") for line in path.read_text().splitlines() if line.startswith("#")]
    start = next(i for i, line in enumerate(lines) if line.startswith("featcache extract"))
    command = []
    for line in lines[start:]:
        command.append(line.rstrip("\\"))
        if not line.endswith("\\"):
            break
    return shlex.split(" ".join(command))[2:]


def extract_config(args: list[str]):
    command = main.commands["extract"]
    ctx = command.make_context("extract", list(args))
    options = dict(ctx.params)
    return load_config(ctx, options.pop("config_path"), options)


@pytest.mark.parametrize("path", RECIPES, ids=[str(p.relative_to(TRAIN)) for p in RECIPES])
def test_header_extract_command_parses_and_builds_its_views(path):
    cfg = extract_config(header_extract(path))
    cfg.validate()
    assert cfg.out == from_dict(TrainConfig, load_yaml(path)).cache
    recipe = view_recipe(cfg, 224, _CHECK_NORM)
    ops = [op.name for op in recipe.ops]
    if path.parent.name in OFFICIAL:
        assert cfg.aa == "rand-m9-mstd0.5-inc1" and cfg.reprob == 0.25 and recipe.mix is None, path
        assert ops == ["rrc", "hflip", "rand_augment", "random_erasing"]
    if "function_matching" in path.stem:
        assert (recipe.mix.mixup_alpha, recipe.mix.cutmix_alpha, recipe.mix.switch_prob) == (0.8, 1.0, 0.5)
        assert from_dict(TrainConfig, load_yaml(path)).ce_weight == 0.0  # function matching uses no labels


def test_a_function_matching_recipe_exists():
    assert any("function_matching" in p.stem for p in RECIPES)
