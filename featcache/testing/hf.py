"""Hugging Face datasets for tests: random PNG images with labels, saved with ``save_to_disk`` or as parquet."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from .images import random_image


def png_samples(classes: int = 3, per_class: int = 4, size: tuple[int, int] = (40, 48), seed: int = 0
                ) -> tuple[list[bytes], list[int]]:
    """PNG bytes of random images and their labels, class by class."""
    rng = np.random.default_rng(seed)
    images, labels = [], []
    for c in range(classes):
        for _ in range(per_class):
            buf = io.BytesIO()
            random_image(rng, size).save(buf, format="PNG")
            images.append(buf.getvalue())
            labels.append(c)
    return images, labels


def make_hf_dataset(classes: int = 3, per_class: int = 4, seed: int = 0, image_column: str = "image",
                    label_column: str = "label", class_label: bool = True):
    """A ``datasets.Dataset`` with an ``Image`` column and a ClassLabel (``class_{c}``) or plain integer label."""
    import datasets

    images, labels = png_samples(classes, per_class, seed=seed)
    label_feature = datasets.ClassLabel(names=[f"class_{c}" for c in range(classes)]) if class_label else \
        datasets.Value("int64")
    features = datasets.Features({image_column: datasets.Image(), label_column: label_feature})
    return datasets.Dataset.from_dict({image_column: [{"bytes": b, "path": None} for b in images],
                                       label_column: labels}, features=features)


def save_hf_dataset(root: str | Path, **kwargs) -> Path:
    """``make_hf_dataset(**kwargs).save_to_disk(root)`` in two arrow files; returns ``root``."""
    make_hf_dataset(**kwargs).save_to_disk(str(root), num_shards=2)
    return Path(root)


def save_parquet(root: str | Path, files: int = 2, row_group_size: int = 3, **kwargs) -> Path:
    """The dataset as ``files`` parquet files ``root/part-{i}.parquet`` (row groups of ``row_group_size``)."""
    import pyarrow.parquet as pq

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    ds = make_hf_dataset(**kwargs)
    for i in range(files):
        part = ds.shard(files, i, contiguous=True)
        pq.write_table(part.data.table, root / f"part-{i}.parquet", row_group_size=row_group_size)
    return root
