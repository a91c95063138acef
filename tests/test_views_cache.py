"""Caches of RandAugment, random-erasing and mixed views: stored views replay to their fingerprints, the bytes do not
depend on batch size, workers, resume or SIGKILL, `verify` passes, training from the cache equals training with
the teacher online at every step, and ``--fresh-views`` draws new views each epoch."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from featcache import engine
from featcache.cli import main
from featcache.config import ExtractConfig, TrainConfig
from featcache.datasets import CachedViewDataset
from featcache.errors import ConfigError
from featcache.extract import run_extract
from featcache.sources import source_from_manifest
from featcache.stores import open_reader
from featcache.testing.caches import STUDENT, TINY_VIT_TEACHER, make_cache, reset_accelerate
from featcache.testing.images import make_image_folder
from featcache.verify import verify_cache
from featcache.views import Recipe, fingerprint, replay

DEIT = dict(aa="rand-m9-mstd0.5-inc1", reprob=0.25, mixup=0.8, cutmix=1.0)  # DeiT's recipe (timm's flags)
RECIPES = {"rand_augment": dict(aa="rand-m9-mstd0.5-inc1"), "random_erasing": dict(reprob=0.6),
           "mixup": dict(mixup=0.8), "cutmix": dict(cutmix=1.0), "deit": DEIT}
TINY = dict(teacher="vit_tiny_patch16_224", teacher_kwargs=TINY_VIT_TEACHER, pretrained=False, img_size=32,
            num_classes=3, layers=[0, -1], views=3, shard_size=5, batch_size=4, workers=0, device="cpu", dtype="fp32")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # byte-identity is checked against subprocesses that also run one thread
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("imgs"), classes=3, per_class=3, size=(36, 44))


def extract(folder, out, **kw) -> str:
    return run_extract(ExtractConfig(data=str(folder), out=str(out), **{**TINY, **kw}), progress=False)


def tree_bytes(root) -> dict[str, bytes]:
    root = Path(root)
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def deit_cache(folder, tmp_path_factory):
    return extract(folder, tmp_path_factory.mktemp("deit") / "cache", **DEIT)


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_every_stored_view_replays_to_its_fingerprint_and_verifies(name, folder, tmp_path):
    cache = extract(folder, tmp_path / "cache", **RECIPES[name])
    reader = open_reader(cache)
    m, rec = reader.manifest, reader.records()
    recipe = Recipe.from_dict(m["views"]["recipe"])
    ops, mix = [op.name for op in recipe.ops], recipe.mix
    assert {"rand_augment": "rand_augment" in ops, "random_erasing": "random_erasing" in ops,
            "mixup": mix is not None and mix.cutmix_alpha == 0, "cutmix": mix is not None and mix.mixup_alpha == 0,
            "deit": mix is not None and {"rand_augment", "random_erasing"} <= set(ops)}[name]
    assert m["views"]["param_names"] == recipe.param_names and rec["params"].shape == (27, len(recipe.param_names))
    source = source_from_manifest(m)
    for row in range(m.num_rows):
        params = rec["params"][row]
        partner = recipe.partner_of(params)
        view = replay(source.load(int(rec["sample"][row])), recipe, params,
                      None if partner is None else source.load(partner))
        assert fingerprint(view) == int(rec["fingerprint"][row]), row
    result = verify_cache(cache, samples=m.num_rows, device="cpu")
    assert result["ok"] and not result["fingerprint_mismatches"]
    assert all(t["max_abs"] <= 1e-5 for t in result["targets"].values()), result["targets"]


def test_mixed_cache_records_the_mix_and_mixes_most_views(deit_cache):
    m = open_reader(deit_cache).manifest
    assert m["views"]["recipe"]["mix"] == {"mixup_alpha": 0.8, "cutmix_alpha": 1.0, "prob": 1.0, "switch_prob": 0.5,
                                           "correct_lam": True}
    names = m["views"]["param_names"]
    assert [op["name"] for op in m["views"]["recipe"]["ops"]] == ["rrc", "hflip", "rand_augment", "random_erasing"]
    kinds = open_reader(deit_cache).records()["params"][:, names.index("mix.kind")]
    assert set(kinds) == {1.0, 2.0}  # Mixup and CutMix both occur; prob 1: every view is mixed


def test_batch_size_workers_and_resume_give_identical_bytes(folder, deit_cache, tmp_path):
    want = tree_bytes(deit_cache)
    for bs, workers in ((3, 0), (7, 2)):
        out = extract(folder, tmp_path / f"b{bs}w{workers}", batch_size=bs, workers=workers, **DEIT)
        assert tree_bytes(out) == want, (bs, workers)
    extract_cfg = ExtractConfig(data=str(folder), out=str(tmp_path / "resumed"), **{**TINY, **DEIT, "batch_size": 2})
    run_extract(extract_cfg, progress=False, max_units=2)
    assert not open_reader(extract_cfg.out, require_complete=False).manifest.complete
    run_extract(extract_cfg, progress=False)
    assert tree_bytes(extract_cfg.out) == want


_KILL_SCRIPT = textwrap.dedent("""
    import json, sys, time
    import torch
    torch.set_num_threads(1)  # like the parent test process, so the bytes can match
    import featcache.extract as ex
    import featcache.extract_units as units
    from featcache.config import ExtractConfig
    slow = units.launch_targets  # every unit's forward goes through it
    def launch_targets(*a, **k):  # slow the run down so the parent can kill it mid-way
        time.sleep(0.4)
        return slow(*a, **k)
    units.launch_targets = launch_targets
    ex.run_extract(ExtractConfig(**json.loads(sys.argv[1])), progress=False)
