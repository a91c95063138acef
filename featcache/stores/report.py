"""Per-target storage report for ``featcache info``: codec, bytes per view, ratio to raw fp16, lossy error.

Errors of lossy encodings come from, in order: ``manifest["targets"][name]["measured_error"]`` (recorded by
``featcache convert``, measured on every row against the decoded source), or, when ``measure > 0``, a fresh
measurement on ``measure`` random views: the views are replayed from the source images and the teacher is
re-run (``featcache.extract.verify_cache``), so it needs the data and the teacher weights.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from .base import open_reader
from .codecs import stored_names

LOSSY_KINDS = ("bitround", "int8", "topk")


def _disk_bytes(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else 0


def array_nbytes(reader: Any, path: str | os.PathLike) -> dict[str, int]:
    """Bytes on disk of every stored array: the backend's own count, else the array's directory (zarr)."""
    if hasattr(reader, "array_nbytes"):
        return reader.array_nbytes()
    return {name: _disk_bytes(Path(path) / name) for name in reader.manifest["arrays"]}


def codec_report(path: str | os.PathLike, measure: int = 0, data_root: str | None = None,
                 device: str = "cpu") -> dict[str, dict[str, Any]]:
    """Target name -> {encoding, arrays{name: dtype, compressor, bytes_per_view}, bytes_per_view,
    ratio_to_fp16, bound, measured_error}; ``ratio_to_fp16`` = stored bytes / dense fp16 bytes."""
    reader = open_reader(path, require_complete=False)
    m = reader.manifest
    rows = max(m.num_rows, 1)
    nbytes = array_nbytes(reader, path)
    measured = _measure(path, m, measure, data_root, device)
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
    except (OSError, RuntimeError, ValueError) as e:
        return {n: {"error": f"not measured: {e}"} for n in lossy}
    return {n: {"rel_l2": res["targets"][n]["rel"], "max_abs": res["targets"][n]["max_abs"],
                "rows": len(res["rows"]), "reference": "teacher re-run on replayed views"} for n in lossy}


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
        err_s = ("-" if not err else err.get("error") or f"relL2 {err['rel_l2']:.3g} max {err['max_abs']:.3g}")
        lines.append(f"{name:<12} {enc_s:<22} {comp_s:<26} {r['bytes_per_view']:>11.0f} {r['ratio_to_fp16']:>8.3f}  "
                     f"{err_s}")
    return "\n".join(lines)
