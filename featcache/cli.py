"""The ``featcache`` command line: a thin click group over the library.

Options mirror config keys (``--batch-size`` sets ``batch_size``); ``--config FILE.yaml`` supplies defaults
that explicit options override. Each command only parses, builds a config and calls one library function.
"""
from __future__ import annotations

import json
import sys
from typing import Any

import click

from . import __version__


def parse_int_list(value: str | None) -> list[int] | None:
    """'0,1,11' -> [0, 1, 11]."""
    if value is None or isinstance(value, list):
        return value
    try:
        return [int(v) for v in str(value).split(",") if v.strip()]
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers like 0,1,11, got {value!r}") from None


def json_option(values: dict[str, Any], key: str) -> dict[str, Any]:
    """A JSON-object option (``--teacher-kwargs '{"depth": 4}'``) as a dict; bad JSON names the option."""
    raw = values.pop(key, None)
    if not isinstance(raw, str):
        return raw or {}
    try:
        parsed = json.loads(raw)
    except json.JSONDecodeError as err:
        raise click.BadParameter(f"{raw!r} is not JSON ({err}); write e.g. '{{\"depth\": 4}}'",
                                 param_hint=f"--{key.replace('_', '-')}") from None
    if not isinstance(parsed, dict):
        raise click.BadParameter(f"expected a JSON object, got {raw!r}", param_hint=f"--{key.replace('_', '-')}")
    return parsed


def merge_config(config_path: str | None, cli_values: dict[str, Any], ctx: click.Context) -> dict[str, Any]:
    """YAML defaults overridden by the options the user typed (not click's own defaults)."""
    from .config import load_yaml

    values = load_yaml(config_path) if config_path else {}
    for key, value in cli_values.items():
        source = ctx.get_parameter_source(key)
        if key in values and source is not None and source.name == "DEFAULT":
            continue
        values[key] = value
    return values


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(__version__, prog_name="featcache")
def main() -> None:
    """featcache: run frozen timm teachers once (extract), distil many students from the cache (train, sweep)."""


# ----------------------------------------------------------------------------------------------------------------
# Stage 1: teachers, extract, info, verify
# ----------------------------------------------------------------------------------------------------------------

def _stage1_errors() -> tuple[type[Exception], ...]:
    from .sources import ImageDecodeError
    from .errors import CacheError

    return (CacheError, ImageDecodeError, ValueError, FileNotFoundError)


@main.command()
@click.option("--pattern", default=None, help="Also list timm models with pretrained weights matching this glob, "
              "e.g. 'deit3_*' (any timm name works as --teacher).")
def teachers(pattern: str | None) -> None:
    """List the teacher aliases (and, with --pattern, matching timm models)."""
    from .teachers import TEACHER_ALIASES

    width = max(len(a) for a in TEACHER_ALIASES)
    for alias, full in TEACHER_ALIASES.items():
        click.echo(f"{alias:<{width}}  {full}")
    if pattern:
        import timm

        for name in timm.list_models(pattern, pretrained=True):
            click.echo(name)


@main.command()
@click.option("--config", "config_path", type=click.Path(exists=True, dir_okay=False), default=None,
              help="YAML file of extract options (keys as below, with _); explicit options override it.")
@click.option("--data", default=None, help="Images: an ImageFolder tree (root/<class>/<image>) or WebDataset shards.")
@click.option("--out", default=None, help="The cache to write (a Zarr directory for --format zarr).")
@click.option("--teacher", default="deit3_small", show_default=True,
              help="Alias (see `featcache teachers`) or any timm model name[.tag].")
@click.option("--pretrained/--no-pretrained", default=True, show_default=True,
              help="Load timm's pretrained weights (offline hub cache works); --no-pretrained: seeded random init.")
