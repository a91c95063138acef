"""What the loop trains with (featcache.build): method resolution, student, task, optimizer, schedule."""
from __future__ import annotations

import math

import pytest
import torch
from featcache.testing.caches import STUDENT, make_cache

from featcache import build, compat, models
from featcache.config import TrainConfig
from featcache.errors import ConfigError
from featcache.methods import METHODS
from featcache.methods.task import DistillTask, MethodSpec, split_method_args
from featcache.stores import open_reader


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    _, path = make_cache(tmp_path_factory.mktemp("build"), per_class=2)
    return open_reader(path).manifest


def test_scheduler_warms_up_then_follows_a_cosine_to_min_lr():
    model = torch.nn.Linear(2, 2)
    cfg = TrainConfig(cache="x", lr=1.0, min_lr=0.1, epochs=2, warmup_epochs=1, batch_size=1)
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr)
    sched = build.build_scheduler(cfg, opt, batches_per_epoch=4, num_processes=1)
    lrs = []
    for _ in range(8):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    cosine = [0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * k / 4)) for k in range(4)]
    assert lrs[4:] == pytest.approx(cosine)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1)


def test_max_steps_shortens_the_cosine():
    opt = torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=1.0)
    cfg = TrainConfig(cache="x", lr=1.0, min_lr=0.0, epochs=10, max_steps=4)
    sched = build.build_scheduler(cfg, opt, batches_per_epoch=4, num_processes=1)
    for _ in range(4):
        opt.step()
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)


def test_optimizer_skips_weight_decay_on_1d_and_vit_tokens():
    student = models.load_model("deit_tiny", pretrained=False, img_size=32, num_classes=3, depth=1)
    task = DistillTask(student, {}, ce_weight=1.0)
    cfg = TrainConfig(cache="x", weight_decay=0.05, lr=1e-3, lr_base_batch=4, batch_size=2, grad_accum=2)
    opt = build.build_optimizer(cfg, task, num_processes=2)
    no_decay = {id(p) for g in opt.param_groups if g["weight_decay"] == 0 for p in g["params"]}
    assert id(student.pos_embed) in no_decay and id(student.cls_token) in no_decay
    assert id(student.blocks[0].norm1.weight) in no_decay and id(student.head.weight) not in no_decay
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-3 * 2 * 2 * 2 / 4)


def test_method_args_split_single_and_composite():
    assert split_method_args(["kd"], {"temperature": 4}) == {"kd": {"temperature": 4}}
    assert split_method_args(["kd"], {"kd": {"temperature": 4}}) == {"kd": {"temperature": 4}}
    both = split_method_args(["vitkd", "nkd"], {"nkd": {"gamma": 2}})
    assert both == {"vitkd": {}, "nkd": {"gamma": 2}}
    with pytest.raises(ValueError, match="name.key=value"):
        split_method_args(["vitkd", "nkd"], {"gamma": 2})


def test_resolve_methods_gives_specs_and_checks_the_cache_first(manifest):
    cfg = TrainConfig(cache="c", method="vitkd:0.5+nkd", method_args={"nkd": {"gamma": 2.0}}, **STUDENT)
    specs = build.resolve_methods(cfg, manifest)
    assert [tuple(s) for s in specs] == [("vitkd", METHODS.get("vitkd"), {}, 0.5),
                                         ("nkd", METHODS.get("nkd"), {"gamma": 2.0}, 1.0)]
    with pytest.raises(compat.CompatError, match="student would see 64 px"):
        build.resolve_methods(TrainConfig(cache="c", method="kd", img_size=64), manifest)
    with pytest.raises(ValueError, match="names a method twice"):
        build.resolve_methods(TrainConfig(cache="c", method="kd+kd", img_size=32), manifest)


def test_ce_weight_targets_and_student_spec(manifest):
    specs = [MethodSpec("kd", METHODS.get("kd"), {}, 1.0), MethodSpec("vitkd", METHODS.get("vitkd"), {}, 1.0)]
    cfg = TrainConfig(cache="c", **STUDENT)
    assert build.resolve_ce_weight(cfg, specs) == min(METHODS.get("kd").default_ce_weight,
                                                      METHODS.get("vitkd").default_ce_weight)
    assert build.resolve_ce_weight(TrainConfig(cache="c", ce_weight=0.25), specs) == 0.25
    needed = build.required_targets(manifest, specs)
    assert needed == sorted(needed) and "logits" in needed and set(needed) <= set(manifest["targets"])
    spec = build.student_spec(cfg, manifest, 32)
    # The real timm name behind the alias (issue 12: timm.create_model rejects "deit_tiny").
    assert spec == {"model": "deit_tiny_patch16_224.fb_in1k", "img_size": 32,
                    "num_classes": int(manifest["teacher"]["num_classes"]), "model_kwargs": {"depth": 4}}


