"""Per-target storage report for ``featcache info``: codec, bytes per view, ratio to raw fp16, lossy error.

Errors of lossy feature encodings (bitround, int8) come from, in order:
``manifest["targets"][name]["measured_error"]`` (recorded by ``featcache convert``, measured on every row
against the decoded source), or, when ``measure > 0``, a fresh measurement on ``measure`` random views: the
views are replayed from the source images and the teacher is re-run (``featcache.extract.verify_cache``), so it
needs the data and the teacher weights (if they are not reachable the report says why instead).
Top-k logits report the leftover probability mass (what top-k drops) over ``measure`` views, read from the cache.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from ..durable import disk_bytes
from .base import open_reader
from .codecs import bf16_bits_to_float, stored_names, topk_probs

LOSSY_KINDS = ("bitround", "int8")


def array_nbytes(reader: Any, path: str | os.PathLike) -> dict[str, int]:
    """Bytes on disk of every stored array: the backend's own count, else the array's directory (zarr)."""
    if hasattr(reader, "array_nbytes"):
        return reader.array_nbytes()
    return {name: disk_bytes(Path(path) / name) for name in reader.manifest["arrays"]}


def codec_report(path: str | os.PathLike, measure: int = 8, data_root: str | None = None, device: str = "cpu",
                 rerun_teacher: bool = True, reader: Any = None) -> dict[str, dict[str, Any]]:
    """Target name -> {encoding, arrays{name: dtype, compressor, bytes_per_view}, bytes_per_view,
    ratio_to_fp16, bound, measured_error}; ``ratio_to_fp16`` = stored bytes / dense fp16 bytes.

    Args:
        measure: views sampled for errors not recorded in the manifest (0: none).
        rerun_teacher: allow the teacher re-run that measuring a lossy feature codec needs.
    """
    reader = reader if reader is not None else open_reader(path, require_complete=False)
    m = reader.manifest
    rows = max(m.num_rows, 1)
    nbytes = array_nbytes(reader, path)
    measured = _measure(path, m, measure if rerun_teacher else 0, data_root, device) | _topk_leftover(reader, measure)
    out = {}
    for name, target in m["targets"].items():
        enc = target["encoding"]
        arrays = {a: {"dtype": m["arrays"][a]["dtype"], "compressor": m["arrays"][a].get("compressor"),
                      "bytes_per_view": nbytes.get(a, 0) / rows} for a in stored_names(m, [name])}
        per_view = sum(a["bytes_per_view"] for a in arrays.values())
        fp16 = int(np.prod(target["shape"])) * 2
        out[name] = {"encoding": enc, "arrays": arrays, "bytes_per_view": per_view, "ratio_to_fp16": per_view / fp16,
                     "bound": enc.get("bound"),
                     "measured_error": target.get("measured_error") or measured.get(name)}
    return out


def _measure(path: str | os.PathLike, m: Any, measure: int, data_root: str | None, device: str
             ) -> dict[str, dict[str, Any]]:
    lossy = [n for n, t in m["targets"].items() if t["encoding"]["kind"] in LOSSY_KINDS
             and "measured_error" not in t]
    if not measure or not lossy:
        return {}
    from ..extract import verify_cache  # heavy (teacher, data); only when asked

    try:
        res = verify_cache(str(path), samples=measure, device=device, data_root=data_root)
    except Exception as e:  # info must still print: say why the error could not be measured
        return {n: {"error": f"not measured ({type(e).__name__}: {e})"} for n in lossy}
    return {n: {"rel_l2": res["targets"][n]["rel"], "max_abs": res["targets"][n]["max_abs"],
                "rows": len(res["rows"]), "reference": "teacher re-run on replayed views"} for n in lossy}


def _topk_leftover(reader: Any, measure: int) -> dict[str, dict[str, Any]]:
    m = reader.manifest
    names = [n for n, t in m["targets"].items() if t["encoding"]["kind"] == "topk"]
    if not names or not measure or not m.complete:
        return {}
    rows = np.random.default_rng(0).choice(m.num_rows, size=min(measure, m.num_rows), replace=False)
    out = {}
    for name in names:
        stored = [reader.read_stored_row(int(r), stored_names(m, [name])) for r in rows]
        values = np.stack([s[f"{name}__topk_values"] for s in stored])
        if m["targets"][name]["encoding"]["dtype"] == "bf16":
            values = bf16_bits_to_float(values)
        leftover = topk_probs(values.astype(np.float32))[1]
        out[name] = {"leftover_mean": float(leftover.mean()), "leftover_max": float(leftover.max()),
                     "rows": len(rows)}
    return out


def format_report(report: dict[str, dict[str, Any]]) -> str:
    """Plain-text table of :func:`codec_report` (one line per target)."""
    lines = [f"{'target':<12} {'encoding':<22} {'compressor':<26} {'bytes/view':>11} {'vs fp16':>8}  error"]
    for name, r in report.items():
        enc = r["encoding"]
        enc_s = enc["kind"] + (f":{enc['keepbits']}" if "keepbits" in enc else f":{enc['k']}" if "k" in enc else "")
        enc_s += f" {enc['dtype']}" if "dtype" in enc else ""
        comp = next(iter(r["arrays"].values()))["compressor"] or {"name": "none"}
        comp_s = ":".join(str(v) for v in comp.values())
        err = r["measured_error"]
        if not err:
            err_s = "-"
        elif "leftover_mean" in err:
            err_s = f"leftover mass mean {err['leftover_mean']:.3g} max {err['leftover_max']:.3g}"
        else:
            err_s = err.get("error") or f"relL2 {err['rel_l2']:.3g} max {err['max_abs']:.3g}"
        lines.append(f"{name:<12} {enc_s:<22} {comp_s:<26} {r['bytes_per_view']:>11.0f} {r['ratio_to_fp16']:>8.3f}  "
                     f"{err_s}")
    return "\n".join(lines)
