"""The stage-2 loop: cache/online parity, exact resume, run-directory contract, schedule and optimizer."""
from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file
from featcache.testing.caches import STUDENT, make_cache, make_val, reset_accelerate

from featcache import engine, models, teachers
from featcache.config import TrainConfig
from featcache.errors import ConfigError


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    root = tmp_path_factory.mktemp("engine")
    data, path = make_cache(root)
    return {"root": root, "data": data, "cache": path, "val": make_val(root)}


pytestmark = pytest.mark.usefixtures("clean_accelerate")


def config(cache, out, **kw) -> TrainConfig:
    base = dict(cache=cache["cache"], out=str(out), method="vitkd", epochs=2, batch_size=2, workers=0, log_every=1,
                seed=3, **STUDENT)
    return TrainConfig(**{**base, **kw})


def train_losses(out) -> list[dict]:
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == "train"]


def test_cache_and_online_teacher_give_the_same_loss_every_step(cache, tmp_path, monkeypatch):
    def no_teacher(*a, **k):
        raise AssertionError("the cached path must never build the teacher")

    with monkeypatch.context() as m:
        m.setattr(teachers, "load_teacher", no_teacher)
        cached = engine.train(config(cache, tmp_path / "cached"))
    reset_accelerate()
    online = engine.train(config(cache, tmp_path / "online", online_teacher=True))
    a, b = train_losses(tmp_path / "cached"), train_losses(tmp_path / "online")
    assert len(a) == len(b) == cached["steps"] == online["steps"] == 6
    for ra, rb in zip(a, b):
        for key in ("loss", "vitkd/mimic", "vitkd/generation", "ce"):
            assert abs(ra[key] - rb[key]) <= 1e-4 * abs(ra[key]), (ra["step"], key, ra[key], rb[key])
    assert any("--online-teacher" in c for c in online["online_teacher_cost"])


class Killed(Exception):
    pass


@pytest.mark.parametrize("labels", [{}, {"label_shots": 1, "labelled_batch": 2}], ids=["plain", "labelled-batch"])
def test_killed_mid_epoch_and_resumed_ends_with_the_same_weights(cache, tmp_path, monkeypatch, labels):
    kw = dict(epochs=2, checkpoint_every=2, val=str(cache["val"]), **labels)
    engine.train(config(cache, tmp_path / "full", **kw))
    reset_accelerate()

    real_after_step = engine.after_step

    def dies_at_step_5(run, state, meter):  # 3 steps per epoch: checkpoint at step 4 is mid-epoch 1
        real_after_step(run, state, meter)
        if state.step == 5:
            raise Killed

    with monkeypatch.context() as m:
        m.setattr(engine, "after_step", dies_at_step_5)
        with pytest.raises(Killed):
            engine.train(config(cache, tmp_path / "killed", **kw))
    assert not (tmp_path / "killed" / "final.json").exists()
    reset_accelerate()
    with pytest.raises(FileExistsError, match="--resume"):
        engine.train(config(cache, tmp_path / "killed", **kw))
    reset_accelerate()
    with pytest.raises(ValueError, match=r"different settings.*\['lr'\]"):
        engine.train(config(cache, tmp_path / "killed", resume=True, lr=0.5, **kw))
    reset_accelerate()
    resumed = engine.train(config(cache, tmp_path / "killed", resume=True, **kw))
    assert resumed["steps"] == 6
    full = load_file(str(tmp_path / "full" / "student.safetensors"))
    again = load_file(str(tmp_path / "killed" / "student.safetensors"))
    assert full.keys() == again.keys()
    for key in full:
        assert torch.equal(full[key], again[key]), key
    losses = [r["loss"] for r in train_losses(tmp_path / "full")]
    assert losses == [r["loss"] for r in train_losses(tmp_path / "killed")]


