"""The embedded demo as a pipeline script (the same as ``featcache demo``): digits -> teacher -> one cache ->
sweep (labelled-only CE, KD, NKD, ViTKD, ViTKD+NKD, online-teacher KD, WeCoLoRA) -> timing -> report with a
verdict computed from the mean and range over seeds.

    python pipelines/demo.py --out featcache_demo            # about 440 CPU-seconds (2 cores: both used)
    python pipelines/demo.py --seeds 3 --out featcache_demo  # every student run for 3 seeds
    python pipelines/demo.py --quick --out /tmp/demo_quick    # every stage, tiny sizes
"""
from __future__ import annotations

import argparse
import os
import sys


def _at_least_one(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=None, help="working directory (default featcache_demo; featcache_demo_quick "
                                               "with --quick, so a quick run never replaces a full one's)")
    p.add_argument("--quick", action="store_true", help="tiny sizes: checks every stage in a minute or two")
    p.add_argument("--seeds", type=_at_least_one, default=1, help="student runs per method (default 1)")
    p.add_argument("--jobs", type=int, default=None, help="student trainings at once (default: cores, at most 4)")
    args = p.parse_args(argv)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads: idle threads sleep, not spin
    from featcache.demo import DemoConfig, run_demo

    where = {"out": args.out} if args.out else {}  # each config's own default directory
    cfg = DemoConfig.quick(seeds=args.seeds, **where) if args.quick else DemoConfig(seeds=args.seeds, **where)
    result = run_demo(cfg, jobs=args.jobs)
    return 1 if result["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
