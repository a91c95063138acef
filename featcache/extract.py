"""Stage 1: run a frozen teacher once over K seeded views of every image and write the targets to a cache.

Extraction proceeds in *units* (``shard_size`` consecutive rows, one shard of every array). The loader
decodes and augments views in any batch size and worker count; the teacher then runs once per unit on
exactly that unit's rows. Fixing the forward batch to the unit (not ``--batch-size``) matters because
matmul kernels are not batch-invariant: a row's features would otherwise change in the last bits with the
batch size or with where a resumed run started, and caches would not be byte-identical. A unit is marked
complete only after its data is durable, so a killed run resumes from the first unmarked unit.

Inspecting a cache is :mod:`featcache.info` and :mod:`featcache.verify`; rewriting one is :mod:`featcache.convert`.
"""
from __future__ import annotations

import os
import platform
from contextlib import ExitStack
from dataclasses import replace
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from torch.utils.data import DataLoader

from . import __version__, distributed, locks, storage
from .config import ExtractConfig
from .datasets import ViewDataset
from .extract_units import collate_list, compute_targets, extract_units
from .errors import CacheError, ConfigError
from .manifest import FORMAT_VERSION, Manifest
from .models import resolve_device, resolve_layers
from .sources import ImageSource, open_source, select_subset, source_manifest_entry
from .stores import StoreWriter, create_writer, open_reader
from .stores.encodings import (array_specs, encoding, fit_sample_rows, fit_targets, measure_error, targets_section,
                               unfitted)
from .teachers import Teacher, load_teacher
from .views import Mix, Recipe, default_recipe
from .views.erasing import IMAGENET_MEAN, IMAGENET_STD


#: Views per teacher forward while fitting a codebook (fixed: the codebook must not depend on ``--batch-size``).
FIT_BATCH = 64


# ------------------------------------------------------------------------------------------------ manifest


def teacher_layers(layers: list[int], teacher: Teacher) -> list[int]:
    """``--layers`` as the teacher's absolute block indices (negative ones count from the end).

    Raises:
        ConfigError: naming the option and the teacher's blocks, for an index out of range or a block named twice.
    """
    n = teacher.num_blocks()
    try:
        return resolve_layers(list(layers), n)
    except ConfigError as err:
        raise ConfigError(f"--layers {list(layers)} does not fit teacher {teacher.name!r} (blocks 0..{n - 1}): "
                          f"{err}") from None


def versions() -> dict[str, str]:
    """Library versions recorded in the manifest (informational, not part of the cache identity)."""
    import numcodecs
    import PIL
    import timm
    import torchvision
    import zarr

    return {"featcache": __version__, "timm": timm.__version__, "torch": torch.__version__,
            "torchvision": torchvision.__version__, "pillow": PIL.__version__, "zarr": zarr.__version__,
            "numcodecs": numcodecs.__version__, "numpy": np.__version__, "python": platform.python_version()}


def storage_section(cfg: ExtractConfig) -> dict[str, Any]:
    """The manifest's ``storage`` section (part of the cache identity; the codec string is parsed by
    :func:`featcache.stores.encodings.parse_codec`).

    Raises:
        ConfigError: for a shard size below 1.
    """
    if cfg.shard_size < 1:
        raise ConfigError(f"--shard-size must be >= 1, got {cfg.shard_size}")
    return {"format": cfg.format, "dtype": cfg.dtype, "shard_size": int(cfg.shard_size), "codec": cfg.codec or "none",
            "topk": cfg.topk}


def target_shapes(teacher: Teacher, layers: list[int], img_size: int, device: torch.device) -> dict[str, tuple]:
    """Per-row shape of every target, from one forward pass on a blank image."""
    x = torch.zeros(1, 3, img_size, img_size, device=device)
    return {name: tuple(v.shape[1:]) for name, v in teacher.targets(x, layers).items()}