@click.option("--checkpoint", default=None, help="Local .safetensors or torch state dict (loaded weights_only).")
@click.option("--img-size", type=int, default=None, help="Input side in pixels [the teacher's pretrained size].")
@click.option("--num-classes", type=int, default=None, help="Override the teacher's classifier size.")
@click.option("--teacher-kwargs", default=None, help='Extra timm.create_model kwargs as JSON, e.g. \'{"depth": 4}\'.')
@click.option("--layers", default="0,1,-1", show_default=True, help="Teacher blocks to cache (negative: from the end).")
@click.option("--data-format", type=click.Choice(["folder", "wds"]), default=None, help="Source kind [detect].")
@click.option("--shots", type=int, default=None, help="Images per class (seeded subset) [all].")
@click.option("--fraction", type=float, default=None, help="Fraction of each class instead of --shots.")
@click.option("--subset-seed", type=int, default=0, show_default=True, help="Seed of the subset draw.")
@click.option("--views", type=int, default=4, show_default=True, help="Augmented views per image (K).")
@click.option("--seed", type=int, default=0, show_default=True, help="View seed: view = f(seed, sample, view).")
@click.option("--scale", type=(float, float), default=(0.08, 1.0), show_default=True, help="RandomResizedCrop scale.")
@click.option("--ratio", type=(float, float), default=(3 / 4, 4 / 3), show_default=True, help="Crop aspect ratios.")
@click.option("--hflip", type=float, default=0.5, show_default=True, help="Horizontal flip probability.")
@click.option("--color-jitter", type=float, default=0.0, show_default=True, help="ColorJitter strength (0: off).")
@click.option("--format", "format", type=click.Choice(["zarr", "wds", "hdf5"]), default="zarr", show_default=True,
              help="Store backend.")
@click.option("--dtype", type=click.Choice(["fp32", "fp16", "bf16"]), default="fp16", show_default=True,
              help="Stored float type of the features and logits.")
@click.option("--codec", default="none", show_default=True, help="Target codec (see docs/FORMAT.md).")
@click.option("--topk", type=int, default=None, help="Keep only the top-k logits per view (codec-dependent).")
@click.option("--shard-size", type=int, default=256, show_default=True,
              help="Views per shard = per resumable unit = per teacher forward pass.")
@click.option("--batch-size", type=int, default=64, show_default=True, help="Views per loader batch.")
@click.option("--workers", type=int, default=2, show_default=True, help="DataLoader worker processes.")
@click.option("--device", default="auto", show_default=True, help="auto (cuda if available), cpu, cuda, cuda:1 ...")
@click.option("--overwrite", is_flag=True, help="Delete an existing cache at --out and start afresh.")
@click.option("--skip-corrupt", is_flag=True, help="Skip unreadable images (zeros, valid=0, listed in the manifest) "
              "instead of stopping with the file named.")
@click.pass_context
def extract(ctx: click.Context, config_path: str | None, **options: Any) -> None:
    """Run a frozen teacher once over K views of every image and cache its features and logits.

    Resumable: re-running the same command continues where it stopped and a complete cache is left as it is;
    different arguments against an existing cache are refused with the differing keys named.
    """

    from .config import ExtractConfig, from_dict
    from .extract import run_extract

    values = merge_config(config_path, options, ctx)
    values["layers"] = parse_int_list(values.get("layers"))
    values["teacher_kwargs"] = json_option(values, "teacher_kwargs")
    try:
        path = run_extract(from_dict(ExtractConfig, values))
    except _stage1_errors() as err:
        raise click.ClickException(str(err)) from None
    click.echo(f"cache: {path}")


@main.command()
@click.argument("cache", type=click.Path(exists=True))
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@click.option("--measure", default=8, show_default=True,
              help="Views on which to measure lossy codecs' error (re-runs the teacher; 0: skip).")
@click.option("--data", default=None, help="Source images, if they moved since extraction (for --measure).")
def info(cache: str, as_json: bool, measure: int, data: str | None) -> None:
    """Summarise CACHE: manifest, counts, bytes on disk, ratio to raw fp32, per-target codec and measured error."""

    from .extract import cache_info, format_info

    try:
        summary = cache_info(cache, measure=measure, data_root=data)
    except _stage1_errors() as err:
        raise click.ClickException(str(err)) from None
    click.echo(json.dumps(summary, indent=1) if as_json else format_info(summary))


