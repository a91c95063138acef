"""``featcache info``: what a cache holds and what it costs: manifest essentials, bytes on disk, per view the stored
bytes and their ratio to dense fp16, and per target its encoding, bytes per view, ratio to raw fp16 and error.

Errors of element-wise lossy encodings (bitround, int8, pca) come from, in order:
``manifest["targets"][name]["measured_error"]`` (recorded by ``featcache convert``, measured on every row against
the decoded source; for a ``pca`` cache made by ``featcache extract``, on the views its codebook was fitted on),
or, when ``measure > 0``, a fresh measurement on ``measure`` random views: the views are
replayed from the source images and the teacher is re-run (:func:`featcache.verify.verify_cache`), so it needs the
data and the teacher weights (if they are not reachable the report says why instead). Encodings whose loss shows
in the stored rows alone (top-k logits: the leftover probability mass) are measured from ``measure`` cached views.
"""
from __future__ import annotations

import os
from typing import Any

import numpy as np

from .storage import disk_bytes
from .manifest import Manifest
from .stores import StoreReader, open_reader
from .stores.codecs import lossless_label
from .stores.encodings import encoding, stored_names


def cache_info(path: str, measure: int = 8, data_root: str | None = None) -> dict[str, Any]:
    """Summary of a cache (complete or not): manifest essentials, per-array bytes, ratio to raw fp32, and per
    target its codec, bytes per view, ratio to raw fp16 and (lossy codecs) the error measured on ``measure`` views."""
    reader = open_reader(path, require_complete=False)
    m = reader.manifest
    nbytes = reader.array_nbytes()  # every backend: zarr array dirs, tar member payloads, HDF5 storage
    arrays = {name: {"shape": [m.num_rows, *spec["shape"]], "dtype": spec["dtype"],
                     "compressor": spec.get("compressor"), "bytes": nbytes.get(name)}
              for name, spec in m["arrays"].items()}
    raw = m.num_rows * sum(int(np.prod(t["shape"])) for t in m["targets"].values()) * 4
    total = disk_bytes(reader.path)
    target_bytes = sum(nbytes.values()) or total
    codecs = codec_report(path, measure=measure, data_root=data_root, reader=reader)
    return {
        "path": str(path), "format": m["storage"]["format"], "complete": m.complete, **_identity(m),
        "units_done": sum(1 for n in reader.unit_notes() if n), "num_units": m.num_units,
        "dtype": m["storage"]["dtype"], "storage": m["storage"], "skipped": list(m.get("skipped", [])),
        "arrays": arrays, "bytes_on_disk": total,
        "target_bytes": target_bytes, "raw_fp32_bytes": raw, "ratio_to_raw_fp32": target_bytes / raw if raw else None,
        "versions": m.get("versions", {}), "codecs": codecs, "view": view_summary(codecs),
    }


def view_summary(codecs: dict[str, dict[str, Any]]) -> dict[str, float]:
    """Stored bytes of one view over all its targets, and their ratio to the same targets as dense fp16."""
    stored = sum(r["bytes_per_view"] for r in codecs.values())
    fp16 = sum(r["fp16_bytes_per_view"] for r in codecs.values())
    return {"bytes_per_view": stored, "fp16_bytes_per_view": fp16, "ratio_to_fp16": stored / fp16 if fp16 else None}


def _identity(m: Manifest) -> dict[str, Any]:
    """What the cache was made from: teacher, layers, views, data subset."""
    t = m["teacher"]
    return {"teacher": {k: t.get(k) for k in ("name", "timm_name", "pretrained", "checkpoint", "weights_sha256")},
            "layers": m.layers, "img_size": m["img_size"], "views": m.views_per_sample, "seed": m["views"]["seed"],
            "subset": m["subset"], "num_samples": m["num_samples"], "num_rows": m.num_rows}


