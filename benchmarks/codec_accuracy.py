"""What a compact cache costs in student accuracy, on the digits demo teacher (its features are trained, real ones).

Steps (CPU; nothing is downloaded):
  1. the demo's digits and its small ViT teacher (``featcache.demo``; reused when already trained);
  2. one fp16 cache of blocks 0, 1, 3 + logits (the demo's extraction: 8 views of every train digit);
  3. ``featcache convert`` of that cache into every ``--codecs`` entry (the error per layer against the decoded fp16
     cache is measured on every row and recorded by convert);
  4. the demo's KD and ViTKD+NKD students trained from every cache with ``--seeds`` seeds (the settings of
     ``featcache demo``, ``featcache.demo.DemoConfig``, but ``--epochs`` per run);
  5. the read path of every cache: views/s of ``read_row`` (read + decode) over all rows in random order, one
     process, warm page cache, measured in this run side by side.

Usage:
    python benchmarks/codec_accuracy.py --out /tmp/codec_acc [--codecs pca:0.3,pca:0.5] [--seeds 0,1,2]
                                        [--epochs 12] [--jobs 2]
Prints one table (Markdown) and writes ``codec_accuracy.json`` into ``--out``.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from featcache.convert import convert
from featcache.demo import DemoConfig, demo_runs, demo_spec, ensure_teacher, write_digits
from featcache.info import codec_report
from featcache.report import summarize_run
from featcache.stores import open_reader
from featcache.sweep import SweepSpec, run_sweep
from featcache.sweep.cache import ensure_cache

METHODS = ("kd", "vitkd+nkd")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="codec_accuracy")
    p.add_argument("--codecs", default="pca:0.3,pca:0.5", help="comma-separated --codec values to compare with fp16")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--epochs", type=int, default=12)
    p.add_argument("--jobs", type=int, default=2)
    return p.parse_args()


def caches(cfg: DemoConfig, out: Path, codecs: list[str], log=print) -> dict[str, Path]:
    """The fp16 cache (extracted once) and one converted cache per codec: label -> path."""
    spec = demo_spec(cfg, out, out / "teacher.safetensors")
    ensure_cache(spec, log)  # extracts the cache unless it is complete
    paths = {"fp16": Path(spec.cache)}
    for codec in codecs:
        dst = out / f"cache_{codec.replace(':', '_').replace('+', '_')}"
        t = time.perf_counter()
        convert(spec.cache, dst, "zarr", codec=codec, progress=False)
        log(f"convert -> {codec}: {time.perf_counter() - t:.0f} s")
        paths[codec] = dst
    return paths


def read_rate(path: Path, rounds: int = 2) -> float:
    """Views/s of ``read_row`` (stored arrays + decode, all targets) in random order, in one process with one torch
    thread (as a DataLoader worker runs), warm page cache."""
    import torch

    torch.set_num_threads(1)
    reader = open_reader(path)
    order = np.random.default_rng(0).permutation(len(reader)).tolist()
    for row in order[:256]:
        reader.read_row(row)
    t = time.perf_counter()
    for _ in range(rounds):
        for row in order:
            reader.read_row(row)
    return rounds * len(order) / (time.perf_counter() - t)


def train_students(cfg: DemoConfig, out: Path, label: str, cache: Path, seeds: list[int], jobs: int) -> dict:
    """KD and ViTKD+NKD from ``cache`` for every seed (a sweep per cache): method -> list of final top-1."""
    base = demo_spec(cfg, out, out / "teacher.safetensors").base
    runs = [r for r in demo_runs(cfg) if r["name"] in METHODS]
    spec = {"cache": str(cache), "base": base, "runs": runs, "grid": {"seed": seeds},
            "out": str(out / "runs" / label.replace(":", "_"))}
    result = run_sweep(SweepSpec.from_dict(spec), jobs=jobs, report=False, log=lambda s: None)
    top1: dict[str, list[float]] = {m: [] for m in METHODS}
    for name in sorted(result["runs"], key=lambda n: int(n.rpartition("seed=")[2])):  # seed order: pairs line up
        row = summarize_run(Path(spec["out"]) / name).row
        top1[name.split(",")[0]].append(row["top1"])
    return top1


def codec_row(label: str, cache: Path, top1: dict, rate: float) -> dict:
    report = codec_report(cache, rerun_teacher=False)
    stored = sum(r["bytes_per_view"] for r in report.values())
    fp16 = sum(r["fp16_bytes_per_view"] for r in report.values())
    errors = {n: (r["measured_error"] or {}).get("rel_l2", 0.0) for n, r in report.items() if n != "logits"}
    return {"codec": label, "bytes_per_view": stored, "ratio_to_fp16": stored / fp16, "rel_l2": errors,
            "top1": top1, "read_views_s": rate}


def markdown(rows: list[dict]) -> str:
    head = "| codec | bytes/view | vs fp16 | rel L2 per layer | KD top-1 mean (min-max) | ViTKD+NKD top-1 mean " \
           "(min-max) | read views/s |\n|---|---:|---:|---|---:|---:|---:|"
    lines = [head]
    for r in rows:
        err = ", ".join(f"{k} {v:.4f}" for k, v in r["rel_l2"].items()) if any(r["rel_l2"].values()) else "0 (source)"
        acc = [f"{np.mean(v):.2f} ({min(v):.2f}-{max(v):.2f})" for v in (r["top1"][m] for m in METHODS)]
        lines.append(f"| {r['codec']} | {r['bytes_per_view']:.0f} | {r['ratio_to_fp16']:.3f} | {err} | {acc[0]} | "
                     f"{acc[1]} | {r['read_views_s']:.0f} |")
    return "\n".join(lines)


def main() -> None:
    args = parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = DemoConfig(out=str(out), epochs=args.epochs, online_kd=False)
    start = time.perf_counter()
    write_digits(out / "digits", cfg.img_size, cfg.test_fraction, cfg.seed, cfg.max_train)
    ensure_teacher(cfg, out / "digits", out)
    paths = caches(cfg, out, [c for c in args.codecs.split(",") if c])
    rates = {label: read_rate(path) for label, path in paths.items()}  # side by side, before the trainings
    seeds = [int(s) for s in args.seeds.split(",")]
    rows = [codec_row(label, path, train_students(cfg, out, label, path, seeds, args.jobs), rates[label])
            for label, path in paths.items()]
    print(markdown(rows))
    print(f"total {time.perf_counter() - start:.0f} s")
    (out / "codec_accuracy.json").write_text(json.dumps({"rows": rows, "args": vars(args)}, indent=1))


if __name__ == "__main__":
    main()
