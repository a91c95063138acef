"""What ``--autocast bf16`` does to a teacher's targets: relative L2 against exact fp32, per target, and whether the
bf16 targets of a view depend on the batch it is computed in.

    python benchmarks/autocast_error.py [--teacher deit3_small] [--img-size 224] [--checkpoint PATH --kwargs JSON]

Views are random crops of scikit-learn's two sample photos; the teacher is random init unless a checkpoint is given
(e.g. the digits demo teacher: ``--teacher vit_tiny_patch16_224 --img-size 32 --num-classes 10 --checkpoint
DEMO/teacher.safetensors --kwargs '{"patch_size": 8, "embed_dim": 96, "depth": 4, "num_heads": 3}'``).
"""
from __future__ import annotations

import argparse
import json

import numpy as np
import torch

from featcache.teachers import load_teacher
from featcache.views import default_recipe, make_view, normalize


def photo_views(count: int, size: int) -> torch.Tensor:
    from sklearn.datasets import load_sample_images

    photos = [torch.from_numpy(np.array(i)).permute(2, 0, 1).contiguous()
              for i in load_sample_images().images]
    recipe = default_recipe(size)
    return torch.stack([make_view(photos[i % 2], recipe, 0, i % 2, i).image for i in range(count)])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", default="deit3_small")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--num-classes", type=int, default=None)
    p.add_argument("--checkpoint", default=None)
    p.add_argument("--kwargs", default="{}")
    p.add_argument("--views", type=int, default=32)
    args = p.parse_args()
    kw = dict(pretrained=False, checkpoint=args.checkpoint, img_size=args.img_size, num_classes=args.num_classes,
              **json.loads(args.kwargs))
    exact, fast = load_teacher(args.teacher, **kw), load_teacher(args.teacher, autocast="bf16", **kw)
    layers = [0, 1, exact.num_blocks() - 1]
    x = normalize(photo_views(args.views, args.img_size), [0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
    ref, got = exact.targets(x, layers), fast.targets(x, layers)
    half = fast.targets(x[: args.views // 2], layers)
    for name in ref:
        r, g = ref[name].float(), got[name].float()
        rel = float((g - r).norm() / r.norm())
        same = bool(torch.equal(half[name], got[name][: args.views // 2]))
        print(f"{name:<10} bf16 vs fp32 rel L2 {rel:.2e}; batch {args.views // 2} vs {args.views} "
              f"bit-identical: {same}")


if __name__ == "__main__":
    main()
