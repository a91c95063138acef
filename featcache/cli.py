"""The ``featcache`` command line: a thin click group over the library.

Each command parses, builds a config and calls one library function. Options come from the config fields or the
library's signatures (:mod:`featcache.options`), so each default is written once; ``--config FILE.yaml`` supplies
values that explicit options override. Only :class:`~featcache.errors.FeatcacheError` is caught (one ``Error:``
line, exit 1); any other exception is a bug and keeps its traceback.
"""
from __future__ import annotations

import json
import sys
from typing import Any

import click

from . import __version__
from .errors import FeatcacheError
from .options import CacheLocation, Command, default_option, field_choice, load_config, parse_method_args

__all__ = ["main", "parse_method_args"]

# The library objects whose fields or signatures hold the options' defaults, imported when a command is used.
EXTRACT, TRAIN, PROBE = "featcache.config:ExtractConfig", "featcache.config:TrainConfig", "featcache.config:ProbeConfig"
INFO, VERIFY = "featcache.info:cache_info", "featcache.verify:verify_cache"


class Group(click.Group):
    """The ``featcache`` group: a :class:`FeatcacheError` becomes click's one-line error, anything else propagates."""

    command_class = Command

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except FeatcacheError as err:
            raise click.ClickException(str(err)) from None


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(__version__, prog_name="featcache")
def main() -> None:
    """featcache: run frozen timm teachers once (extract), distil many students from the cache (train, sweep)."""


# Stage 1 and the cache: teachers, extract, info, verify, convert ------------------------------------------------

@main.command()
@click.option("--pattern", default=None, help="Also list timm models with pretrained weights matching this glob, "
              "e.g. 'deit3_*' (any timm name works as --teacher).")
def teachers(pattern: str | None) -> None:
    """List the teacher aliases (and, with --pattern, matching timm models)."""
    from .models import MODEL_ALIASES

    width = max(len(a) for a in MODEL_ALIASES)
    click.echo("\n".join(f"{alias:<{width}}  {full}" for alias, full in MODEL_ALIASES.items()))
    if pattern:
        import timm

        click.echo("\n".join(timm.list_models(pattern, pretrained=True)))


@main.command(config=EXTRACT)
@click.pass_context
def extract(ctx: click.Context, config_path: str | None, **options: Any) -> None:
    """Run a frozen teacher once over K views of every image and cache its features and logits.

    Resumable: re-running the same command continues where it stopped and a complete cache is left as it is;
    different arguments against an existing cache are refused with the differing keys named. Under torchrun or
    accelerate launch the processes share the units, one device each (docs/SCALING.md).
    """
    from .distributed import detect
    from .extract import run_extract

    out = run_extract(load_config(ctx, config_path, options))
    if detect().main:  # with several processes, print once
        click.echo(f"cache: {out}")


def _info_options() -> list[click.Parameter]:
    return [click.Option(["--json", "as_json"], is_flag=True, help="Print the summary as JSON."),
            default_option("--measure", INFO, "measure", type=int,
                           help="Views on which to measure lossy codecs' error (re-runs the teacher; 0: skip)."),
            click.Option(["--data", "data_root"],
                         help="Source images, if they moved since extraction (for --measure).")]


@main.command(build=_info_options)
@click.argument("cache", type=CacheLocation())
def info(cache: str, as_json: bool, **options: Any) -> None:
    """Summarise CACHE: manifest, counts, bytes on disk, ratio to raw fp32, per-target codec and measured error."""
    from .info import cache_info, format_info

    summary = cache_info(cache, **options)
    click.echo(json.dumps(summary, indent=1) if as_json else format_info(summary))


def _verify_options() -> list[click.Parameter]:
    return [default_option("--samples", VERIFY, "samples", type=int, help="Stored views to replay and recompute."),
            default_option("--seed", VERIFY, "seed", type=int, help="Seed of the random choice of views."),
            default_option("--device", VERIFY, "device", help="Device for the teacher."),
            click.Option(["--data", "data_root"], help="Where the images live now [the root recorded in CACHE]."),
            click.Option(["--checkpoint"], help="Where the teacher's checkpoint is now [the path recorded in CACHE]; "
                                                "its weights hash is still checked.")]


