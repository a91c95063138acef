"""Images for tests: random pictures, ImageFolder trees and WebDataset image shards.

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
