"""Shared setup of the stage-2 tests (engine, dataset, compat, CLI): tiny caches and a clean Accelerate state."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from .images import make_image_folder

# The done-when example of stage 1: deit3_small (random init) at 32 px, blocks 0,1,11, 2 views, 2 shots x 3 classes.
CACHE_ARGS: dict[str, Any] = dict(teacher="deit3_small", pretrained=False, img_size=32, layers=[0, 1, 11], views=2,
                                  shots=2, dtype="fp32", workers=0, batch_size=8, device="cpu", shard_size=4)
# A small deit_tiny-shaped student (4 blocks) so a step costs milliseconds.
STUDENT: dict[str, Any] = dict(student="deit_tiny", student_kwargs={"depth": 4}, img_size=32)


def make_cache(root: Path, name: str = "cache", per_class: int = 3, **overrides: Any) -> tuple[Path, str]:
    """Images under ``root/data`` (3 classes) and a cache extracted from them; returns (data dir, cache path)."""
    from featcache.config import ExtractConfig
    from featcache.extract import run_extract

    data = root / "data"
    if not data.exists():
        make_image_folder(data, classes=3, per_class=per_class)
    args = dict(CACHE_ARGS, **overrides)
    return data, run_extract(ExtractConfig(data=str(data), out=str(root / name), **args), progress=False)


def make_val(root: Path) -> Path:
    return make_image_folder(root / "val", classes=3, per_class=2, seed=1)


def reset_accelerate() -> None:
    """Forget Accelerate's process-wide singletons so each in-process run starts clean (as a new process would)."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()


TINY_VIT_TEACHER = {"patch_size": 8, "embed_dim": 48, "depth": 4, "num_heads": 3}


def cli_extract_tiny_vit(root: Path, layers: str = "-1", classes: int = 3) -> tuple[Path, Path]:
    """`featcache extract` (through the CLI) of a random-init 4-block, width-48 ViT teacher at 32 px over a fresh
    ImageFolder; returns (data, cache)."""
    import json

    from click.testing import CliRunner

    from featcache.cli import main

    data = make_image_folder(Path(root) / "train", classes=classes, per_class=4, size=(36, 40))
    cache = Path(root) / "cache"
    res = CliRunner().invoke(main, [
        "extract", "--data", str(data), "--out", str(cache), "--teacher", "vit_tiny_patch16_224", "--no-pretrained",
        "--img-size", "32", "--num-classes", str(classes), "--teacher-kwargs", json.dumps(TINY_VIT_TEACHER),
        "--layers", layers, "--views", "2", "--workers", "0", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    return data, cache


def tiny_extract_args(classes: int = 3) -> list[str]:
    """`featcache extract` options of a random-init 4-block, width-48 ViT teacher at 32 px, 2 views, on CPU."""
    import json

    return ["--teacher", "vit_tiny_patch16_224", "--no-pretrained", "--img-size", "32", "--num-classes", str(classes),
            "--teacher-kwargs", json.dumps(TINY_VIT_TEACHER), "--layers", "-1", "--views", "2", "--shard-size", "4",
            "--batch-size", "4", "--workers", "0", "--device", "cpu"]


def cli_ok(*args: str) -> str:
    """Run the CLI in this process; its output, after checking that it exited 0."""
    from click.testing import CliRunner

    from featcache.cli import main

    res = CliRunner().invoke(main, [str(a) for a in args])
    assert res.exit_code == 0, res.output
    return res.output


def cli_train_steps(cache: Path, out: Path, *flags: str) -> int:
    """`featcache train` (KD, the small student, one epoch, 1 DataLoader worker) on ``cache``; the steps it ran."""
    import json

    reset_accelerate()
    cli_ok("train", "--cache", cache, "--out", out, "--method", "kd", "--epochs", "1", "--batch-size", "4",
           "--workers", "1", "--student", STUDENT["student"], "--student-kwargs",
           json.dumps(STUDENT["student_kwargs"]), *flags)
    return json.loads((out / "final.json").read_text())["steps"]
