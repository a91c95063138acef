"""The check a cache must pass before step 0 of `featcache train`.

Everything a run needs from the cache is compared against its manifest: the teacher (when the run names one),
the view size the student sees, the classes, the storage dtype (when the run asks for one), the token layout of
the cached blocks, and every target the chosen methods read. A mismatch raises :class:`CompatError` naming each
missing or differing item and how to fix it (often the ``featcache extract`` flags that would produce the
cache), so a sweep fails in seconds instead of after an epoch.
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

from .errors import CompatError
from .manifest import Manifest, block_index, is_block

#: ``(name, method class, keyword arguments, ...)``: ``featcache.methods.task.MethodSpec`` or a plain triple; fields
#: after the third (the composite weight) are not read here.
MethodSpec = Sequence[Any]


def check(manifest: Manifest, cfg: Any, methods: Sequence[MethodSpec]) -> None:
    """Raise :class:`CompatError` listing every mismatch between the cache and the run ``cfg``."""
    problems = [*check_teacher(manifest, getattr(cfg, "teacher", None)),
                *check_img_size(manifest, cfg.img_size),
                *check_dtype(manifest, getattr(cfg, "cache_dtype", None)),
                *check_targets(manifest, methods),
                *check_classes(manifest, cfg.num_classes, methods),
                *check_token_layout(manifest)]
    if problems:
        raise CompatError(f"cache {cfg.cache!r} cannot be used for this run:\n  - " + "\n  - ".join(problems))


def check_teacher(manifest: Manifest, expected: str | None) -> list[str]:
    """The run's ``--teacher`` (alias, timm name or architecture) must be the teacher the cache was made with."""
    if not expected:
        return []
    from .models import resolve_name

    t = manifest["teacher"]
    known = {t.get("name"), t.get("timm_name"), t.get("architecture")}
    if expected in known or resolve_name(expected) in known:
        return []
    return [f"teacher: the cache was extracted from {t.get('name')!r} ({t.get('timm_name')}), not {expected!r}; "
            f"pass a cache made with `featcache extract --teacher {expected}` or drop --teacher"]


def check_img_size(manifest: Manifest, img_size: int | None) -> list[str]:
    """The student sees the cached view geometry, so its input size must be the cache's."""
    cached = int(manifest["img_size"])
    if img_size is None or int(img_size) == cached:
        return []
    return [f"image size: the student would see {img_size} px but the cache holds {cached} px views; train with "
            f"--img-size {cached} (or drop it), or re-extract with `featcache extract --img-size {img_size}`"]


def check_dtype(manifest: Manifest, expected: str | None) -> list[str]:
    """An explicit ``--cache-dtype`` (e.g. fp32 for parity runs) must be the cache's storage dtype."""
    stored = manifest["storage"]["dtype"]
    if not expected or expected == stored:
        return []
    return [f"dtype: the cache stores {stored} targets, the run asks for {expected}; re-extract with "
            f"`featcache extract --dtype {expected}` or drop --cache-dtype"]


def check_targets(manifest: Manifest, methods: Sequence[MethodSpec]) -> list[str]:
    """Every target a method reads must be in the cache; missing teacher blocks are named with the fix."""
    problems = []
    for name, cls, args, *_ in methods:
        try:
            needed = cls.required_targets(manifest, **args)
        except (TypeError, ValueError) as err:
            problems.append(f"method {name}: {err}")
            continue
        problems += _missing_targets(manifest, name, [t for t in needed if t not in manifest["targets"]])
    return problems


def _missing_targets(manifest: Manifest, method: str, missing: list[str]) -> list[str]:
    """One sentence for missing teacher blocks (with the ``--layers`` that would add them), one for the rest."""
    problems = []
    blocks = sorted(block_index(t) for t in missing if is_block(t))
    if blocks:
        layers = ",".join(str(i) for i in sorted(set(manifest.layers) | set(blocks)))
        problems.append(f"layers: cache lacks teacher blocks {blocks} needed by {method} (cached: "
                        f"{sorted(manifest.layers)}); re-extract with --layers {layers}")
    others = [t for t in missing if not is_block(t)]
    if others:
        problems.append(f"targets: cache lacks {others} needed by {method} (cached: {sorted(manifest['targets'])}); "
                        "re-extract with a teacher that has a classifier head")
    return problems


def check_classes(manifest: Manifest, num_classes: int | None, methods: Sequence[MethodSpec]) -> list[str]:
    """The student head must cover the data's labels, and match the teacher's logits when a method reads them."""
    student = int(num_classes) if num_classes is not None else int(manifest["teacher"]["num_classes"])
    data_classes = len(manifest["data"]["classes"])
    problems = []
    if student < data_classes:
        problems.append(f"classes: the data has {data_classes} classes but the student head would have {student}; "
                        f"pass --num-classes {data_classes} or more")
    return problems + _check_logit_classes(manifest, student, methods)


def _check_logit_classes(manifest: Manifest, student: int, methods: Sequence[MethodSpec]) -> list[str]:
    """A method comparing logits needs the student's classes to be the teacher's."""
    logits = manifest["targets"].get("logits")
    uses_logits = [n for n, cls, args, *_ in methods if "logits" in _safe_required(cls, manifest, args)]
    if not uses_logits or logits is None or int(logits["shape"][-1]) == student:
        return []
    teacher = logits["shape"][-1]
    return [f"classes: {', '.join(uses_logits)} compare{'s' if len(uses_logits) == 1 else ''} the student's "
            f"{student} logits with the teacher's {teacher}; drop --num-classes (the student then gets the "
            f"teacher's {teacher} classes)"]


def check_token_layout(manifest: Manifest) -> list[str]:
    """Cached ViT blocks must hold ``prefix + grid`` tokens, as the manifest's teacher section says."""
    t = manifest["teacher"]
    grid = t.get("grid_size")
    if not grid:
        return []
    expected = int(t.get("num_prefix_tokens", 0)) + math.prod(int(g) for g in grid)
    problems = []
    for name in manifest.target_names:
        shape = manifest["targets"][name]["shape"]
        if is_block(name) and int(shape[0]) != expected:
            problems.append(f"token layout: {name} holds {shape[0]} tokens, but the teacher's layout "
                            f"({t.get('num_prefix_tokens', 0)} prefix + {grid} grid) has {expected}; the manifest "
                            "is inconsistent, re-extract the cache")
    return problems


def _safe_required(cls: type, manifest: Manifest, args: Mapping[str, Any]) -> list[str]:
    try:
        return list(cls.required_targets(manifest, **args))
    except (TypeError, ValueError):
        return []