@main.command()
@click.argument("cache", type=click.Path(exists=True))
@click.option("--samples", type=int, default=8, show_default=True, help="Stored views to replay and recompute.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the random choice of views.")
@click.option("--device", default="auto", show_default=True, help="Device for the teacher.")
@click.option("--data", "data_root", default=None, help="Where the images live now [the root recorded in CACHE].")
def verify(cache: str, samples: int, seed: int, device: str, data_root: str | None) -> None:
    """Replay random stored views, re-run the teacher, report max abs and relative error per target.

    Exits 1 when a target's relative L2 error exceeds its tolerance (fp32 1e-4, fp16 2e-3, bf16 1e-2) or a
    replayed view's fingerprint differs from the stored one.
    """
    from .extract import format_verify, verify_cache

    try:
        result = verify_cache(cache, samples=samples, seed=seed, device=device, data_root=data_root)
    except _stage1_errors() as err:
        raise click.ClickException(str(err)) from None
    click.echo(format_verify(result))
    if not result["ok"]:
        sys.exit(1)


# ----------------------------------------------------------------------------------------------------------------
# Stores: convert
# ----------------------------------------------------------------------------------------------------------------

@main.command()
@click.argument("src", type=click.Path(exists=True))
@click.argument("dst")
@click.option("--format", "format", type=click.Choice(["zarr", "wds", "hdf5"]), required=True,
              help="Backend of DST.")
@click.option("--dtype", type=click.Choice(["fp32", "fp16", "bf16"]), default=None, help="New float type [SRC's].")
@click.option("--codec", default=None, help="New codec: none, zstd[:L], blosc-zstd[:L][:shuffle|bitshuffle], "
              "bitround:N, int8, or lossy+lossless like int8+zstd (see docs/FORMAT.md) [SRC's].")
@click.option("--topk", type=int, default=None, help="Keep only the top-k logits (0: dense again) [SRC's].")
@click.option("--shard-size", type=int, default=None, help="Views per shard/unit in DST [SRC's].")
@click.option("--overwrite", is_flag=True, help="Delete an existing DST and start afresh.")
def convert(src: str, dst: str, format: str, dtype: str | None, codec: str | None, topk: int | None,
            shard_size: int | None, overwrite: bool) -> None:
    """Rewrite cache SRC as DST in another backend and/or encoding, keeping the manifest and view records.

    Targets whose encoding is unchanged are copied byte for byte; re-encoded ones report their measured error.
    Resumable: re-running the same command continues an interrupted DST.
    """
    from .convert import convert as run_convert
    from .errors import CacheError
    from .stores.report import codec_report, format_report

    try:
        run_convert(src, dst, format, dtype=dtype, codec=codec, topk=topk, shard_size=shard_size, overwrite=overwrite)
    except (CacheError, ValueError) as err:
        raise click.ClickException(str(err)) from None
    click.echo(f"cache: {dst}\n{format_report(codec_report(dst, rerun_teacher=False))}")


# ----------------------------------------------------------------------------------------------------------------
# Stage 2: train
# ----------------------------------------------------------------------------------------------------------------

def parse_method_args(pairs: tuple[str, ...] | list[str], base: dict[str, Any] | None = None) -> dict[str, Any]:
    """``("alpha=3e-5", "nkd.temperature=2")`` -> ``{"alpha": 3e-5, "nkd": {"temperature": 2}}`` (YAML-typed values)."""
    out: dict[str, Any] = {k: (dict(v) if isinstance(v, dict) else v) for k, v in (base or {}).items()}
    for pair in pairs or ():
        key, sep, raw = str(pair).partition("=")
        if not sep or not key.strip():
            raise click.BadParameter(f"expected key=value or method.key=value, got {pair!r}", param_hint="--method-arg")
        value = _yaml_value(raw)
        name, dot, sub = key.strip().partition(".")
        if dot:
            out.setdefault(name, {})[sub] = value
        else:
            out[name] = value
    return out


