"""Stage 1: run a frozen teacher once over K seeded views of every image and write the targets to a cache.

Extraction proceeds in *units* (``shard_size`` consecutive rows, one shard of every array). The loader
decodes and augments views in any batch size and worker count; the teacher then runs once per unit on
exactly that unit's rows. Fixing the forward batch to the unit (not ``--batch-size``) matters because
matmul kernels are not batch-invariant: a row's features would otherwise change in the last bits with the
batch size or with where a resumed run started, and caches would not be byte-identical. A unit is marked
complete only after its data is durable, so a killed run resumes from the first unmarked unit.

`verify_cache` replays stored views and re-runs the teacher; `cache_info` summarises a cache.
"""
from __future__ import annotations

import platform
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader

from . import __version__
from .config import ExtractConfig
from .sources import ImageDecodeError, ImageSource, open_source, select_subset, source_from_manifest, source_manifest_entry
from .manifest import FORMAT_VERSION, Manifest
from .stores.base import StoreWriter, create_writer, open_reader
from .stores.codecs import (VERIFY_RTOL, ErrorMeter, array_specs, check_fp16_range, encode_targets, targets_section,
                            verify_reference)
from .durable import disk_bytes
from .datasets import ViewDataset
from .teachers import Teacher, load_teacher, resolve_device, teacher_from_manifest
from .views import Recipe, default_recipe, fingerprint, make_view, normalize, replay


def resolve_layers(layers: list[int], num_blocks: int) -> list[int]:
    """Negative block indices count from the end; every index must name one of the teacher's blocks."""
    out = []
    for layer in layers:
        idx = layer + num_blocks if layer < 0 else layer
        if not 0 <= idx < num_blocks:
            raise ValueError(f"--layers {layer} is out of range: the teacher has blocks 0..{num_blocks - 1}")
        out.append(idx)
    if len(set(out)) != len(out):
        raise ValueError(f"--layers {layers} names a block twice (resolved: {out})")
    return out


# ------------------------------------------------------------------------------------------------ manifest


def versions() -> dict[str, str]:
    """Library versions recorded in the manifest (informational, not part of the cache identity)."""
    import numcodecs
    import timm
    import torchvision
    import zarr

    return {"featcache": __version__, "timm": timm.__version__, "torch": torch.__version__,
            "torchvision": torchvision.__version__, "zarr": zarr.__version__, "numcodecs": numcodecs.__version__,
            "numpy": np.__version__, "python": platform.python_version()}


def storage_section(cfg: ExtractConfig) -> dict[str, Any]:
    """The manifest's ``storage`` section (part of the cache identity; the codec string is parsed by
    :mod:`featcache.stores.codecs`)."""
    if cfg.shard_size < 1:
        raise ValueError(f"--shard-size must be >= 1, got {cfg.shard_size}")
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


def iter_units(loader: DataLoader, manifest: Manifest, skip_corrupt: bool) -> Iterator[tuple[int, dict[str, Any]]]:
    """Regroup loader batches into whole units: yields ``(unit, columns)`` once all of a unit's rows are in."""
    pending: dict[int, list[dict[str, Any]]] = {}
    for batch in loader:
        for j in range(len(batch["row"])):
            item = {k: v[j] for k, v in batch.items()}
            if item["error"] and not skip_corrupt:  # before its unit is written: the cache never holds it
                raise ImageDecodeError(item["path"], item["error"], item["relpath"])
            unit = int(item["row"]) // manifest.shard_size
            pending.setdefault(unit, []).append(item)
            if len(pending[unit]) == len(manifest.unit_rows(unit)):
                yield unit, _columns(sorted(pending.pop(unit), key=lambda it: int(it["row"])))