def build_manifest(cfg: ExtractConfig, teacher: Teacher, source: ImageSource, indices: list[int], recipe: Recipe,
                   layers: list[int], shapes: dict[str, tuple]) -> Manifest:
    """Everything a cache says about itself (see docs/FORMAT.md); deterministic for identical inputs."""
    data_cfg = teacher.data_config(recipe.img_size)
    storage = storage_section(cfg)
    num_rows = len(indices) * cfg.views
    return Manifest({
        "format_version": FORMAT_VERSION, "featcache_version": __version__,
        "teacher": teacher.manifest_entry(), "teacher_kwargs": dict(cfg.teacher_kwargs),
        "versions": versions(), "layers": layers, "img_size": recipe.img_size,
        "normalization": {"mean": data_cfg["mean"], "std": data_cfg["std"], "interpolation": recipe.interpolation},
        "data": source_manifest_entry(source, indices),
        "subset": {"shots": cfg.shots, "fraction": cfg.fraction, "subset_seed": cfg.subset_seed},
        "views": {"count": cfg.views, "seed": cfg.seed, "recipe": recipe.to_dict(), "param_names": recipe.param_names},
        "targets": targets_section(shapes, storage),
        "arrays": array_specs(shapes, storage), "storage": storage,
        "num_samples": len(indices), "num_rows": num_rows, "complete": False, "skipped": [],
    })


# ------------------------------------------------------------------------------------------------ views


def view_recipe(cfg: ExtractConfig, img_size: int, norm: Mapping[str, Any]) -> Recipe:
    """The views ``cfg`` asks for, at ``img_size``, with the teacher's normalisation ``norm`` (``mean``, ``std``,
    ``interpolation``): RandAugment fills with its mean and erasing noise is drawn in its normalised space.

    Raises:
        ConfigError: naming the view flags no recipe can be built from.
    """
    try:
        mix = (Mix(cfg.mixup, cfg.cutmix, cfg.mixup_prob, cfg.mixup_switch_prob) if cfg.mixup > 0 or cfg.cutmix > 0
               else None)
        return default_recipe(img_size, cfg.scale, cfg.ratio, cfg.hflip, cfg.color_jitter, norm["interpolation"],
                              aa=cfg.aa, reprob=cfg.reprob, remode=cfg.remode, mean=norm["mean"], std=norm["std"],
                              mix=mix)
    except ValueError as err:
        raise ConfigError(f"view flags: {err}") from None


#: Stand-in normalisation for checking the view flags before the teacher (and its own normalisation) is loaded.
_CHECK_NORM = {"interpolation": "bicubic", "mean": IMAGENET_MEAN, "std": IMAGENET_STD}


def stage_dir(cfg: ExtractConfig) -> str | None:
    """Where shards named by URL are copied: ``--data-stage-dir``, else ``<out>.shards`` beside a local cache."""
    if cfg.data_stage_dir:
        return cfg.data_stage_dir
    out = storage.location(cfg.out, "--out")
    return None if isinstance(out, storage.ObjectPath) else f"{os.path.abspath(out)}.shards"


def prepare(cfg: ExtractConfig, device: torch.device) -> tuple[Teacher, ImageSource, Manifest]:
    """Load the data and the teacher; build the manifest this run would write."""
    source = open_source(cfg.data, cfg.data_format, stage_dir=stage_dir(cfg), image_column=cfg.data_image_column,
                         label_column=cfg.data_label_column)
    indices = select_subset(source.items, cfg.shots, cfg.fraction, cfg.subset_seed)
    teacher = load_teacher(cfg.teacher, pretrained=cfg.pretrained, checkpoint=cfg.checkpoint, img_size=cfg.img_size,
                           num_classes=cfg.num_classes, device=device, autocast=None if cfg.autocast == "none"
                           else cfg.autocast, **cfg.teacher_kwargs)
    img_size = cfg.img_size or int(teacher.model.pretrained_cfg.get("input_size", (3, 224, 224))[-1])
    recipe = view_recipe(cfg, img_size, teacher.data_config(img_size))
    layers = teacher_layers(cfg.layers, teacher)
    manifest = build_manifest(cfg, teacher, source, indices, recipe, layers,
                              target_shapes(teacher, layers, img_size, device))
    return teacher, source.subset(indices), manifest