def test_labelled_batch_puts_its_labelled_items_in_every_step(cache, tmp_path, monkeypatch):
    seen, real_step = [], engine.train_step

    def recording_step(run, batch, meter):
        seen.append((batch["sample"].tolist(), batch["label"].tolist()))
        return real_step(run, batch, meter)

    monkeypatch.setattr(engine, "train_step", recording_step)
    result = engine.train(config(cache, tmp_path / "run", method="kd", label_shots=1, labelled_batch=2, epochs=2))
    assert result["steps"] == 6 and len(seen) == 6, "6 samples at batch 2: the steps are those of a plain run"
    for epoch in (seen[:3], seen[3:]):
        assert sorted(s for samples, _ in epoch for s in samples[:-2]) == list(range(6)), "each sample once"
        extra = [(s, y) for samples, labels in epoch for s, y in zip(samples[-2:], labels[-2:])]
        assert all(y >= 0 for _, y in extra) and len({s for s, _ in extra}) == 3, "2 labelled items per step"
    with pytest.raises(ConfigError, match="--labelled-batch 2 adds labelled items for the label loss, but --method "
                                          "wecolora trains without labels"):
        engine.train(config(cache, tmp_path / "wecolora", method="wecolora", student="teacher", label_shots=1,
                            labelled_batch=2))
    with pytest.raises(ConfigError, match="--labelled-batch: no sample of the cache is labelled; pass --label-shots"):
        engine.train(config(cache, tmp_path / "none", method="kd", label_shots=0, labelled_batch=2))


@pytest.mark.parametrize("kw, message", [
    ({"labelled_batch": 2}, "without --label-shots every sample is labelled"),
    ({"labelled_batch": 2, "label_shots": 1, "labelled_only": True}, "every batch holds only labelled items"),
    ({"labelled_batch": -1, "label_shots": 1}, "--labelled-batch must be >= 0"),
])
def test_labelled_batch_refuses_settings_it_cannot_serve(kw, message):
    with pytest.raises(ConfigError, match=message):
        TrainConfig(cache="c", **kw).validate()


def test_run_directory_contract_and_student_reload(cache, tmp_path):
    out = tmp_path / "run"
    result = engine.train(config(cache, out, method="kd+vitkd:0.5", val=str(cache["val"]), epochs=1))
    names = {p.name for p in out.iterdir()}
    assert {"config.yaml", "metrics.jsonl", "metrics.csv", "student.safetensors", "student.json", "checkpoints",
            "tensorboard", "final.json"} <= names
    final = json.loads((out / "final.json").read_text())
    assert final == json.loads(json.dumps(result))
    assert set(final) >= {"top1", "top5", "best_top1", "train_time_s", "images_per_s", "steps", "method",
                          "method_args", "student", "online_teacher_cost"}
    assert (out / "final.json").stat().st_mtime >= (out / "student.safetensors").stat().st_mtime
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    assert {"kd/kd", "vitkd/mimic", "vitkd/generation", "ce", "loss", "lr", "images_per_s"} <= set(train[0])
    assert [r["kind"] for r in records].count("eval") == 1 and 0 <= records[-1]["top1"] <= 100
    spec = json.loads((out / "student.json").read_text())
    model = models.load_model(spec["model"], pretrained=False, img_size=spec["img_size"],
                                num_classes=spec["num_classes"], **spec["model_kwargs"])
    model.load_state_dict(load_file(str(out / "student.safetensors")), strict=True)
    assert model(torch.zeros(1, 3, 32, 32)).shape == (1, spec["num_classes"])
    assert "ce_weight: 1.0" in (out / "config.yaml").read_text()


def test_resume_of_a_finished_run_returns_its_result(cache, tmp_path):
    cfg = config(cache, tmp_path / "r", method="kd", epochs=1, max_steps=1)
    first = engine.train(cfg)
    reset_accelerate()
    cfg.resume = True
    assert engine.train(cfg) == json.loads(json.dumps(first))


def test_max_steps_and_bf16_mixed_precision_run(cache, tmp_path):
    result = engine.train(config(cache, tmp_path / "bf16", method="kd", mixed_precision="bf16", max_steps=2))
    assert result["steps"] == 2 and math.isfinite(train_losses(tmp_path / "bf16")[-1]["loss"])


def test_gradient_accumulation_counts_optimizer_steps(cache, tmp_path):
    result = engine.train(config(cache, tmp_path / "acc", method="kd", epochs=1, batch_size=1, grad_accum=2))
    assert result["steps"] == 3  # 6 samples / batch 1 / 2 micro-batches per step


