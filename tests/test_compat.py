"""The pre-step-0 compatibility check: every mismatch is named with its fix, before anything trains."""
from __future__ import annotations

import pytest
from featcache.testing.caches import STUDENT, make_cache, reset_accelerate

from featcache import compat, engine
from featcache.config import TrainConfig
from featcache.methods import METHODS
from featcache.stores import open_reader


@pytest.fixture(scope="module")
def caches(tmp_path_factory):
    root = tmp_path_factory.mktemp("compat")
    _, full = make_cache(root, name="full", per_class=2)
    _, last_only = make_cache(root, name="last_only", per_class=2, layers=[11])
    return {"root": root, "full": full, "last_only": last_only}


pytestmark = pytest.mark.usefixtures("clean_accelerate")


def specs(*names: str, **args) -> list:
    return [(n, METHODS.get(n), args.get(n, {})) for n in names]


def cfg(cache: str, **kw) -> TrainConfig:
    return TrainConfig(cache=cache, **kw)


def test_missing_layers_are_named_with_the_extract_flags(caches, tmp_path, monkeypatch):
    def no_student(*a, **k):
        raise AssertionError("nothing may be built before the compatibility check")

    monkeypatch.setattr(engine, "build_student", no_student)
    with pytest.raises(compat.CompatError, match=r"lacks teacher blocks \[0, 1\] needed by vitkd.*--layers 0,1,11"):
        engine.train(TrainConfig(cache=caches["last_only"], out=str(tmp_path / "r"), method="vitkd", workers=0,
                                 **STUDENT))
    assert not (tmp_path / "r" / "metrics.jsonl").exists()


def test_wrong_image_size_and_wrong_teacher_fail_before_training(caches, tmp_path):
    kw = dict(cache=caches["full"], out=str(tmp_path / "r"), method="kd", workers=0, student="deit_tiny")
    with pytest.raises(compat.CompatError, match=r"student would see 64 px but the cache holds 32 px.*--img-size 32"):
        engine.train(TrainConfig(img_size=64, **kw))
    reset_accelerate()
    with pytest.raises(compat.CompatError, match=r"extracted from 'deit3_small'.*not 'vit_base'.*--teacher vit_base"):
        engine.train(TrainConfig(teacher="vit_base", **kw))


def test_every_problem_is_listed_at_once(caches):
    m = open_reader(caches["last_only"]).manifest
    with pytest.raises(compat.CompatError) as err:
        compat.check(m, cfg(caches["last_only"], img_size=48, cache_dtype="fp16", teacher="deit_small"),
                     specs("vitkd", "kd"))
    text = str(err.value)
    for needle in ("image size", "dtype: the cache stores fp32", "--dtype fp16", "teacher:", "layers:"):
        assert needle in text


def test_matching_run_passes_and_teacher_aliases_resolve(caches):
    m = open_reader(caches["full"]).manifest
    for teacher in (None, "deit3_small", "deit3_small_patch16_224", m["teacher"]["timm_name"]):
        compat.check(m, cfg(caches["full"], img_size=32, teacher=teacher, cache_dtype="fp32"),
                     specs("vitkd", "nkd", "kd", "featreg"))


def test_classes_of_student_data_and_teacher_logits(caches):
    m = open_reader(caches["full"]).manifest
    with pytest.raises(compat.CompatError, match="data has 3 classes.*--num-classes 3"):
        compat.check(m, cfg(caches["full"], num_classes=2), specs("ce"))
    with pytest.raises(compat.CompatError, match="kd compares the student's 10 logits with the teacher's 1000"):
        compat.check(m, cfg(caches["full"], num_classes=10), specs("kd"))
    compat.check(m, cfg(caches["full"], num_classes=10), specs("featreg"))  # features only: any head size


def test_missing_logits_and_inconsistent_token_layout(caches):
    m = open_reader(caches["full"]).manifest.copy()
    del m["targets"]["logits"]
    m["targets"]["block_0"]["shape"] = [7, 384]
    with pytest.raises(compat.CompatError) as err:
        compat.check(m, cfg(caches["full"]), specs("nkd"))
    assert "lacks ['logits'] needed by nkd" in str(err.value)
    assert "block_0 holds 7 tokens" in str(err.value) and "1 prefix + [2, 2] grid" in str(err.value)


def test_bad_method_arguments_are_reported_as_compat_problems(caches):
    m = open_reader(caches["full"]).manifest
    with pytest.raises(compat.CompatError, match="method vitkd"):
        compat.check(m, cfg(caches["full"]), specs("vitkd", vitkd={"teacher_shallow": [40]}))
