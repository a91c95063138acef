"""A tiny random-init ViT student and the tiny teacher geometry the method tests share."""
from __future__ import annotations

import timm
import torch

IMG = 32
CLASSES = 10
TEACHER_KWARGS = {"patch_size": 8, "embed_dim": 48, "depth": 4, "num_heads": 3}
STUDENT_KWARGS = {"patch_size": 8, "embed_dim": 32, "depth": 3, "num_heads": 2}


def make_student(**overrides) -> torch.nn.Module:
    """A tiny random-init ViT student (16 patch tokens + CLS, width 32, 3 blocks) seeded for repeatability."""
    torch.manual_seed(0)
    kwargs = dict(STUDENT_KWARGS, **overrides)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=IMG, num_classes=CLASSES, **kwargs)