def _yaml_value(raw: str) -> Any:
    """A YAML scalar/list, with ``1e-4`` read as a float (YAML 1.1 reads exponents without a dot as strings)."""
    import yaml

    value = yaml.safe_load(raw) if raw.strip() else None
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def _train_errors() -> tuple[type[Exception], ...]:
    from .compat import CompatError
    from .sources import ImageDecodeError
    from .datasets import ReplayDriftError
    from .errors import CacheError

    return (CompatError, CacheError, ImageDecodeError, ReplayDriftError, ValueError, KeyError, FileNotFoundError,
            FileExistsError)


@main.command()
@click.option("--config", "config_path", type=click.Path(exists=True, dir_okay=False), default=None,
              help="YAML file of train options (a recipe; keys as below, with _); explicit options override it.")
@click.option("--cache", default=None, help="The cache made by `featcache extract`.")
@click.option("--out", default="runs/run", show_default=True, help="Run directory (metrics, checkpoints, student).")
@click.option("--method", default="kd", show_default=True,
              help="Registered method, or several with weights: vitkd+nkd, vitkd:1+nkd:0.5.")
@click.option("--method-arg", "method_arg", multiple=True, metavar="KEY=VALUE",
              help="Method keyword argument (YAML value), repeatable; name.key=value for one part of a composite.")
@click.option("--student", default="deit_tiny", show_default=True, help="Any timm model name or alias.")
@click.option("--pretrained/--no-pretrained", default=False, show_default=True,
              help="Start the student from timm's pretrained weights (else a --seed-ed random init).")
@click.option("--student-checkpoint", default=None, help="Local .safetensors/state dict for the student's init.")
@click.option("--student-kwargs", default=None, help='Extra timm.create_model kwargs as JSON, e.g. \'{"depth": 6}\'.')
@click.option("--img-size", type=int, default=None, help="Student input size; must equal the cache's [the cache's].")
@click.option("--num-classes", type=int, default=None, help="Student classifier size [the teacher's].")
@click.option("--data", default=None, help="Where the source images live now [the root recorded in the cache].")
@click.option("--val", default=None, help="Held-out ImageFolder for top-1/top-5 after each epoch (resize + crop).")
@click.option("--epochs", type=int, default=10, show_default=True, help="Epochs over the cached samples.")
@click.option("--max-steps", type=int, default=None, help="Stop after this many optimizer steps.")
@click.option("--batch-size", type=int, default=64, show_default=True, help="Views per batch and process.")
@click.option("--grad-accum", type=int, default=1, show_default=True, help="Gradient accumulation steps.")
@click.option("--lr", type=float, default=1e-3, show_default=True, help="Peak learning rate (AdamW).")
@click.option("--lr-base-batch", type=int, default=None, help="Scale --lr by effective batch / this [no scaling].")
@click.option("--min-lr", type=float, default=1e-5, show_default=True, help="Final learning rate of the cosine.")
@click.option("--weight-decay", type=float, default=0.05, show_default=True, help="AdamW weight decay (not on 1-D).")
@click.option("--betas", type=(float, float), default=(0.9, 0.999), show_default=True, help="AdamW betas.")
@click.option("--warmup-epochs", type=float, default=0.0, show_default=True, help="Linear warmup length (per step).")
@click.option("--grad-clip", type=float, default=5.0, show_default=True, help="Max gradient norm (0: off).")
@click.option("--label-smoothing", type=float, default=0.1, show_default=True, help="Of the label cross-entropy.")
@click.option("--ce-weight", type=float, default=None, help="Label CE weight [the methods' default].")
@click.option("--label-shots", type=int, default=None, help="Keep labels for this many samples per class [all].")
@click.option("--view-policy", type=click.Choice(["cycle", "random"]), default="cycle", show_default=True,
              help="cycle: view = (epoch + per-sample offset) mod K; random: uniform per epoch and sample.")
@click.option("--fingerprint-checks", type=int, default=16, show_default=True,
              help="Replayed views per epoch checked against their stored fingerprint.")