def test_a_method_that_builds_the_student_exports_a_reloadable_model(cache, tmp_path):
    out = tmp_path / "weco"
    result = engine.train(config(cache, out, method="wecolora", method_args={"k": 6, "r": 4}, epochs=1,
                                 student="teacher", student_kwargs={}))
    spec = json.loads((out / "student.json").read_text())
    assert result["student"] == spec["model"] != "deit_tiny" and spec["model_kwargs"]["depth"] == 2
    model = models.load_model(spec["model"], pretrained=False, img_size=spec["img_size"],
                                num_classes=spec["num_classes"], **spec["model_kwargs"])
    model.load_state_dict(load_file(str(out / "student.safetensors")), strict=True)


@pytest.mark.slow
def test_sigkilled_cli_run_resumes_to_the_same_weights(cache, tmp_path):
    """A real `featcache train` process killed with SIGKILL after its first checkpoint, then `--resume`d."""
    import os
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "killed"
    args = [sys.executable, "-m", "featcache.cli", "train", "--cache", cache["cache"], "--out", str(out),
            "--method", "vitkd", "--student", "deit_tiny", "--student-kwargs", '{"depth": 4}', "--img-size", "32",
            "--epochs", "8", "--batch-size", "2", "--workers", "0", "--seed", "3", "--checkpoint-every", "2",
            "--log-every", "1"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not list(out.glob("checkpoints/step_*/featcache_state.json")) and time.time() < deadline:
        assert proc.poll() is None, "the run ended before it could be killed"
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "final.json").exists()
    subprocess.run([*args, "--resume"], env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    reset_accelerate()
    engine.train(config(cache, tmp_path / "full", epochs=8, checkpoint_every=2))
    full = load_file(str(tmp_path / "full" / "student.safetensors"))
    again = load_file(str(out / "student.safetensors"))
    assert all(torch.equal(full[k], again[k]) for k in full)
    assert json.loads((out / "final.json").read_text())["steps"] == 24


# ------------------------------------------------------------------------------------------------ timm conventions


@pytest.fixture(scope="module")
def default_run(cache, tmp_path_factory):
    """AdamW + cosine, three epochs evaluated on --val, the best of them not the last (shared by the export tests)."""
    reset_accelerate()
    out = tmp_path_factory.mktemp("default") / "run"
    result = engine.train(config(cache, out, **DEFAULT_RUN, val=str(cache["val"])))
    reset_accelerate()
    return out, result


def featcache_student(out):
    spec = json.loads((out / "student.json").read_text())
    model = models.load_model(spec["model"], pretrained=False, img_size=spec["img_size"],
                              num_classes=spec["num_classes"], **spec["model_kwargs"])
    model.load_state_dict(load_file(str(out / "student.safetensors")), strict=True)
    return model.eval(), spec


DEFAULT_RUN = dict(method="kd", epochs=3, lr=3e-3)

PLAIN_TIMM = """
import json, sys
sys.modules["featcache"] = None  # plain timm: any import of featcache fails
import timm
model = timm.create_model("local-dir:{folder}", pretrained=True)
import torch
from safetensors.torch import load_file, save_file
model.eval()
save_file({{"logits": model(load_file("{inputs}")["x"]).contiguous()}}, "{outputs}")
print(json.dumps({{"name": model.pretrained_cfg["architecture"], **timm.data.resolve_data_config(model=model)}}))
"""


def test_plain_timm_loads_the_exported_student_with_the_same_logits(cache, default_run, tmp_path):
    import subprocess
    import sys

    from safetensors.torch import save_file

    out, result = default_run
    model, spec = featcache_student(out)
    assert spec["model"] == result["student"] == "deit_tiny_patch16_224.fb_in1k"  # the real name, not the alias
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    save_file({"x": x}, str(tmp_path / "x.safetensors"))
    code = PLAIN_TIMM.format(folder=out / "student", inputs=tmp_path / "x.safetensors",
                             outputs=tmp_path / "logits.safetensors")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    with torch.no_grad():
        assert torch.equal(load_file(str(tmp_path / "logits.safetensors"))["logits"], model(x))
    timm_data = json.loads(proc.stdout.strip().splitlines()[-1])
    student_data = models.normalization(model)
    assert timm_data["name"] == "deit_tiny_patch16_224" and timm_data["input_size"] == [3, 32, 32]
    for key in ("mean", "std", "interpolation", "crop_pct", "crop_mode"):
        assert timm_data[key] == pytest.approx(student_data[key]) if key in ("mean", "std") else \
            timm_data[key] == student_data[key], key
    assert (out / "student.safetensors").stat().st_ino == (out / "student" / "model.safetensors").stat().st_ino


def top1_of(folder, cache, data_config) -> float:
    """featcache's evaluation of a timm folder on the test --val set."""
    from featcache import build
    from featcache.stores import open_reader

    model = models.load_model(f"local-dir:{folder}", pretrained=True).eval()
    loader = build.build_eval_loader(config(cache, "unused", val=str(cache["val"])),
                                     open_reader(cache["cache"]).manifest, 32, data_config)
    hits = total = 0
    with torch.no_grad():
        for batch in loader:
            logits = model(torch.stack([normalize_image(i, data_config) for i in batch["image"]]))
            hits += int((logits.argmax(-1) == batch["label"]).sum())
            total += len(batch["label"])
    return 100.0 * hits / total


def normalize_image(image, data_config):
    from featcache.views import normalize

    return normalize(image[None], data_config["mean"], data_config["std"])[0]


def test_the_best_student_is_kept_next_to_the_last(cache, default_run):
    out, result = default_run
    evals = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "eval"]
    best = max(evals, key=lambda r: r["top1"])  # the first of equal ones, as the engine keeps it
    assert result["best_top1"] == best["top1"] and result["best_epoch"] == best["epoch"]
    assert best["top1"] != evals[-1]["top1"], "needs a run whose best epoch is not its last: change DEFAULT_RUN"
    data_config = models.normalization(featcache_student(out)[0])
    assert top1_of(out / "student_best", cache, data_config) == best["top1"]
    assert top1_of(out / "student", cache, data_config) == result["top1"] == evals[-1]["top1"]