@main.command(build=_verify_options)
@click.argument("cache", type=CacheLocation())
def verify(cache: str, **options: Any) -> None:
    """Replay random stored views, re-run the teacher, report max abs and relative error per target.

    Exits 1 when a target's relative L2 error exceeds its tolerance (fp32 1e-4, fp16 2e-3, bf16 1e-2) or a
    replayed view's fingerprint differs from the stored one.
    """
    from .verify import format_verify, verify_cache

    result = verify_cache(cache, **options)
    click.echo(format_verify(result))
    if not result["ok"]:
        sys.exit(1)


def _convert_options() -> list[click.Parameter]:
    return [click.Option(["--format"], type=field_choice(EXTRACT, "format"), required=True, help="Backend of DST."),
            click.Option(["--dtype"], type=field_choice(EXTRACT, "dtype"), help="New float type [SRC's]."),
            click.Option(["--codec"], help="New codec: none, zstd[:L], blosc-zstd[:L][:shuffle|bitshuffle], "
                         "bitround:N, int8, pca:S, or lossy+lossless like int8+zstd (docs/FORMAT.md) [SRC's]."),
            click.Option(["--topk"], type=int, help="Keep only the top-k logits (0: dense again) [SRC's]."),
            click.Option(["--shard-size"], type=int, help="Views per shard/unit in DST [SRC's]."),
            click.Option(["--overwrite"], is_flag=True, help="Delete an existing DST and start afresh.")]


@main.command(build=_convert_options)
@click.argument("src", type=CacheLocation())
@click.argument("dst")
def convert(src: str, dst: str, format: str, **options: Any) -> None:
    """Rewrite cache SRC as DST in another backend and/or encoding, keeping the manifest and view records.

    Targets whose encoding is unchanged are copied byte for byte; re-encoded ones report their measured error.
    Resumable: re-running the same command continues an interrupted DST.
    """
    from .convert import convert as run_convert
    from .info import codec_report, format_report

    run_convert(src, dst, format, **options)
    click.echo(f"cache: {dst}\n{format_report(codec_report(dst, rerun_teacher=False))}")


# Stage 2 and evaluation: train, probe --------------------------------------------------------------------------

@main.command(config=TRAIN)
@click.pass_context
def train(ctx: click.Context, config_path: str | None, **options: Any) -> None:
    """Train a student from a cache with Accelerate (also under `accelerate launch`); --config takes a recipe.

    Example: featcache train --cache C --method vitkd+nkd --student deit_tiny --img-size 32 --val VAL --out runs/a
    """
    from accelerate import PartialState

    from .engine import train as run_train

    result = run_train(load_config(ctx, config_path, options))
    if PartialState().is_main_process:  # under `accelerate launch`, print once
        click.echo(json.dumps(result, indent=1))


@main.command(config=PROBE)
@click.pass_context
def probe(ctx: click.Context, config_path: str | None, **options: Any) -> None:
    """Linear probing: frozen student features (final-normed CLS / pooled) -> logistic regression -> top-1.

    WeCoLoRA's evaluation protocol, usable after any method. The classifier's L2 strength is picked on a fixed
    20 % hold-out of --data, then refitted on all of it; --val is scored once.
    """
    from .probe import run_probe

    r = run_probe(load_config(ctx, config_path, options))
    click.echo(f"linear probe top-1: {r['top1']:.2f} %  (top-5 {r['top5']:.2f} %, train {r['train_top1']:.2f} %, "
               f"wd {r['weight_decay']:g}, {r['num_train']} train / {r['num_val']} val images, {r['feature_dim']}-d "
               f"features{', random init' if r['random_init'] else ''})")
    if "written_to" in r:
        click.echo(f"written to {r['written_to']}")


# Sweeps: sweep, report, demo -----------------------------------------------------------------------------------

