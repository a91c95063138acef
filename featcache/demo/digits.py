"""scikit-learn's 1,797 handwritten digits (bundled with scikit-learn: no download) as ImageFolders."""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np

SPLITS = ("train", "heldout", "test")


def digits_arrays(img_size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits as uint8 RGB ``[N, S, S, 3]`` (bilinear upsampling of the 8x8, 0-16 images) + labels."""
    import torch
    import torch.nn.functional as F
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32)[:, None] * (255.0 / 16.0)
    x = F.interpolate(x, size=(img_size, img_size), mode="bilinear", align_corners=False)
    rgb = x.clamp(0, 255).round().to(torch.uint8).expand(-1, 3, -1, -1).permute(0, 2, 3, 1)
    return rgb.contiguous().numpy(), digits.target.astype(np.int64)


def split_indices(labels: np.ndarray, test_fraction: float, heldout_fraction: float, seed: int,
                  max_train: int | None = None) -> dict[str, np.ndarray]:
    """Stratified, seeded split: test first (as before heldout existed), then heldout carved from the rest."""
    from sklearn.model_selection import train_test_split

    index = np.arange(len(labels))
    train, test = train_test_split(index, test_size=test_fraction, random_state=seed, stratify=labels)
    heldout = np.array([], dtype=np.int64)
    if heldout_fraction:
        train, heldout = train_test_split(train, test_size=heldout_fraction, random_state=seed,
                                          stratify=labels[train])
    train = np.sort(train)[:max_train] if max_train else np.sort(train)
    return {"train": train, "heldout": np.sort(heldout), "test": np.sort(test)}


def write_digits(root: str | Path, img_size: int = 32, test_fraction: float = 0.2, seed: int = 0,
                 max_train: int | None = None, heldout_fraction: float = 0.1) -> dict[str, Any]:
    """Write ``root/{train,heldout,test}/<digit>/*.png`` (stratified seeded split), once; return the counts."""
    root = Path(root)
    marker = root / "digits.json"
    want = {"img_size": img_size, "test_fraction": test_fraction, "heldout_fraction": heldout_fraction,
            "seed": seed, "max_train": max_train}
    if marker.is_file() and json.loads(marker.read_text()).get("settings") == want:
        return json.loads(marker.read_text())
    from PIL import Image

    images, labels = digits_arrays(img_size)
    splits = split_indices(labels, test_fraction, heldout_fraction, seed, max_train)
    shutil.rmtree(root, ignore_errors=True)
    for split, ids in splits.items():
        for i in ids:
            folder = root / split / str(labels[i])
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(images[i]).save(folder / f"{i:04d}.png")
    info = {"settings": want, **{split: len(ids) for split, ids in splits.items()}}
    marker.write_text(json.dumps(info))  # last: a crash before it rewrites the folders next time
    return info