def test_opt_sched_and_model_ema_change_the_optimizer_schedule_and_exported_weights(cache, default_run, tmp_path):
    out = tmp_path / "sgd"
    result = engine.train(config(cache, out, **DEFAULT_RUN, val=str(cache["val"]), opt="sgd",
                                 opt_kwargs={"momentum": 0.5}, sched="step",
                                 sched_kwargs={"decay_epochs": 1, "decay_rate": 0.5}, model_ema=True,
                                 model_ema_decay=0.5))
    default_out, _ = default_run
    lrs = [r["lr"] for r in train_losses(out)]
    assert lrs == pytest.approx([3e-3] * 3 + [1.5e-3] * 3 + [7.5e-4] * 3)  # step: halved every epoch (3 steps)
    cosine = [r["lr"] for r in train_losses(default_out)]
    assert cosine[0] == 3e-3 and cosine[3] == pytest.approx(1e-5 + (3e-3 - 1e-5) * 0.75)  # the default's cosine
    student = load_file(str(out / "student.safetensors"))
    ema = load_file(str(out / "student_ema" / "model.safetensors"))
    default = load_file(str(default_out / "student.safetensors"))
    assert student.keys() == ema.keys() == default.keys()
    assert not torch.equal(student["head.weight"], default["head.weight"])  # the same run but --opt/--sched
    assert not torch.equal(ema["head.weight"], student["head.weight"])  # the EMA lags the student
    evals = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "eval"]
    assert {"ema_top1", "ema_top5"} <= set(evals[-1]) and result["ema_top1"] == evals[-1]["ema_top1"]
    data_config = models.normalization(featcache_student(out)[0])
    assert top1_of(out / "student_ema", cache, data_config) == result["ema_top1"]


@pytest.mark.slow
def test_killed_and_resumed_run_ends_with_the_same_ema(cache, tmp_path, monkeypatch):
    kw = dict(method="kd", checkpoint_every=2, model_ema=True, model_ema_decay=0.7)
    engine.train(config(cache, tmp_path / "full", **kw))
    reset_accelerate()
    real_after_step = engine.after_step

    def dies_at_step_5(run, state, meter):
        real_after_step(run, state, meter)
        if state.step == 5:
            raise Killed

    with monkeypatch.context() as m:
        m.setattr(engine, "after_step", dies_at_step_5)
        with pytest.raises(Killed):
            engine.train(config(cache, tmp_path / "killed", **kw))
    reset_accelerate()
    engine.train(config(cache, tmp_path / "killed", resume=True, **kw))
    full = load_file(str(tmp_path / "full" / "student_ema" / "model.safetensors"))
    again = load_file(str(tmp_path / "killed" / "student_ema" / "model.safetensors"))
    assert all(torch.equal(full[k], again[k]) for k in full)