def _sweep_options() -> list[click.Parameter]:
    return [default_option("--jobs", "featcache.sweep:run_sweep", "jobs", type=click.IntRange(min=1),
                           help="Trainings at once, each a process reading the same cache (threads: from the spec)."),
            click.Option(["--no-report"], is_flag=True, help="Do not write report.md/.csv/.png at the end."),
            click.Option(["--fail-fast"], is_flag=True,
                         help="Stop at the first failed run (default: finish the others).")]


@main.command(build=_sweep_options)
@click.argument("spec", type=click.Path(exists=True, dir_okay=False))
def sweep(spec: str, jobs: int, no_report: bool, fail_fast: bool) -> None:
    """Train every run of a sweep SPEC.yaml from one cache, then write the report.

    The spec names a `cache:` (or an `extract:` section, run first unless the cache is complete), a
    `recipe:`/`base:` config, a `grid:` and/or `runs:` list and an `out:` directory. Finished runs are
    skipped and killed runs resume, so re-running a sweep only does what is left. See docs/SWEEPS.md.
    """
    from .sweep import run_sweep

    run_sweep(spec, jobs=jobs, report=not no_report, fail_fast=fail_fast)


@main.command()
@click.argument("runs_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--out", type=click.Path(file_okay=False), default=None, help="Where to write the report [RUNS_DIR].")
def report(runs_dir: str, out: str | None) -> None:
    """Tabulate and plot the runs below RUNS_DIR: report.md, report.csv and report.png.

    Columns: method, method arguments, student, final/best top-1, top-5, train time and images/s; the plot
    shows top-1 per run, the loss curves and top-1 per epoch. Unfinished runs are listed as incomplete.
    """
    from .report import write_report

    paths = write_report(runs_dir, out=out)
    click.echo(f"{paths['table']}\nreport: {paths['md']}\ntable:  {paths['csv']}\nplot:   {paths['png']}")


def _demo_options() -> list[click.Parameter]:
    return [click.Option(["--out"], type=click.Path(file_okay=False),
                         help="Working directory (digits images, teacher, cache, runs, report) [featcache_demo; "
                              "featcache_demo_quick with --quick, so a quick run never replaces a full one's]."),
            default_option("--seeds", "featcache.demo:DemoConfig", "seeds", type=click.IntRange(min=1),
                           help="Student runs per method (seeds 0..N-1): the table reports the mean and the range "
                                "over them, and a gap counts only when it exceeds the range."),
            click.Option(["--quick"], is_flag=True,
                         help="A tiny version (a minute or two) that exercises every stage."),
            click.Option(["--jobs"], type=click.IntRange(min=1),
                         help="Student trainings at once, one torch thread each [the number of CPU cores, at most 4]."),
            ]


@main.command(build=_demo_options)
def demo(out: str | None, seeds: int, quick: bool, jobs: int | None) -> None:
    """Teacher once, many students: the whole pipeline on scikit-learn's digits, no download needed.

    Trains a small ViT teacher on the digits (or reuses it), extracts its features for several views of every
    training image once, trains students 5x cheaper than the teacher from that one cache with 5 labels per class
    (a labelled-only CE baseline with as many steps, KD, NKD, ViTKD, ViTKD+NKD, WeCoLoRA, and KD with the teacher
    online on fresh views every epoch), times KD from the cache against KD with the teacher online, and prints the
    report with a verdict computed from the measured numbers. About 5 minutes on 2 idle CPU cores (520
    CPU-seconds; BENCHMARKS.md). Re-running reuses the teacher, the cache, finished runs and the timing.
    """
    import os

    # Idle OpenMP threads must sleep, not spin: on a busy 2-core machine spinning threads slow torch ~10x.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from .demo import DemoConfig, run_demo

    where = {"out": out} if out else {}  # each config's own default directory
    result = run_demo(DemoConfig.quick(seeds=seeds, **where) if quick else DemoConfig(seeds=seeds, **where), jobs=jobs)
    if result["failed"]:
        raise click.ClickException(f"{len(result['failed'])} demo run(s) failed: {sorted(result['failed'])}")


if __name__ == "__main__":
    sys.exit(main())