def test_student_and_task_are_seeded_and_wired(manifest):
    cfg = TrainConfig(cache="c", method="kd", seed=5, **STUDENT)
    specs = build.resolve_methods(cfg, manifest)
    a, b = (build.build_student(cfg, manifest, specs, 32) for _ in range(2))
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    task = build.build_task(cfg, manifest, a, specs, 32)
    assert isinstance(task, DistillTask) and list(task.methods) == ["kd"] and task.student is a
    with pytest.raises(compat.CompatError, match="method vitkd cannot run"):
        bad = [MethodSpec("vitkd", METHODS.get("vitkd"), {"alpha": "x", "no_such_arg": 1}, 1.0)]
        build.build_task(cfg, manifest, a, bad, 32)


def test_no_eval_loader_without_val(manifest):
    assert build.build_eval_loader(TrainConfig(cache="c"), manifest, 32, {}) is None


def _v01_lr_factor(cfg: TrainConfig, batches_per_epoch: int, num_processes: int):
    """The per-step LambdaLR factor featcache used before its schedules came from timm (copied verbatim)."""
    steps_per_epoch = math.ceil(batches_per_epoch / cfg.grad_accum)
    total = steps_per_epoch * cfg.epochs
    if cfg.max_steps is not None:
        total = min(total, cfg.max_steps * num_processes)
    warmup = int(round(cfg.warmup_epochs * steps_per_epoch))
    floor = min(cfg.min_lr / cfg.lr, 1.0) if cfg.lr > 0 else 0.0

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min((step - warmup) / max(total - warmup, 1), 1.0)
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor, total


DEFAULT_SCHEDULES = [dict(), dict(warmup_epochs=1), dict(warmup_epochs=0.5, epochs=3), dict(warmup_epochs=2.6),
                     dict(max_steps=5), dict(max_steps=5, warmup_epochs=1), dict(grad_accum=3, warmup_epochs=1),
                     dict(min_lr=5e-3), dict(min_lr=0.0, warmup_epochs=30), dict(epochs=1, warmup_epochs=1)]