def _human(n: float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def format_info(info: dict[str, Any]) -> str:
    """Human-readable text of :func:`cache_info`."""
    t = info["teacher"]
    lines = [
        f"cache      {info['path']} ({info['format']}, {'complete' if info['complete'] else 'INCOMPLETE'}, "
        f"units {info['units_done']}/{info['num_units']})",
        f"teacher    {t['name']} ({t['timm_name']}, {'pretrained' if t['pretrained'] else 'random init'}"
        f"{', checkpoint ' + t['checkpoint'] if t['checkpoint'] else ''}) sha256 {(t['weights_sha256'] or '-')[:16]}",
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
    view = info["view"]
    if view["ratio_to_fp16"] is not None:
        lines.append(f"per view   {view['bytes_per_view']:.0f} B stored = {view['ratio_to_fp16']:.3f} x fp16 "
                     f"({view['fp16_bytes_per_view']:.0f} B dense fp16)")
    if info.get("codecs"):
        lines += ["codecs", format_report(info["codecs"])]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ per target

def codec_report(path: str | os.PathLike, measure: int = 8, data_root: str | None = None, device: str = "cpu",
                 rerun_teacher: bool = True, reader: StoreReader | None = None) -> dict[str, dict[str, Any]]:
    """Target name -> {encoding, arrays{name: dtype, compressor, bytes_per_view}, bytes_per_view,
    fp16_bytes_per_view, ratio_to_fp16, bound, measured_error}; ``ratio_to_fp16`` = stored bytes / dense fp16 bytes.

    Args:
        path: the cache.
        measure: views sampled for errors not recorded in the manifest (0: none).
        data_root: where the source images are now, for the teacher re-run.
        device: where the teacher re-runs.
        rerun_teacher: allow the teacher re-run that measuring a lossy feature codec needs.
        reader: the cache, already open.
    """
    reader = reader if reader is not None else open_reader(path, require_complete=False)
    m = reader.manifest
    rows = max(m.num_rows, 1)
    nbytes = reader.array_nbytes()
    measured = _measure(path, m, measure if rerun_teacher else 0, data_root, device) | _stored_errors(reader, measure)
    out = {}
    for name, target in m["targets"].items():
        enc = target["encoding"]
        arrays = {a: {"dtype": m["arrays"][a]["dtype"], "compressor": m["arrays"][a].get("compressor"),
                      "bytes_per_view": nbytes.get(a, 0) / rows} for a in stored_names(m, [name])}
        per_view = sum(a["bytes_per_view"] for a in arrays.values())
        fp16 = int(np.prod(target["shape"])) * 2
        out[name] = {"encoding": enc, "arrays": arrays, "bytes_per_view": per_view, "fp16_bytes_per_view": fp16,
                     "ratio_to_fp16": per_view / fp16,
                     "bound": enc.get("bound"),
                     "measured_error": target.get("measured_error") or measured.get(name)}
    return out


def _measure(path: str | os.PathLike, m: Manifest, measure: int, data_root: str | None, device: str
             ) -> dict[str, dict[str, Any]]:
    """Errors of element-wise lossy targets not measured before, from a teacher re-run on ``measure`` views."""
    lossy = [n for n, t in m["targets"].items() if _measured_against_teacher(t)]
    if not measure or not lossy:
        return {}
    from .verify import verify_cache  # heavy (teacher, data); only when asked

    try:
        res = verify_cache(str(path), samples=measure, device=device, data_root=data_root)
    except Exception as e:  # info must still print: say why the error could not be measured
        return {n: {"error": f"not measured ({type(e).__name__}: {e})"} for n in lossy}
    return {n: {"rel_l2": res["targets"][n]["rel"], "max_abs": res["targets"][n]["max_abs"],
                "rows": len(res["rows"]), "reference": "teacher re-run on replayed views"} for n in lossy}


def _measured_against_teacher(target: dict[str, Any]) -> bool:
    enc = encoding(target["encoding"])
    return enc.lossy and enc.elementwise and "measured_error" not in target


def _stored_errors(reader: StoreReader, measure: int) -> dict[str, dict[str, Any]]:
    """The loss of encodings that shows in stored rows alone (top-k leftover mass), over ``measure`` cached views."""
    m = reader.manifest
    names = [n for n, t in m["targets"].items() if not encoding(t["encoding"]).elementwise]
    if not names or not measure or not m.complete:
        return {}
    rows = np.random.default_rng(0).choice(m.num_rows, size=min(measure, m.num_rows), replace=False)
    out = {}
    for name in names:
        stored = [reader.read_stored_row(int(r), stored_names(m, [name])) for r in rows]
        batch = {a: np.stack([s[a] for s in stored]) for a in stored[0]}
        out[name] = encoding(m["targets"][name]["encoding"]).stored_error(name, batch)
    return out




def _error_label(err: dict[str, Any] | None) -> str:
    if not err:
        return "-"
    if "leftover_mean" in err:
        return f"leftover mass mean {err['leftover_mean']:.3g} max {err['leftover_max']:.3g}"
    return err.get("error") or f"relL2 {err['rel_l2']:.3g} max {err['max_abs']:.3g}"


def format_report(report: dict[str, dict[str, Any]]) -> str:
    """Plain-text table of :func:`codec_report` (one line per target)."""
    lines = [f"{'target':<12} {'encoding':<22} {'compressor':<26} {'bytes/view':>11} {'vs fp16':>8}  error"]
    for name, r in report.items():
        comp_s = lossless_label(next(iter(r["arrays"].values()))["compressor"])
        lines.append(f"{name:<12} {encoding(r['encoding']).label():<22} {comp_s:<26} {r['bytes_per_view']:>11.0f} "
                     f"{r['ratio_to_fp16']:>8.3f}  {_error_label(r['measured_error'])}")
    return "\n".join(lines)