@click.option("--online-teacher", is_flag=True, help="Compute the targets with the live teacher on the same "
              "replayed views (parity check and speed baseline) instead of reading the cache.")
@click.option("--mixed-precision", type=click.Choice(["no", "fp16", "bf16"]), default="no", show_default=True,
              help="Accelerate mixed precision.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of init, order, views and masks.")
@click.option("--workers", type=int, default=2, show_default=True, help="DataLoader worker processes.")
@click.option("--checkpoint-every", type=int, default=0, show_default=True,
              help="Checkpoint every N steps (and at each epoch end; 0: epoch ends only).")
@click.option("--resume", is_flag=True, help="Continue the run in --out from its latest checkpoint.")
@click.option("--log-every", type=int, default=10, show_default=True, help="Steps between metric records.")
@click.option("--teacher", default=None, help="Expected teacher (alias or timm name); a cache from another "
              "teacher is refused before step 0.")
@click.option("--cache-dtype", type=click.Choice(["fp32", "fp16", "bf16"]), default=None,
              help="Expected storage dtype of the cache (e.g. fp32 for parity runs).")
@click.pass_context
def train(ctx: click.Context, config_path: str | None, method_arg: tuple[str, ...], **options: Any) -> None:
    """Train a student from a cache with Accelerate (also under `accelerate launch`).

    Example: featcache train --cache C --method vitkd+nkd --student deit_tiny --img-size 32 --val VAL --out runs/a
    """

    from .config import TrainConfig, from_dict
    from .engine import train as run_train

    values = merge_config(config_path, options, ctx)
    values["method_args"] = parse_method_args(method_arg, values.get("method_args"))
    values["student_kwargs"] = json_option(values, "student_kwargs")
    if values.get("grad_clip") == 0:
        values["grad_clip"] = None
    try:
        result = run_train(from_dict(TrainConfig, values))
    except _train_errors() as err:
        raise click.ClickException(str(err)) from None
    from accelerate import PartialState

    if PartialState().is_main_process:  # under `accelerate launch`, print once
        click.echo(json.dumps(result, indent=1))


# ----------------------------------------------------------------------------------------------------------------
# Evaluation: probe
# ----------------------------------------------------------------------------------------------------------------

@main.command()
@click.option("--config", "config_path", type=click.Path(exists=True, dir_okay=False), default=None,
              help="YAML file of probe options (keys as below, with _); explicit options override it.")
@click.option("--student", default=None, help="A finished run directory (student.safetensors + student.json) or a "
              "checkpoint file (then also --model).")
@click.option("--data", default=None, help="Training split for the linear classifier (ImageFolder or image shards).")
@click.option("--val", default=None, help="Evaluation split; its classes are matched to --data's by folder name.")
@click.option("--model", default=None, help="timm name of a checkpoint file's model (a run dir records its own).")
@click.option("--model-kwargs", default=None, help='Extra timm.create_model kwargs as JSON, e.g. \'{"depth": 6}\'.')
@click.option("--img-size", type=int, default=None, help="Input side in pixels [the run's / the model's].")
@click.option("--random-init", is_flag=True, help="Probe a seeded randomly initialised model of the same shape "
              "(the baseline); results go to probe_random_init.json in a run dir.")