@pytest.mark.parametrize("num_processes", [1, 2])
@pytest.mark.parametrize("overrides", DEFAULT_SCHEDULES, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
def test_default_schedule_gives_the_same_learning_rate_every_step_as_before(overrides, num_processes):
    """AdamW + cosine (+ warmup) from timm's factories: every step's rate equals the v0.1 LambdaLR's."""
    cfg = TrainConfig(**{"cache": "x", "lr": 2e-3, "min_lr": 1e-5, "epochs": 4, **overrides})
    batches = 7
    task = DistillTask(torch.nn.Sequential(torch.nn.Linear(2, 2)), {}, ce_weight=1.0)
    opt = build.build_optimizer(cfg, task, num_processes=num_processes)
    sched = build.build_scheduler(cfg, opt, batches_per_epoch=batches, num_processes=num_processes)
    factor, total = _v01_lr_factor(cfg, batches, num_processes)
    got = []
    for _ in range(total + 3):
        got.append([g["lr"] for g in opt.param_groups])
        opt.step()
        sched.step()
    want = [[cfg.lr * factor(step)] * len(opt.param_groups) for step in range(total + 3)]
    assert got == [pytest.approx(w, rel=1e-12, abs=1e-18) for w in want]


def _lrs(cfg: TrainConfig, steps: int, batches: int = 4) -> list[float]:
    opt = build.build_optimizer(cfg, DistillTask(torch.nn.Sequential(torch.nn.Linear(2, 2)), {}, ce_weight=1.0), 1)
    sched = build.build_scheduler(cfg, opt, batches_per_epoch=batches, num_processes=1)
    out = []
    for _ in range(steps):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def test_opt_and_opt_kwargs_pick_timm_optimizers():
    task = DistillTask(torch.nn.Sequential(torch.nn.Linear(2, 2)), {}, ce_weight=1.0)
    adamw = build.build_optimizer(TrainConfig(cache="x", betas=(0.8, 0.9)), task, 1)
    assert type(adamw) is torch.optim.AdamW and adamw.param_groups[0]["betas"] == (0.8, 0.9)
    sgd = build.build_optimizer(TrainConfig(cache="x", opt="sgd", opt_kwargs={"momentum": 0.5, "nesterov": False}),
                                task, 1)
    assert type(sgd) is torch.optim.SGD and sgd.param_groups[0]["momentum"] == 0.5
    assert {g["weight_decay"] for g in sgd.param_groups} == {0.0, 0.05}  # the same no-decay groups as AdamW
    assert "betas" not in sgd.param_groups[0]  # dropped for an optimizer without betas
    with pytest.raises(ConfigError, match="--opt 'adamx'.*list_optimizers"):
        build.build_optimizer(TrainConfig(cache="x", opt="adamx"), task, 1)


def test_sched_and_sched_kwargs_pick_timm_schedules_counted_in_steps():
    step = _lrs(TrainConfig(cache="x", lr=1.0, epochs=3, sched="step",
                            sched_kwargs={"decay_epochs": 1, "decay_rate": 0.5}), 12)
    assert step == [1.0] * 4 + [0.5] * 4 + [0.25] * 4  # decay_epochs are epochs of 4 steps
    multi = _lrs(TrainConfig(cache="x", lr=1.0, epochs=3, warmup_epochs=0.5, sched="multistep",
                             sched_kwargs={"decay_milestones": [2], "decay_rate": 0.1}), 12)
    # The same warmup; milestones count after it (timm's MultiStepLRScheduler decays on the update before one).
    assert multi == pytest.approx([0.5, 1.0] + [1.0] * 7 + [0.1] * 3)
    assert _lrs(TrainConfig(cache="x", lr=1.0, sched="constant"), 5) == [1.0] * 5
    with pytest.raises(ConfigError, match="--sched 'plateau' is not one of cosine"):
        _lrs(TrainConfig(cache="x", sched="plateau"), 1)


def test_scheduler_state_resumes_without_unpickling(tmp_path):
    cfg = TrainConfig(cache="x", lr=1.0, epochs=2, warmup_epochs=1)
    opt = torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=cfg.lr)
    sched = build.build_scheduler(cfg, opt, batches_per_epoch=4, num_processes=1)
    for _ in range(3):
        opt.step()
        sched.step()
    torch.save(sched.state_dict(), tmp_path / "s.bin")
    opt2 = torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=cfg.lr)
    again = build.build_scheduler(cfg, opt2, batches_per_epoch=4, num_processes=1)
    again.load_state_dict(torch.load(tmp_path / "s.bin", weights_only=True))
    for s, o in ((sched, opt), (again, opt2)):
        o.step()
        s.step()
    assert opt2.param_groups[0]["lr"] == opt.param_groups[0]["lr"] == pytest.approx(1.0)  # step 4: the peak


def test_model_ema_is_timms_and_optional():
    student = torch.nn.Linear(2, 2)
    assert build.build_ema(TrainConfig(cache="x"), student) is None
    ema = build.build_ema(TrainConfig(cache="x", model_ema=True, model_ema_decay=0.5), student)
    from timm.utils import ModelEmaV3

    assert isinstance(ema, ModelEmaV3) and ema.module is not student
    with torch.no_grad():
        student.weight.add_(2.0)
    ema.update(student)
    assert torch.allclose(ema.module.weight, student.weight - 1.0)  # halfway at decay 0.5


def test_eval_loader_uses_the_students_timm_data_config(manifest, tmp_path):
    from featcache.testing.images import make_image_folder

    val = make_image_folder(tmp_path / "val", classes=3, per_class=1)
    student = models.load_model("resnet18", pretrained=False, num_classes=3)  # timm: crop_pct 0.95, bicubic
    data = models.normalization(student)
    assert (data["crop_pct"], data["interpolation"], data["crop_mode"]) == (0.95, "bicubic", "center")
    loader = build.build_eval_loader(TrainConfig(cache="c", val=str(val)), manifest, 32, data)
    recipe = loader.dataset.recipe
    assert recipe.ops[0].crop_pct == 0.95 and recipe.interpolation == "bicubic" and recipe.img_size == 32
    bilinear = build.build_eval_loader(TrainConfig(cache="c", val=str(val)), manifest, 32,
                                       {**data, "crop_pct": 0.5, "interpolation": "bilinear"})
    assert bilinear.dataset.recipe.ops[0].crop_pct == 0.5 and bilinear.dataset.recipe.interpolation == "bilinear"
    with pytest.raises(ConfigError, match="crop_mode='squash'"):
        build.build_eval_loader(TrainConfig(cache="c", val=str(val)), manifest, 32, {**data, "crop_mode": "squash"})