def _columns(items: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {"image": torch.stack([it["image"] for it in items])}
    for key in ("row", "sample", "view", "label", "seed", "fingerprint", "valid"):
        out[key] = np.asarray([int(it[key]) for it in items])
    out["params"] = np.stack([np.asarray(it["params"], dtype=np.float64) for it in items])
    out["skipped"] = sorted({str(it["relpath"]) for it in items if int(it["valid"]) == 0})
    return out


# ------------------------------------------------------------------------------------------------ extraction


def compute_targets(teacher: Teacher, images: torch.Tensor, manifest: Manifest, device: torch.device
                    ) -> dict[str, np.ndarray]:
    """Teacher targets (float32 numpy) for uint8 views, in one forward pass."""
    norm = manifest["normalization"]
    x = normalize(images.to(device, non_blocking=True), norm["mean"], norm["std"])
    out = teacher.targets(x, manifest.layers)
    return {name: v.float().cpu().numpy() for name, v in out.items()}


def check_range(targets: dict[str, np.ndarray], dtype: str) -> None:
    """Stop before storing values the chosen dtype would lose (non-finite, or too large for fp16)."""
    if dtype == "fp16":
        check_fp16_range(targets, dtype)  # checks finiteness too: one pass over the unit, not two
        return
    for name, value in targets.items():
        if not np.isfinite(value).all():
            raise ValueError(f"the teacher produced non-finite values in {name!r}; check the weights and inputs")


def write_unit(writer: StoreWriter, manifest: Manifest, unit: int, cols: dict[str, Any],
               targets: dict[str, np.ndarray]) -> None:
    """Zero the targets of skipped views, encode, and hand the unit to the writer."""
    invalid = cols["valid"] == 0
    for value in targets.values():
        value[invalid] = 0
    check_range(targets, manifest["storage"]["dtype"])
    records = {k: cols[k] for k in ("sample", "view", "label", "seed", "params", "fingerprint", "valid")}
    writer.write_unit(unit, encode_targets(targets, manifest["storage"]), records, skipped=cols["skipped"])


def prepare(cfg: ExtractConfig, device: torch.device) -> tuple[Teacher, ImageSource, Manifest]:
    """Load the data and the teacher; build the manifest this run would write."""
    source = open_source(cfg.data, cfg.data_format)
    indices = select_subset(source.items, cfg.shots, cfg.fraction, cfg.subset_seed)
    teacher = load_teacher(cfg.teacher, pretrained=cfg.pretrained, checkpoint=cfg.checkpoint, img_size=cfg.img_size,
                           num_classes=cfg.num_classes, device=device, **cfg.teacher_kwargs)
    img_size = cfg.img_size or int(teacher.model.pretrained_cfg.get("input_size", (3, 224, 224))[-1])
    interp = teacher.data_config(img_size)["interpolation"]
    recipe = default_recipe(img_size, cfg.scale, cfg.ratio, cfg.hflip, cfg.color_jitter, interpolation=interp)
    layers = resolve_layers(list(cfg.layers), teacher.num_blocks())
    manifest = build_manifest(cfg, teacher, source, indices, recipe, layers,
                              target_shapes(teacher, layers, img_size, device))
    return teacher, source.subset(indices), manifest


def run_extract(cfg: ExtractConfig, progress: bool = True, max_units: int | None = None) -> str:
    """Extract (or resume) the cache ``cfg.out``; returns its path.

    Args:
        cfg: what to extract; see `ExtractConfig`.
        progress: show a tqdm bar (img/s, ETA).
        max_units: stop after writing this many units in this call (tests use it to simulate interruptions).

    Raises:
        CacheError: an existing cache at ``cfg.out`` has different settings (the keys are named).
        ImageDecodeError: an image is corrupt and ``cfg.skip_corrupt`` is off (the file is named).
    """
    cfg.validate()
    device = resolve_device(cfg.device)
    teacher, source, manifest = prepare(cfg, device)
    writer = create_writer(cfg.out, manifest, format=cfg.format, overwrite=cfg.overwrite)
    manifest = writer.manifest
    if manifest.complete:
        if progress:
            print(f"cache {cfg.out} is already complete; nothing to do (--overwrite recomputes it)")
        return str(cfg.out)
    done = writer.completed_units()  # once: each call reads every unit marker
    todo = [u for u in range(manifest.num_units) if u not in done][:max_units]
    rows = [r for u in todo for r in manifest.unit_rows(u)]
    dataset = ViewDataset(source, Recipe.from_dict(manifest["views"]["recipe"]), manifest["views"]["seed"],
                          manifest.views_per_sample, rows, cfg.skip_corrupt)
    loader = DataLoader(dataset, batch_size=cfg.batch_size, num_workers=cfg.workers, shuffle=False,
                        collate_fn=_collate_list, pin_memory=device.type == "cuda")
    extract_units(writer, teacher, loader, device, skip_corrupt=cfg.skip_corrupt, total=len(rows), progress=progress)
    if max_units is None or len(writer.completed_units()) == manifest.num_units:
        writer.finalize()
    return str(cfg.out)


def extract_units(writer: StoreWriter, teacher: Teacher, loader: DataLoader, device: torch.device,
                  skip_corrupt: bool = False, total: int | None = None, progress: bool = True) -> None:
    """Teacher forward per unit, then encode + write + mark it.

    One background thread writes: unit u is encoded, written and fsynced while the teacher runs on unit
    u + 1. At most one write is in flight and each is awaited before the next is submitted, so units are
    marked in order and a write error surfaces at once.
    """
    from tqdm import tqdm

    manifest = writer.manifest
    with tqdm(total=total, unit="img", desc="extract", disable=not progress, dynamic_ncols=True) as bar, \
            ThreadPoolExecutor(max_workers=1, thread_name_prefix="featcache-writer") as pool:
        pending: Future | None = None
        for unit, cols in iter_units(loader, manifest, skip_corrupt):
            targets = compute_targets(teacher, cols["image"], manifest, device)
            if pending is not None:
                pending.result()
            pending = pool.submit(write_unit, writer, manifest, unit, cols, targets)
            pending.add_done_callback(lambda f, n=len(cols["row"]): bar.update(n) if f.exception() is None else None)
        if pending is not None:
            pending.result()


def _collate_list(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Columns as plain lists (regrouping into units happens in the main process anyway), except the images:
    stacked in the worker, so a batch crosses the process boundary as one shared-memory tensor, not one per view
    (per-view tensors cost ~1.7 ms each in file-descriptor passing, ~15 % of extraction time at 64 px on CPU)."""
    columns: dict[str, Any] = {k: [it[k] for it in items] for k in items[0]}
    columns["image"] = torch.stack(columns["image"])
    return columns


# ------------------------------------------------------------------------------------------------ verify


def verify_tolerance(encoding: dict[str, Any]) -> float:
    """Relative-L2 tolerance for one target: a lossy codec sets ``encoding["verify_rtol"]``, else by dtype
    (``codecs.VERIFY_RTOL``: fp32 1e-4, fp16 2e-3, bf16 1e-2 -- several times the measured rounding error of
    the dtype, ~2e-4 for fp16 and ~2e-3 for bf16, plus fp32 noise from a different forward batch)."""
    return float(encoding.get("verify_rtol", VERIFY_RTOL.get(encoding.get("dtype", "fp32"), 1e-2)))


def verify_cache(path: str, samples: int = 8, seed: int = 0, device: str = "auto", data_root: str | None = None,
                 batch_size: int = 32) -> dict[str, Any]:
    """Replay ``samples`` random stored views, re-run the teacher, compare with the cache.

    Returns:
        ``{"rows", "fingerprint_mismatches", "targets": {name: {max_abs, rel, tol, ok}}, "ok"}``; ``rel`` is
        ``||cached - recomputed|| / ||recomputed||`` over all checked rows.
    """
    reader = open_reader(path)
    m = reader.manifest
    dev = resolve_device(device)
    teacher = teacher_from_manifest(m, device=dev)
    source = source_from_manifest(m, root=data_root)
    recipe = Recipe.from_dict(m["views"]["recipe"])
    rec = reader.records()
    valid = np.flatnonzero(rec["valid"] == 1)
    rows = np.sort(np.random.default_rng(seed).choice(valid, size=min(samples, len(valid)), replace=False))
    meter = ErrorMeter(list(m["targets"]))
    mismatches: list[int] = []
    for start in range(0, len(rows), batch_size):
        chunk = [int(r) for r in rows[start:start + batch_size]]
        views = [replay(source.load(int(rec["sample"][r])), recipe, rec["params"][r]) for r in chunk]
        mismatches += [r for r, v in zip(chunk, views) if fingerprint(v) != int(rec["fingerprint"][r])]
        fresh = compute_targets(teacher, torch.stack(views), m, dev)
        for i, r in enumerate(chunk):
            ref = {k: verify_reference(k, v[i:i + 1], m["targets"][k])[0] for k, v in fresh.items()}
            cached = reader.read_row(r)
            for name in m["targets"]:
                meter.add(name, ref[name], cached[name])
    return _verify_report(m, meter.report(), [int(r) for r in rows], mismatches)


def _verify_report(m: Manifest, errors: dict[str, dict[str, float]], rows: list[int], mismatches: list[int]
                   ) -> dict[str, Any]:
    targets = {}
    for name, e in errors.items():
        tol = verify_tolerance(m["targets"][name]["encoding"])
        targets[name] = {"max_abs": e["max_abs"], "rel": e["rel_l2"], "tol": tol, "ok": e["rel_l2"] <= tol}
    ok = not mismatches and all(t["ok"] for t in targets.values()) and bool(rows)
    return {"rows": rows, "fingerprint_mismatches": mismatches, "targets": targets, "ok": ok}


# ------------------------------------------------------------------------------------------------ info


def cache_info(path: str, measure: int = 8, data_root: str | None = None) -> dict[str, Any]:
    """Summary of a cache (complete or not): manifest essentials, per-array bytes, ratio to raw fp32, and per
    target its codec, bytes per view, ratio to raw fp16 and (lossy codecs) the error measured on ``measure`` views."""
    from .stores.report import array_nbytes, codec_report

    reader = open_reader(path, require_complete=False)
    m = reader.manifest
    nbytes = array_nbytes(reader, path)  # every backend: zarr array dirs, tar member payloads, HDF5 storage
    arrays = {name: {"shape": [m.num_rows, *spec["shape"]], "dtype": spec["dtype"],
                     "compressor": spec.get("compressor"), "bytes": nbytes.get(name)}
              for name, spec in m["arrays"].items()}
    raw = m.num_rows * sum(int(np.prod(t["shape"])) for t in m["targets"].values()) * 4
    total = disk_bytes(path)
    target_bytes = sum(nbytes.values()) or total
    notes = reader.unit_notes()
    t = m["teacher"]
    return {
        "path": str(path), "format": m["storage"]["format"], "complete": m.complete,
        "teacher": {k: t.get(k) for k in ("name", "timm_name", "pretrained", "checkpoint", "weights_sha256")},
        "layers": m.layers, "img_size": m["img_size"], "views": m.views_per_sample, "seed": m["views"]["seed"],
        "subset": m["subset"], "num_samples": m["num_samples"], "num_rows": m.num_rows,
        "units_done": sum(1 for n in notes if n),
        "num_units": m.num_units, "dtype": m["storage"]["dtype"], "storage": m["storage"],
        "skipped": list(m.get("skipped", [])), "arrays": arrays, "bytes_on_disk": total,
        "target_bytes": target_bytes, "raw_fp32_bytes": raw, "ratio_to_raw_fp32": target_bytes / raw if raw else None,
        "versions": m.get("versions", {}),
        "codecs": codec_report(path, measure=measure, data_root=data_root, reader=reader),
    }


def _human(n: float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def format_info(info: dict[str, Any]) -> str:
    """Human-readable text of `cache_info`."""
    t = info["teacher"]
    lines = [
        f"cache      {info['path']} ({info['format']}, {'complete' if info['complete'] else 'INCOMPLETE'}, "
        f"units {info['units_done']}/{info['num_units']})",
        f"teacher    {t['name']} ({t['timm_name']}, {'pretrained' if t['pretrained'] else 'random init'}"
        f"{', checkpoint ' + t['checkpoint'] if t['checkpoint'] else ''}) sha256 {t['weights_sha256'][:16]}",
        f"layers     {info['layers']}   img_size {info['img_size']}   dtype {info['dtype']}",
        f"data       {info['num_samples']} images x {info['views']} views (seed {info['seed']}) = {info['num_rows']} "
        f"rows; subset {info['subset']}",
        f"skipped    {len(info['skipped'])} file(s)" + "".join(f"\n  {f}" for f in info["skipped"]),
        "arrays",
    ]
    for name, a in info["arrays"].items():
        comp = (a["compressor"] or {}).get("name", "none")
        lines.append(f"  {name:<24} {str(a['shape']):<20} {a['dtype']:<8} {comp:<6} {_human(a['bytes'])}")
    ratio = info["ratio_to_raw_fp32"]
    lines.append(f"bytes      {_human(info['bytes_on_disk'])} on disk; targets {_human(info['target_bytes'])} = "
                 f"{ratio:.3f} x raw fp32 ({_human(info['raw_fp32_bytes'])})")
    if info.get("codecs"):
        from .stores.report import format_report

        lines += ["codecs", format_report(info["codecs"])]
    return "\n".join(lines)


def format_verify(result: dict[str, Any]) -> str:
    """Human-readable text of `verify_cache`."""
    lines = [f"verified {len(result['rows'])} views; fingerprint mismatches: {len(result['fingerprint_mismatches'])}"
             + (f" (rows {result['fingerprint_mismatches'][:10]})" if result["fingerprint_mismatches"] else "")]
    lines.append(f"  {'target':<24} {'max abs':>12} {'rel L2':>12} {'tol':>10}")
    for name, t in result["targets"].items():
        lines.append(f"  {name:<24} {t['max_abs']:>12.3e} {t['rel']:>12.3e} {t['tol']:>10.1e}  "
                     f"{'ok' if t['ok'] else 'FAIL'}")
    lines.append("OK" if result["ok"] else "FAILED: errors over tolerance or replay drift")
    return "\n".join(lines)
