"""``featcache verify``: replay stored views, re-run the teacher, and compare its targets with the cache.

A cache is trusted when every replayed view reproduces its stored fingerprint (the uint8 pixels are the ones the
teacher saw) and every target's relative L2 error stays within its tolerance: the lossy encoding's stated
``verify_rtol``, else the storage dtype's (:func:`verify_tolerance`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np
import torch

from .extract_units import compute_targets
from .manifest import Manifest
from .models import resolve_device
from .sources import ImageSource, source_from_manifest
from .stores import StoreReader, open_reader
from .stores.encodings import ErrorMeter, verify_reference
from .stores.precision import VERIFY_RTOL
from .teachers import Teacher, teacher_from_manifest
from .views import Recipe, fingerprint, replay


def verify_tolerance(encoding: Mapping[str, Any]) -> float:
    """Relative-L2 tolerance for one target: a lossy encoding sets ``encoding["verify_rtol"]``, else the dtype does
    (``VERIFY_RTOL``: fp32 1e-4, fp16 2e-3, bf16 1e-2 -- several times the measured rounding error of the dtype,
    ~2e-4 for fp16 and ~2e-3 for bf16, plus fp32 noise from a different forward batch)."""
    return float(encoding.get("verify_rtol", VERIFY_RTOL.get(encoding.get("dtype", "fp32"), 1e-2)))


def verify_cache(path: str, samples: int = 8, seed: int = 0, device: str = "auto", data_root: str | None = None,
                 batch_size: int = 32, checkpoint: str | None = None) -> dict[str, Any]:
    """Replay ``samples`` random stored views, re-run the teacher, compare with the cache.

    Args:
        path: the cache.
        samples: stored views to check (valid ones, drawn with ``seed``).
        device: where the teacher runs (``auto``: cuda if available).
        data_root: where the source images are now, if they moved since extraction.
        batch_size: views per teacher forward.
        checkpoint: where the teacher's checkpoint is now, if it moved since extraction.

    Returns:
        ``{"rows", "fingerprint_mismatches", "targets": {name: {max_abs, rel, tol, ok}}, "ok"}``; ``rel`` is
        ``||cached - recomputed|| / ||recomputed||`` over all checked rows.

    Raises:
        CacheError: when the cache's bulk records do not match its units' CRC-32s (checked first, in full).
    """
    check = _Check.open(path, device, data_root, checkpoint)
    check.reader.check_records()
    valid = np.flatnonzero(check.records["valid"] == 1)
    rows = np.sort(np.random.default_rng(seed).choice(valid, size=min(samples, len(valid)), replace=False))
    mismatches: list[int] = []
    for start in range(0, len(rows), batch_size):
        mismatches += check.chunk([int(r) for r in rows[start:start + batch_size]])
    return _verify_report(check.reader.manifest, check.meter.report(), [int(r) for r in rows], mismatches)


@dataclass
class _Check:
    """What replaying a cache's views needs, opened once; :meth:`chunk` checks a batch of rows."""

    reader: StoreReader
    teacher: Teacher
    device: torch.device
    source: ImageSource
    recipe: Recipe
    records: dict[str, np.ndarray]
    meter: ErrorMeter

    @classmethod
    def open(cls, path: str, device: str, data_root: str | None, checkpoint: str | None) -> "_Check":
        reader = open_reader(path)
        m, dev = reader.manifest, resolve_device(device)
        return cls(reader, teacher_from_manifest(m, device=dev, checkpoint=checkpoint), dev, source_from_manifest(m, root=data_root),
                   Recipe.from_dict(m["views"]["recipe"]), reader.records(), ErrorMeter(list(m["targets"])))

    def replay(self, row: int) -> torch.Tensor:
        """The stored view ``row`` rebuilt from its source image (and its partner's, for a mixed view)."""
        params = self.records["params"][row]
        partner = self.recipe.partner_of(params)
        return replay(self.source.load(int(self.records["sample"][row])), self.recipe, params,
                      None if partner is None else self.source.load(partner))

    def chunk(self, rows: list[int]) -> list[int]:
        """Replay and recompute ``rows``, add their errors to the meter; return the rows whose replay drifted."""
        m, rec = self.reader.manifest, self.records
        views = [self.replay(r) for r in rows]
        fresh = compute_targets(self.teacher, torch.stack(views), m, self.device)
        for i, row in enumerate(rows):
            cached = self.reader.read_row(row)
            for name, entry in m["targets"].items():
                self.meter.add(name, verify_reference(name, fresh[name][i:i + 1], entry)[0], cached[name])
        return [r for r, v in zip(rows, views) if fingerprint(v) != int(rec["fingerprint"][r])]


def _verify_report(m: Manifest, errors: dict[str, dict[str, float]], rows: list[int], mismatches: list[int]
                   ) -> dict[str, Any]:
    targets = {}
    for name, e in errors.items():
        tol = verify_tolerance(m["targets"][name]["encoding"])
        targets[name] = {"max_abs": e["max_abs"], "rel": e["rel_l2"], "tol": tol, "ok": e["rel_l2"] <= tol}
    ok = not mismatches and all(t["ok"] for t in targets.values()) and bool(rows)
    return {"rows": rows, "fingerprint_mismatches": mismatches, "targets": targets, "ok": ok}


def format_verify(result: dict[str, Any]) -> str:
    """Human-readable text of :func:`verify_cache`."""
    lines = [f"verified {len(result['rows'])} views; fingerprint mismatches: {len(result['fingerprint_mismatches'])}"
             + (f" (rows {result['fingerprint_mismatches'][:10]})" if result["fingerprint_mismatches"] else "")]
    lines.append(f"  {'target':<24} {'max abs':>12} {'rel L2':>12} {'tol':>10}")
    for name, t in result["targets"].items():
        lines.append(f"  {name:<24} {t['max_abs']:>12.3e} {t['rel']:>12.3e} {t['tol']:>10.1e}  "
                     f"{'ok' if t['ok'] else 'FAIL'}")
    lines.append("OK" if result["ok"] else "FAILED: errors over tolerance or replay drift")
    return "\n".join(lines)