@click.option("--steps", type=int, default=200, show_default=True, help="L-BFGS iterations per classifier fit.")
@click.option("--batch-size", type=int, default=64, show_default=True, help="Images per feature-extraction batch.")
@click.option("--workers", type=int, default=0, show_default=True, help="DataLoader worker processes.")
@click.option("--device", default="auto", show_default=True, help="auto (cuda if available), cpu, cuda ...")
@click.option("--out", default=None, help="Result JSON [RUN_DIR/probe.json for a run dir, else only printed].")
@click.pass_context
def probe(ctx: click.Context, config_path: str | None, **options: Any) -> None:
    """Linear probing: frozen student features (final-normed CLS / pooled) -> logistic regression -> top-1.

    WeCoLoRA's evaluation protocol, usable after any method. The classifier's L2 strength is picked on a fixed
    20 % hold-out of --data, then refitted on all of it; --val is scored once.
    """

    from .config import from_dict
    from .probe import ProbeConfig, run_probe

    values = merge_config(config_path, options, ctx)
    values["model_kwargs"] = json_option(values, "model_kwargs")
    try:
        result = run_probe(from_dict(ProbeConfig, values))
    except (ValueError, FileNotFoundError) as err:
        raise click.ClickException(str(err)) from None
    click.echo(f"linear probe top-1: {result['top1']:.2f} %  (top-5 {result['top5']:.2f} %, "
               f"train {result['train_top1']:.2f} %, wd {result['weight_decay']:g}, {result['num_train']} train / "
               f"{result['num_val']} val images, {result['feature_dim']}-d features"
               f"{', random init' if result['random_init'] else ''})")
    if "written_to" in result:
        click.echo(f"written to {result['written_to']}")


# ----------------------------------------------------------------------------------------------------------------
# Sweeps: sweep, report, demo
# ----------------------------------------------------------------------------------------------------------------

@main.command()
@click.argument("spec", type=click.Path(exists=True, dir_okay=False))
@click.option("--jobs", type=click.IntRange(min=1), default=1, show_default=True,
              help="Trainings at once, each a process reading the same cache (torch threads are split).")
@click.option("--no-report", is_flag=True, help="Do not write report.md/.csv/.png at the end.")
@click.option("--fail-fast", is_flag=True, help="Stop at the first failed run (default: finish the others).")
def sweep(spec: str, jobs: int, no_report: bool, fail_fast: bool) -> None:
    """Train every run of a sweep SPEC.yaml from one cache, then write the report.

    The spec names a `cache:` (or an `extract:` section, run first unless the cache is complete), a
    `recipe:`/`base:` config, a `grid:` and/or `runs:` list and an `out:` directory. Finished runs are
    skipped and killed runs resume, so re-running a sweep only does what is left. See docs/SWEEPS.md.
    """
    from .sweep import SweepError, run_sweep

    try:
        run_sweep(spec, jobs=jobs, report=not no_report, fail_fast=fail_fast)
    except SweepError as err:
        raise click.ClickException(str(err)) from None


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
    click.echo(paths["table"])
    click.echo(f"report: {paths['md']}\ntable:  {paths['csv']}\nplot:   {paths['png']}")


@main.command()
@click.option("--out", type=click.Path(file_okay=False), default="featcache_demo", show_default=True,
              help="Working directory (digits images, teacher, cache, runs, report).")
@click.option("--quick", is_flag=True, help="A tiny version (a minute or two) that exercises every stage.")
@click.option("--jobs", type=click.IntRange(min=1), default=None,
              help="Student trainings at once, one torch thread each [the number of CPU cores, at most 4].")
def demo(out: str, quick: bool, jobs: int | None) -> None:
    """Teacher once, many students: the whole pipeline on scikit-learn's digits, no download needed.

    Trains a small ViT teacher on the digits (or reuses it), extracts its features for several views of
    every training image once, trains CE / KD / NKD / ViTKD / ViTKD+NKD / online-teacher KD / WeCoLoRA
    students from that one cache with 10 labels per class, and prints the report with a verdict computed
    from the measured numbers. 3-5 minutes on 2 CPU cores (measured 2 min 49 s and 4 min 17 s on a shared box,
    2-3x longer under heavy load). Re-running reuses the teacher, the cache and finished runs.
    """
    import os

    # Idle OpenMP threads must sleep, not spin: on a busy 2-core machine spinning threads slow torch ~10x.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from .demo import DemoConfig, run_demo

    result = run_demo(DemoConfig.quick(out) if quick else DemoConfig(out=out), jobs=jobs)
    if result["failed"]:
        raise click.ClickException(f"{len(result['failed'])} demo run(s) failed: {sorted(result['failed'])}")


if __name__ == "__main__":
    sys.exit(main())
