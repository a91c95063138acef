"""Fixtures for the method tests: a tiny random-init teacher, its synthetic manifest + targets, a tiny student.

The manifest is built from a real (random-init, seeded) timm teacher so methods that rebuild the teacher from
the manifest (weight copy, online teacher blocks) work on it too.
"""
from __future__ import annotations

import pytest
import torch

from featcache.methods import MethodContext
from featcache.testing.students import CLASSES, IMG, TEACHER_KWARGS, make_student
from featcache.manifest import Manifest
from featcache.teachers import load_teacher

@pytest.fixture(scope="session")
def tiny_teacher():
    return load_teacher("deit3_small_patch16_224", pretrained=False, img_size=IMG, num_classes=CLASSES,
                        **TEACHER_KWARGS)


@pytest.fixture(scope="session")
def manifest(tiny_teacher) -> Manifest:
    layers = list(range(TEACHER_KWARGS["depth"]))
    tokens = 1 + (IMG // TEACHER_KWARGS["patch_size"]) ** 2
    dim = TEACHER_KWARGS["embed_dim"]
    targets = {f"block_{i}": {"shape": [tokens, dim], "dtype": "float32"} for i in layers}
    targets["logits"] = {"shape": [CLASSES], "dtype": "float32"}
    return Manifest(teacher=tiny_teacher.manifest_entry(), teacher_kwargs=dict(TEACHER_KWARGS), img_size=IMG,
                    layers=layers, targets=targets, normalization=tiny_teacher.data_config(IMG))


@pytest.fixture(scope="session")
def batch(tiny_teacher, manifest):
    """(images, targets, labels) for 4 views; targets come from the teacher itself, label -1 on the last view."""
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(4, 3, IMG, IMG, generator=gen)
    targets = tiny_teacher.targets(images, manifest.layers)
    labels = torch.tensor([1, 3, 5, -1])
    return images, targets, labels


@pytest.fixture
def ctx(manifest) -> MethodContext:
    return MethodContext(manifest=manifest, student=make_student(), img_size=IMG)