def fit_codebooks(cfg: ExtractConfig, teacher: Teacher, source: ImageSource, manifest: Manifest,
                  device: torch.device) -> Manifest:
    """The manifest with the codebooks of fitted encodings (``--codec pca``).

    A resume keeps the codebook of the cache at ``cfg.out`` (its units were encoded with it); otherwise the teacher
    runs on :data:`~featcache.stores.encodings.FIT_ROWS` views spread over the cache, :data:`FIT_BATCH` at a time
    whatever ``--batch-size`` is, so the codebook (and so the cache's bytes) does not depend on the batch size.
    """
    names = unfitted(manifest["targets"])
    existing = None if cfg.overwrite or not names else _existing_targets(cfg.out)
    out = manifest.copy()
    if existing is not None and all(n in existing and not unfitted({n: existing[n]}) for n in names):
        out["targets"] = {**out["targets"], **{n: existing[n] for n in names}}
    elif names:
        out["targets"] = _fitted(manifest["targets"], _fit_sample(cfg, teacher, source, manifest, device, names))
    return out


def _fitted(targets: dict[str, Any], sample: dict[str, np.ndarray]) -> dict[str, Any]:
    """``targets`` with codebooks fitted on ``sample`` and the error they give on it (what ``featcache info``
    reports until a ``verify`` measures more)."""
    out = fit_targets(targets, sample)
    for name, values in sample.items():
        enc = encoding(out[name]["encoding"])
        decoded = enc.decode(name, enc.encode(name, values), out[name]["shape"])
        out[name]["measured_error"] = dict(measure_error(values, decoded), rows=len(values),
                                           reference="teacher targets of the codebook's fit views")
    return out


def _fit_sample(cfg: ExtractConfig, teacher: Teacher, source: ImageSource, manifest: Manifest, device: torch.device,
                names: list[str]) -> dict[str, np.ndarray]:
    rows = fit_sample_rows(np.ones(manifest.num_rows, dtype=np.uint8))
    dataset = ViewDataset(source, Recipe.from_dict(manifest["views"]["recipe"]), manifest["views"]["seed"],
                          manifest.views_per_sample, rows, skip_corrupt=True)  # unreadable views: left out of the fit
    loader = DataLoader(dataset, batch_size=FIT_BATCH, num_workers=cfg.workers, collate_fn=collate_list)
    sample: dict[str, list[np.ndarray]] = {n: [] for n in names}
    for batch in loader:
        valid = np.asarray(batch["valid"]) == 1
        targets = compute_targets(teacher, batch["image"], manifest, device)
        for name in names:
            sample[name].append(targets[name][valid])
    return {name: np.concatenate(parts) for name, parts in sample.items()}


def _existing_targets(path: str) -> dict[str, Any] | None:
    """The ``targets`` section of a cache already at ``path`` (None when there is none)."""
    try:
        return open_reader(path, require_complete=False).manifest["targets"]
    except CacheError:
        return None


def run_extract(cfg: ExtractConfig, progress: bool = True, max_units: int | None = None) -> str:
    """Extract (or resume) the cache ``cfg.out``; returns its path.

    Under ``torchrun`` or ``accelerate launch`` every process calls it, and they share the work
    (:func:`_extract_ranks`, docs/SCALING.md).

    Args:
        cfg: what to extract; see `ExtractConfig`.
        progress: show a tqdm bar (img/s, ETA); with several processes, rank 0's alone.
        max_units: stop after writing this many units in this call, per process (tests use it to simulate
            interruptions).

    Raises:
        CacheError: an existing cache at ``cfg.out`` has different settings (the keys are named).
        DecodeError: an image is corrupt and ``cfg.skip_corrupt`` is off (the file is named).
        LockedError: another process is extracting into ``cfg.out`` (its PID is named).
        RankFailed: another process of a multi-process extraction failed (its error is quoted) or stopped answering.
    """
    cfg.validate()
    view_recipe(cfg, cfg.img_size or 224, _CHECK_NORM)  # bad view flags fail before the teacher loads
    ranks = distributed.detect()
    if ranks.world_size > 1:
        return _extract_ranks(cfg, ranks, progress, max_units)
    with locks.hold(lock_file(cfg.out), cfg.out, "featcache extract"):
        return _extract(cfg, progress, max_units)


