"""Small data generators shared by the test files (``from helpers import make_image_folder``).

Signatures are stable: other test modules rely on them.
"""
from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image


def random_image(rng: np.random.Generator, size: tuple[int, int] = (40, 48)) -> Image.Image:
    """A random RGB PIL image of ``size`` = (height, width) with some low-frequency structure."""
    h, w = size
    base = rng.integers(0, 256, size=(max(h // 8, 1), max(w // 8, 1), 3), dtype=np.uint8)
    img = Image.fromarray(base).resize((w, h), Image.BILINEAR)
    noise = rng.integers(-20, 21, size=(h, w, 3))
    return Image.fromarray(np.clip(np.asarray(img, dtype=np.int64) + noise, 0, 255).astype(np.uint8))


def make_image_folder(root: str | Path, classes: int = 3, per_class: int = 4, size: tuple[int, int] = (40, 48),
                      seed: int = 0, ext: str = "png") -> Path:
    """Write an ImageFolder tree ``root/class_{c}/img_{j}.{ext}`` of random images; return ``root``.

    Args:
        root: directory to create (may exist).
        classes: number of class folders (``class_0`` ... sorted by name, so folder index = label).
        per_class: images per class.
        size: (height, width) of every image.
        seed: numpy seed for the pixel values.
        ext: ``png`` (lossless) or ``jpg``.
    """
    root = Path(root)
    rng = np.random.default_rng(seed)
    for c in range(classes):
        d = root / f"class_{c}"
        d.mkdir(parents=True, exist_ok=True)
        for j in range(per_class):
            random_image(rng, size).save(d / f"img_{j}.{ext}")
    return root


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def make_wds_shards(root: str | Path, classes: int = 3, per_class: int = 4, size: tuple[int, int] = (40, 48),
                    seed: int = 0, per_shard: int = 5, ext: str = "png") -> Path:
    """Write WebDataset image shards ``root/shard-{n:06d}.tar`` with ``<key>.{ext}`` + ``<key>.cls``; return ``root``.

    Samples are written class by class (keys ``s{index:06d}``), ``per_shard`` samples per tar file.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    samples = [(c, random_image(rng, size)) for c in range(classes) for _ in range(per_class)]
    for start in range(0, len(samples), per_shard):
        with tarfile.open(root / f"shard-{start // per_shard:06d}.tar", "w") as tar:
            for i, (label, img) in enumerate(samples[start:start + per_shard], start=start):
                buf = io.BytesIO()
                img.save(buf, format="PNG" if ext == "png" else "JPEG")
                _add_member(tar, f"s{i:06d}.{ext}", buf.getvalue())
                _add_member(tar, f"s{i:06d}.cls", str(label).encode())
    return root


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