""")


@pytest.mark.slow
def test_sigkill_then_resume_equals_uninterrupted(folder, deit_cache, tmp_path):
    out = tmp_path / "cache"
    args = {**TINY, **DEIT, "data": str(folder), "out": str(out)}
    proc = subprocess.Popen([sys.executable, "-c", _KILL_SCRIPT, json.dumps(args)])
    marker = out / "_featcache" / "units" / "unit-000001.json"
    deadline = time.time() + 120
    while not marker.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the extraction finished before it could be killed"
    assert not open_reader(out, require_complete=False).manifest.complete
    extract(folder, out, **DEIT)
    assert tree_bytes(out) == tree_bytes(deit_cache)


# ---------------------------------------------------------------------------------------------------- stage 2


@pytest.fixture(scope="module")
def parity_cache(tmp_path_factory):
    """fp32 cache of mixed RandAugment + erasing views of the stage-2 tests' teacher (deit3_small, blocks 0, 1, 11)."""
    root = tmp_path_factory.mktemp("parity")
    return make_cache(root, **DEIT)[1]


def train_records(out) -> list[dict]:
    return [r for r in map(json.loads, (Path(out) / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "train"]


@pytest.mark.usefixtures("clean_accelerate")
def test_mixed_cache_and_online_teacher_give_the_same_loss_every_step(parity_cache, tmp_path):
    def cfg(out, **kw):
        return TrainConfig(cache=parity_cache, out=str(tmp_path / out), method="vitkd+nkd", epochs=2, batch_size=2,
                           workers=0, log_every=1, seed=3, cache_dtype="fp32", **STUDENT, **kw)

    engine.train(cfg("cached"))
    reset_accelerate()
    engine.train(cfg("online", online_teacher=True))
    a, b = train_records(tmp_path / "cached"), train_records(tmp_path / "online")
    assert len(a) == len(b) == 6
    for ra, rb in zip(a, b):
        for key in ("loss", "ce", "vitkd/mimic", "vitkd/generation", "nkd/target", "nkd/non_target"):
            assert abs(ra[key] - rb[key]) <= 1e-4 * abs(ra[key]), (ra["step"], key, ra[key], rb[key])


def test_mixed_items_carry_soft_lambda_mixed_labels(parity_cache):
    reader = open_reader(parity_cache)
    m = reader.manifest
    recipe = Recipe.from_dict(m["views"]["recipe"])
    ds = CachedViewDataset(reader, source_from_manifest(m), recipe, ["logits"], num_classes=1000,
                           label_smoothing=0.1, fingerprint_checks=m["num_samples"])
    labels = source_from_manifest(m).label_array()
    for index in range(len(ds)):
        item = ds[index]  # every item's fingerprint is checked
        p = dict(zip(recipe.param_names, reader.records()["params"][item["row"]]))
        target, lam = item["label"], p["mix.lam"]
        assert target.shape == (1000,) and float(target.sum()) == pytest.approx(1.0, abs=1e-5)
        own, other = labels[item["sample"]], labels[int(p["mix.partner"])]
        assert float(target[own]) >= lam * 0.9 and float(target[other]) >= (1 - lam) * 0.9
    with pytest.raises(ValueError, match="num_classes"):
        CachedViewDataset(reader, source_from_manifest(m), recipe, ["logits"])


def test_fresh_views_are_new_every_epoch_and_a_function_of_seed_epoch_sample(parity_cache):
    reader = open_reader(parity_cache)
    m = reader.manifest
    recipe = Recipe.from_dict(m["views"]["recipe"])

    def fingerprints(epoch, order):
        ds = CachedViewDataset(reader, source_from_manifest(m), recipe, [], with_targets=False, num_classes=1000,
                               seed=5, fresh_views=True)
        ds.set_epoch(epoch)
        return {i: fingerprint(ds[i]["image"]) for i in order}

    n = m["num_samples"]
    first = fingerprints(0, range(n))
    assert fingerprints(0, reversed(range(n))) == first
    assert all(a != b for a, b in zip(first.values(), fingerprints(1, range(n)).values()))
    stored = set(reader.records()["fingerprint"].tolist())
    assert not stored & set(first.values())  # never one of the cached views


@pytest.mark.usefixtures("clean_accelerate")
def test_max_views_uses_the_first_k_stored_views(parity_cache, tmp_path):
    reader = open_reader(parity_cache)
    m = reader.manifest
    recipe = Recipe.from_dict(m["views"]["recipe"])
    ds = CachedViewDataset(reader, source_from_manifest(m), recipe, [], with_targets=False, num_classes=1000,
                           max_views=1)
    rows = set()
    for epoch in range(3):
        ds.set_epoch(epoch)
        rows |= {ds.row_of(i) for i in range(len(ds))}
    assert rows == {s * m.views_per_sample for s in range(len(ds))}  # view 0 of every sample, every epoch
    with pytest.raises(ConfigError, match="holds 2 views per sample"):
        engine.train(TrainConfig(cache=parity_cache, out=str(tmp_path / "run"), max_views=3, **STUDENT))


@pytest.mark.usefixtures("clean_accelerate")
def test_fresh_view_run_trains_with_the_teacher_online(parity_cache, tmp_path):
    result = engine.train(TrainConfig(cache=parity_cache, out=str(tmp_path / "fresh"), method="kd", epochs=1,
                                      batch_size=3, workers=0, online_teacher=True, fresh_views=True, **STUDENT))
    assert result["steps"] == 2 and any("--fresh-views" in c for c in result["online_teacher_cost"])
    with pytest.raises(ConfigError, match="--fresh-views needs --online-teacher"):
        TrainConfig(cache=parity_cache, fresh_views=True).validate()


# ---------------------------------------------------------------------------------------------------- the CLI


def test_extract_takes_timms_flags_and_train_refuses_them(folder, tmp_path):
    help_text = CliRunner().invoke(main, ["extract", "--help"], terminal_width=200).output
    for flag in ("--aa", "--reprob", "--remode", "--mixup", "--cutmix", "--mixup-prob", "--mixup-switch-prob"):
        assert flag in help_text
    train_help = CliRunner().invoke(main, ["train", "--help"], terminal_width=200).output
    assert "--fresh-views" in train_help and "Refused: views are fixed at extraction" in train_help
    for flags in (["--aa", "rand-m9-mstd0.5-inc1"], ["--mixup", "0.8", "--cutmix", "1.0"], ["--reprob", "0.25"],
                  ["--scale", "0.5", "1.0"]):
        res = CliRunner().invoke(main, ["train", "--cache", str(tmp_path), *flags])
        assert res.exit_code == 1 and "inputs the teacher never saw" in res.output, res.output
        assert f"featcache extract {flags[0]}" in res.output


@pytest.mark.parametrize("flags, match", [
    (["--aa", "v0"], "only timm RandAugment"), (["--aa", "rand-m9", "--color-jitter", "0.4"], "drops colour jitter"),
    (["--reprob", "1.5"], "prob"), (["--mixup", "0.8", "--mixup-prob", "2"], "prob")])
def test_bad_view_flags_fail_before_the_teacher_loads(flags, match, folder, tmp_path, monkeypatch):
    import featcache.extract as ex

    monkeypatch.setattr(ex, "load_teacher", lambda *a, **k: pytest.fail("the teacher was loaded"))
    res = CliRunner().invoke(main, ["extract", "--data", str(folder), "--out", str(tmp_path / "c"), *flags])
    assert res.exit_code == 1 and match in res.output and "view flags" in res.output, res.output