def lock_file(out: str | os.PathLike) -> Path:
    """The lock of an extraction ``--out`` (:func:`featcache.storage.lock_path`)."""
    return storage.lock_path(out)


def _extract(cfg: ExtractConfig, progress: bool, max_units: int | None) -> str:
    device = resolve_device(cfg.device)
    teacher, source, manifest = prepare(cfg, device)
    writer = open_cache(cfg, teacher, source, manifest, device)
    if writer.manifest.complete:
        _say_complete(cfg, progress)
        return str(cfg.out)
    extract_share(cfg, writer, teacher, source, device, units_to_do(writer)[:max_units], progress)
    if max_units is None or len(writer.completed_units()) == writer.manifest.num_units:
        writer.finalize()
    return str(cfg.out)


def open_cache(cfg: ExtractConfig, teacher: Teacher, source: ImageSource, manifest: Manifest,
               device: torch.device) -> StoreWriter:
    """Create the cache ``cfg.out``, or reopen it to resume (its codebooks kept), for writing."""
    manifest = fit_codebooks(cfg, teacher, source, manifest, device)
    return create_writer(cfg.out, manifest, format=cfg.format, overwrite=cfg.overwrite)


def units_to_do(writer: StoreWriter) -> list[int]:
    """The units not yet durable and trusted, in order (reads every marker, and back every unit an earlier run
    wrote: call it once)."""
    done = writer.completed_units()
    return [u for u in range(writer.manifest.num_units) if u not in done]


def _say_complete(cfg: ExtractConfig, progress: bool) -> None:
    if progress:
        print(f"cache {cfg.out} is already complete; nothing to do (--overwrite recomputes it)")


def extract_share(cfg: ExtractConfig, writer: StoreWriter, teacher: Teacher, source: ImageSource,
                  device: torch.device, units: list[int], progress: bool) -> None:
    """Extract and write ``units`` of the cache ``writer`` writes."""
    manifest = writer.manifest
    rows = [r for u in units for r in manifest.unit_rows(u)]
    dataset = ViewDataset(source, Recipe.from_dict(manifest["views"]["recipe"]), manifest["views"]["seed"],
                          manifest.views_per_sample, rows, cfg.skip_corrupt)
    loader = DataLoader(dataset, batch_size=cfg.batch_size, num_workers=cfg.workers, shuffle=False,
                        collate_fn=collate_list, pin_memory=device.type == "cuda")
    extract_units(writer, teacher, loader, device, skip_corrupt=cfg.skip_corrupt, total=len(rows), progress=progress)


