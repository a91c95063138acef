"""Linear probing: the classifier on synthetic features, a run dir / checkpoint probed end to end, the CLI."""
import json

import pytest
import timm
import torch
from click.testing import CliRunner
from featcache.testing.images import make_image_folder
from safetensors.torch import save_file

from featcache.cli import main
from featcache.probe import ProbeConfig, fit_linear, linear_probe, run_probe

KWARGS = {"patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2}


def blobs(n_per_class: int, seed: int):
    """Three well-separated Gaussian blobs in 5-D (linearly separable)."""
    gen = torch.Generator().manual_seed(seed)
    centres = torch.tensor([[4.0, 0, 0, 0, 0], [0, 4.0, 0, 0, 0], [0, 0, 4.0, 0, 0]])
    x = torch.cat([c + 0.3 * torch.randn(n_per_class, 5, generator=gen) for c in centres])
    return x, torch.arange(3).repeat_interleave(n_per_class)


def test_linear_probe_separates_blobs_deterministically():
    (tx, ty), (vx, vy) = blobs(20, 0), blobs(10, 1)
    first = linear_probe(tx, ty, vx, vy, 3, grid=(1e-4, 1e-2), steps=30)
    second = linear_probe(tx, ty, vx, vy, 3, grid=(1e-4, 1e-2), steps=30)
    assert first["top1"] == 100.0 and first["top5"] == 100.0
    assert first == second
    assert first["weight_decay"] in (1e-4, 1e-2) and set(first["holdout_top1"]) == {"0.0001", "0.01"}


def test_linear_probe_is_at_chance_on_shuffled_labels():
    (tx, ty), (vx, vy) = blobs(30, 0), blobs(30, 1)
    shuffled = ty[torch.randperm(len(ty), generator=torch.Generator().manual_seed(0))]
    assert linear_probe(tx, shuffled, vx, vy, 3, steps=50)["top1"] < 60.0


def test_fit_linear_reaches_the_logistic_optimum():
    x, y = blobs(10, 0)
    clf = fit_linear(x, y, 3, weight_decay=1e-3, steps=100)
    w = torch.cat([clf.weight, clf.bias[:, None]], 1).requires_grad_(True)
    loss = torch.nn.functional.cross_entropy(torch.cat([x, torch.ones(len(x), 1)], 1) @ w.t(), y)
    loss = loss + 1e-3 * w[:, :-1].pow(2).sum()
    loss.backward()
    assert w.grad.abs().max() < 1e-4  # stationary point of the convex objective


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("probe")
    train = make_image_folder(root / "train", classes=3, per_class=6, size=(36, 40), seed=0)
    val = make_image_folder(root / "val", classes=3, per_class=3, size=(36, 40), seed=1)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, num_classes=3, **KWARGS)
    run = root / "run"
    run.mkdir()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(run / "student.safetensors"))
    spec = {"model": "vit_tiny_patch16_224", "img_size": 32, "num_classes": 3, "model_kwargs": KWARGS,
            "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}
    (run / "student.json").write_text(json.dumps(spec))
    return {"train": str(train), "val": str(val), "run": run, "model": model}


def test_run_dir_probe_writes_probe_json(data):
    cfg = ProbeConfig(student=str(data["run"]), data=data["train"], val=data["val"], steps=20, device="cpu",
                      weight_decays=(1e-4, 1e-2))
    result = run_probe(cfg, progress=False)
    assert 0.0 <= result["top1"] <= 100.0
    assert result["feature_dim"] == 32 and result["num_train"] == 18 and result["num_val"] == 9
    saved = json.loads((data["run"] / "probe.json").read_text())
    assert saved["top1"] == result["top1"] and not saved["random_init"]


def test_checkpoint_probe_equals_run_dir_probe_and_random_init_differs(data, tmp_path):
    ckpt = tmp_path / "student.pth"
    torch.save(data["model"].state_dict(), ckpt)
    common = dict(data=data["train"], val=data["val"], steps=20, device="cpu", weight_decays=(1e-3,))
    from_ckpt = run_probe(ProbeConfig(student=str(ckpt), model="vit_tiny_patch16_224", img_size=32,
                                      model_kwargs=KWARGS, **common), progress=False)
    from_run = run_probe(ProbeConfig(student=str(data["run"]), out=str(tmp_path / "p.json"), **common),
                         progress=False)
    # Same weights; only normalisation differs (the run records 0.5/0.5, the checkpoint uses timm's config).
    assert from_ckpt["feature_dim"] == from_run["feature_dim"]
    # num_classes and img_size may come inside --model-kwargs too (they were passed to timm twice)
    in_kwargs = run_probe(ProbeConfig(student=str(ckpt), model="vit_tiny_patch16_224",
                                      model_kwargs=dict(KWARGS, num_classes=3, img_size=32), **common), progress=False)
    assert in_kwargs["top1"] == from_ckpt["top1"] and in_kwargs["feature_dim"] == from_ckpt["feature_dim"]
    with pytest.raises(ValueError, match="--img-size 32 and --model-kwargs img_size 64 differ"):
        run_probe(ProbeConfig(student=str(ckpt), model="vit_tiny_patch16_224", img_size=32,
                              model_kwargs=dict(KWARGS, img_size=64), **common), progress=False)
    rand = run_probe(ProbeConfig(student=str(data["run"]), random_init=True, **common), progress=False)
    assert rand["random_init"] and (data["run"] / "probe_random_init.json").is_file()


def test_probe_errors_name_the_fix(data, tmp_path):
    ckpt = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in data["model"].state_dict().items()}, str(ckpt))
    with pytest.raises(ValueError, match="--model"):
        run_probe(ProbeConfig(student=str(ckpt), data=data["train"], val=data["val"]))
    with pytest.raises(ValueError, match="does not fit"):
        run_probe(ProbeConfig(student=str(ckpt), model="vit_tiny_patch16_224", img_size=32,
                              model_kwargs=dict(KWARGS, depth=3), data=data["train"], val=data["val"]))


def test_cli_probe_prints_top1(data):
    result = CliRunner().invoke(main, ["probe", "--student", str(data["run"]), "--data", data["train"], "--val",
                                       data["val"], "--steps", "10", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "linear probe top-1:" in result.output and "probe.json" in result.output
    bad = CliRunner().invoke(main, ["probe", "--student", str(data["run"])])
    assert bad.exit_code != 0 and "--data" in bad.output