def _extract_ranks(cfg: ExtractConfig, ranks: distributed.Ranks, progress: bool, max_units: int | None) -> str:
    """One process of a multi-process extraction (``torchrun``, ``accelerate launch``), on its own device.

    Rank 0 takes the lock and creates or reopens the cache while the others load their teacher; they then reopen
    the cache rank 0 made, and each reads back and checks its share of the units earlier runs marked. The units
    still to do are dealt round-robin (rank r takes every world_size-th, from the r-th on), so no two processes write
    the same unit, file or marker, and a resume with any number of processes deals out what is left. Once every
    rank has written its share, rank 0 finalizes. At each of these steps the ranks exchange their outcomes
    (:meth:`~featcache.distributed.Group.step`): an error on one rank stops all of them there, each with one
    message; a rank that dies or hangs stops the others after ``--dist-timeout`` seconds.
    """
    device = distributed.rank_device(resolve_device(cfg.device), ranks)
    ctx: dict[str, Any] = {}
    with distributed.group(ranks, cfg.dist_timeout) as group, ExitStack() as held:
        group.step("staging the shards", lambda: _stage_as_rank(cfg, ranks))
        marked = group.step("opening the cache", lambda: _open_as_rank(cfg, ranks, device, ctx, held))[0]
        if marked is None:
            _say_complete(cfg, progress and ranks.main)
            return str(cfg.out)
        trusted = group.step("checking the units earlier runs wrote",
                             lambda: _check_as_rank(cfg, ranks, device, ctx, marked[ranks.rank::ranks.world_size]))
        done = {u for units in trusted for u in units}
        todo = [u for u in range(ctx["writer"].manifest.num_units) if u not in done]
        mine = todo[ranks.rank::ranks.world_size][:max_units]
        written = group.step("extracting", lambda: _share_as_rank(cfg, ranks, device, ctx, mine, progress))
        group.step("finalizing", lambda: _finish_as_rank(ranks, ctx["writer"], [*trusted, *written], max_units))
    return str(cfg.out)


def _stage_as_rank(cfg: ExtractConfig, ranks: distributed.Ranks) -> None:
    """Rank 0 copies shards named by URL into the staging directory (each fetched once, not once per rank); the
    others then find the copies there, checked by their hashes."""
    from .sources.urls import is_url_spec, stage

    if ranks.main and is_url_spec(cfg.data):
        stage(cfg.data, stage_dir(cfg))


def _open_as_rank(cfg: ExtractConfig, ranks: distributed.Ranks, device: torch.device, ctx: dict[str, Any],
                  held: ExitStack) -> list[int] | None:
    """Every rank loads the teacher; rank 0 holds the lock, opens the cache and returns its marked units (None when
    the cache is complete)."""
    if ranks.main:
        held.enter_context(locks.hold(lock_file(cfg.out), cfg.out, "featcache extract"))
    ctx["teacher"], ctx["source"], ctx["manifest"] = prepare(cfg, device)
    if not ranks.main:
        return None
    ctx["writer"] = open_cache(cfg, ctx["teacher"], ctx["source"], ctx["manifest"], device)
    return None if ctx["writer"].manifest.complete else sorted(ctx["writer"].marked_units())


def _check_as_rank(cfg: ExtractConfig, ranks: distributed.Ranks, device: torch.device, ctx: dict[str, Any],
                   units: list[int]) -> list[int]:
    """The other ranks reopen what rank 0 made (never ``--overwrite`` again; its codebooks, never refitted); each
    rank reads back ``units`` and returns those that hold (the others are un-marked, to be redone)."""
    if not ranks.main:
        ctx["writer"] = open_cache(replace(cfg, overwrite=False), ctx["teacher"], ctx["source"], ctx["manifest"],
                                   device)
    return sorted(ctx["writer"].check_units(units))


def _share_as_rank(cfg: ExtractConfig, ranks: distributed.Ranks, device: torch.device, ctx: dict[str, Any],
                   units: list[int], progress: bool) -> list[int]:
    """Write this rank's units; rank 0 alone shows a bar (of its share)."""
    extract_share(cfg, ctx["writer"], ctx["teacher"], ctx["source"], device, units, progress and ranks.main)
    ctx["writer"].close()  # the parts it wrote are closed before rank 0 reads them (HDF5)
    return units


def _finish_as_rank(ranks: distributed.Ranks, writer: StoreWriter, trusted: list[list[int]],
                    max_units: int | None) -> None:
    """Rank 0 finalizes, trusting what every rank checked or wrote (it need not read those units back)."""
    if not ranks.main:
        return
    writer.adopt(u for units in trusted for u in units)
    if max_units is None or len(writer.completed_units()) == writer.manifest.num_units:
        writer.finalize()
