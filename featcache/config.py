"""Configs for extraction, training and probing: each default, help text and validation written once; YAML round-trip.

Config flows one way: recipe YAML + CLI overrides (options the user typed win) -> dataclass -> ``validate()`` ->
saved ``config.yaml``. Every field is declared with :func:`setting`, which keeps the default next to the help text
and the hints the command line needs (the pattern of Accelerate's ``utils/dataclasses.py``, whose fields carry
``metadata={"help": ...}``); :mod:`featcache.cli` builds its options from these fields, so no default is written a
second time. CLI option names are the field names with ``_`` -> ``-`` (``--batch-size`` sets ``batch_size``).

Choices that a registry owns (store formats, dtypes, data formats, view policies, methods) are stored as a
``"module:NAME"`` reference and resolved by the CLI when it builds the option: this module sits at the bottom of
the package's layers and must stay cheap to import, so it imports no registry.
"""
from __future__ import annotations

import copy
import dataclasses
import functools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, TypeVar

import yaml

from .errors import ConfigError, MissingFileError

C = TypeVar("C")


def setting(default: Any, help: str, **cli: Any) -> Any:
    """A config field holding its one default and the help text and hints its CLI option is built from.

    Args:
        default: the default; a list or dict is deep-copied for every instance.
        help: the option's help text; ``[...]`` at the end says what the default (often ``None``) means.
        **cli: hints read by :mod:`featcache.cli`. ``choices``: a tuple, or ``"module:NAME"`` naming a registry,
            sequence or mapping whose names are the allowed values. ``listed``: the same form, names shown in the
            help but not enforced (``--method`` also takes composites). ``toggle``: a ``--x/--no-x`` pair for a
            bool that defaults to False (a bool defaulting to True is always a pair). ``option``, ``multiple``,
            ``metavar``: a differently named, repeatable option. ``none_if``: the option value that means None
            (``--grad-clip 0``). ``cli=False``: no option (library-only). ``refused``: an option that ``validate``
            refuses when given (train-time view flags).

    Returns:
        A :func:`dataclasses.field`.
    """
    metadata = {"help": help, **cli}
    if isinstance(default, (list, dict)):
        return field(default_factory=functools.partial(copy.deepcopy, default), metadata=metadata)
    return field(default=default, metadata=metadata)


STORE_FORMATS = "featcache.stores:WRITERS"
FLOAT_DTYPES = "featcache.stores.precision:DTYPES"


@dataclass
class ExtractConfig:
    """Stage 1: which teacher, which data, which views, where and how to store."""

    data: str = setting("", "Images: an ImageFolder tree (root/<class>/<image>), WebDataset shards (a directory, a "
                            "brace pattern, or URLs: pipe:CMD, http(s)://, s3://, gs://), or a Hugging Face dataset "
                            "(a save_to_disk directory, parquet files).")
    out: str = setting("", "The cache to write (a Zarr directory for --format zarr).")
    teacher: str = setting("deit3_small", "Alias (see `featcache teachers`) or any timm model name[.tag].")
    pretrained: bool = setting(True, "Load timm's pretrained weights (offline hub cache works); --no-pretrained: "
                                     "seeded random init.")
    checkpoint: str | None = setting(None, "Local .safetensors or torch state dict (loaded weights_only).")
    img_size: int | None = setting(None, "Input side in pixels [the teacher's pretrained size].")
    num_classes: int | None = setting(None, "Override the teacher's classifier size.")
    # Recorded in the manifest, so a cache names the exact architecture it came from.
    teacher_kwargs: dict[str, Any] = setting({}, 'Extra timm.create_model kwargs as JSON, e.g. \'{"depth": 4}\'.')
    layers: list[int] = setting([0, 1, -1], "Teacher blocks to cache (negative: from the end).")
    data_format: str | None = setting(None, "Source kind [detect].", choices="featcache.sources:KINDS")
    data_image_column: str = setting("image", "Image column of a Hugging Face dataset (an Image feature or bytes).")
    data_label_column: str = setting("label", "Label column of a Hugging Face dataset (ClassLabel or integers).")
    data_stage_dir: str | None = setting(None, "Local directory that shards named by URL are copied to before "
                                               "extraction [<--out>.shards beside a local cache].")
    shots: int | None = setting(None, "Images per class (seeded subset) [all].")
    fraction: float | None = setting(None, "Fraction of each class instead of --shots.")
    subset_seed: int = setting(0, "Seed of the subset draw.")
    views: int = setting(4, "Augmented views per image (K).")
    seed: int = setting(0, "View seed: view = f(seed, sample, view).")
    scale: tuple[float, float] = setting((0.08, 1.0), "RandomResizedCrop scale.")  # DeiT's default area range
    ratio: tuple[float, float] = setting((3 / 4, 4 / 3), "Crop aspect ratios.")
    hflip: float = setting(0.5, "Horizontal flip probability.")
    color_jitter: float = setting(0.0, "ColorJitter strength (0: off; not with --aa, which replaces it as in timm).")
    # timm's training-augmentation vocabulary (timm train.py); these define the cached views, see docs/FORMAT.md.
    aa: str | None = setting(None, "RandAugment policy in timm's vocabulary, e.g. rand-m9-mstd0.5-inc1 (DeiT, ViTKD, "
                                   "NKD, ScaleKD) [off].")
    reprob: float = setting(0.0, "Random erasing probability (DeiT: 0.25; 0: off).")
    remode: str = setting("pixel", "Random erasing fill: pixel (per-pixel noise), rand (per channel), const (the "
                                   "mean).", choices="featcache.views.erasing:ERASE_MODES")
    mixup: float = setting(0.0, "Mixup alpha (DeiT: 0.8; 0: off); each stored view is then a mix of two views.")
    cutmix: float = setting(0.0, "CutMix alpha (DeiT: 1.0; 0: off).")
    mixup_prob: float = setting(1.0, "Probability that a view is mixed, with --mixup or --cutmix.")
    mixup_switch_prob: float = setting(0.5, "Probability of CutMix instead of Mixup when both are on.")
    format: str = setting("zarr", "Store backend.", choices=STORE_FORMATS)
    dtype: str = setting("fp16", "Stored float type of the features and logits.", choices=FLOAT_DTYPES)
    codec: str = setting("none", "Target codec (see docs/FORMAT.md).")
    topk: int | None = setting(None, "Keep only the top-k logits per view (codec-dependent).")
    shard_size: int = setting(256, "Views per shard = per resumable unit = per teacher forward pass.")
    batch_size: int = setting(64, "Views per loader batch.")
    workers: int = setting(2, "DataLoader worker processes.")
    device: str = setting("auto", "auto (cuda if available), cpu, cuda, cuda:1 ...")
    autocast: str = setting("none", "Teacher compute: none (exact fp32, the reproducible mode) or bf16 autocast "
                                    "(faster on GPUs; targets move by ~bf16 rounding, see docs/FORMAT.md).",
                            choices=("none", "bf16"))
    overwrite: bool = setting(False, "Delete an existing cache at --out and start afresh.")
    skip_corrupt: bool = setting(False, "Skip unreadable images (zeros, valid=0, listed in the manifest) instead of "
                                        "stopping with the file named.")
    dist_timeout: float = setting(1800.0, "Seconds the processes of a multi-process extraction (torchrun, accelerate "
                                          "launch) wait for each other: for rank 0 to open the cache, and for the "
                                          "slowest to finish its units; then they stop with an error.")

    def validate(self) -> None:
        """Refuse settings no extraction can run with, before any model is loaded."""
        if not self.data or not self.out:
            raise ConfigError("extract needs --data DIR (images) and --out PATH (the cache)")
        from .storage import ensure_writable, location  # not at import: `featcache --help` stays light

        ensure_writable(location(self.out, "--out"))  # an unknown scheme fails here, before anything is written
        if self.shots is not None and self.fraction is not None:
            raise ConfigError("give --shots or --fraction, not both")
        if self.views < 1:
            raise ConfigError(f"--views must be >= 1, got {self.views}")
        if not self.layers:
            raise ConfigError("--layers must name at least one teacher block, e.g. --layers 0,1,11")
        if not self.dist_timeout > 0:
            raise ConfigError(f"--dist-timeout must be > 0 seconds, got {self.dist_timeout}")


#: Why ``featcache train`` refuses the view flags of ``featcache extract`` (see :meth:`TrainConfig.validate`).
VIEWS_ARE_CACHED = ("the cached teacher targets are for the views recorded at extraction, so a different train-time "
                    "augmentation would feed the student inputs the teacher never saw")


def refused() -> Any:
    """A train-time field named like a view flag of ``extract``, refused by ``validate`` with the reason if given."""
    return setting(None, "Refused: views are fixed at extraction; pass it to `featcache extract`.", refused=True)


@dataclass
class TrainConfig:
    """Stage 2: one student trained from one cache with one (composite) method."""

    cache: str = setting("", "The cache made by `featcache extract`.")
    out: str = setting("runs/run", "Run directory (metrics, checkpoints, student).")
    method: str = setting("kd", "Registered method, or several with weights: vitkd+nkd, vitkd:1+nkd:0.5.",
                          listed="featcache.methods:METHODS")
    # {"alpha": 3e-5}, or per part of a composite {"vitkd": {...}, "nkd": {...}}
    method_args: dict[str, Any] = setting({}, "Method keyword argument (YAML value), repeatable; name.key=value for "
                                              "one part of a composite.", option="method_arg", multiple=True,
                                          metavar="KEY=VALUE")
    student: str = setting("deit_tiny", "Any timm model name or alias.")
    pretrained: bool = setting(False, "Start the student from timm's pretrained weights (else a --seed-ed random "
                                      "init).", toggle=True)
    student_checkpoint: str | None = setting(None, "Local .safetensors/state dict for the student's init.")
    student_kwargs: dict[str, Any] = setting({}, 'Extra timm.create_model kwargs as JSON, e.g. \'{"depth": 6}\'.')
    img_size: int | None = setting(None, "Student input size; must equal the cache's [the cache's].")
    num_classes: int | None = setting(None, "Student classifier size [the teacher's].")
    data: str | None = setting(None, "Where the source images live now [the root recorded in the cache]; for shards "
                                     "staged from URLs, the URL spec again stages them anew (checked by SHA-256).")
    val: str | None = setting(None, "Held-out ImageFolder for top-1/top-5 after each epoch (resize + centre crop by "
                                    "the student's timm data config: crop_pct, interpolation, mean/std).")
    epochs: int = setting(10, "Epochs over the cached samples.")
    max_steps: int | None = setting(None, "Stop after this many optimizer steps.")
    batch_size: int = setting(64, "Views per batch and process.")
    grad_accum: int = setting(1, "Gradient accumulation steps.")
    opt: str = setting("adamw", "Optimizer: any name of timm.optim.list_optimizers() (adamw, sgd, lamb, lion, ...), "
                                "built by timm.optim.create_optimizer_v2.")
    opt_kwargs: dict[str, Any] = setting({}, 'Extra create_optimizer_v2 kwargs as JSON, e.g. \'{"momentum": 0.9, '
                                             '"eps": 1e-6}\'.')
    lr: float = setting(1e-3, "Peak learning rate.")
    # lr is scaled by batch_size * grad_accum * processes / lr_base_batch (the linear scaling rule). The labelled
    # items of --labelled-batch are left out: the label loss is a mean over them, and the schedule counts epochs of
    # --batch-size.
    lr_base_batch: int | None = setting(None, "Scale --lr by effective batch (--batch-size x --grad-accum x "
                                              "processes; --labelled-batch items not counted) / this [no scaling].")
    sched: str = setting("cosine", "Learning-rate schedule of timm.scheduler.create_scheduler_v2, stepped per "
                                   "optimizer step.", choices="featcache.build:SCHEDULES")
    sched_kwargs: dict[str, Any] = setting({}, 'Extra create_scheduler_v2 kwargs as JSON, epoch counts in epochs, '
                                               'e.g. \'{"decay_epochs": 2, "decay_rate": 0.5}\'.')
    min_lr: float = setting(1e-5, "Final learning rate of the cosine (and the other decaying schedules).")
    weight_decay: float = setting(0.05, "Weight decay (not on 1-D parameters nor the student's no_weight_decay()).")
    betas: tuple[float, float] = setting((0.9, 0.999), "Betas of Adam-like optimizers (ignored by the others).")
    warmup_epochs: float = setting(0.0, "Linear warmup length (per step).")
    model_ema: bool = setting(False, "Keep timm's ModelEmaV3 of the student: evaluated after each epoch and exported "
                                     "as student_ema/.", toggle=True)
    model_ema_decay: float = setting(0.9998, "EMA decay per optimizer step.")
    model_ema_warmup: bool = setting(False, "Ramp the EMA decay up over the first steps (timm's use_warmup).",
                                     toggle=True)
    grad_clip: float | None = setting(5.0, "Max gradient norm (0: off).", none_if=0)
    label_smoothing: float = setting(0.1, "Of the label cross-entropy.")
    ce_weight: float | None = setting(None, "Label CE weight [the methods' default].")  # label-free methods: 0
    label_shots: int | None = setting(None, "Keep labels for this many samples per class [all].")
    # A supervised baseline over all samples gets gradient from its few labelled ones only: this gives it as many
    # labelled steps as a distilled run gets steps, so the comparison is one of targets, not of optimisation.
    labelled_only: bool = setting(False, "Train on the labelled samples only (--label-shots), drawn again and again "
                                         "so an epoch has as many items (and steps) as one over every cached sample; "
                                         "each pass over them takes the next view.")
    # With a few labels per class, a batch over all samples holds about one labelled item: the label loss learns
    # from each label once per epoch. FixMatch's remedy (a labelled batch in every step), for any method.
    labelled_batch: int = setting(0, "Add this many labelled items (--label-shots) to every batch, drawn pass by "
                                     "pass over the labelled samples, each pass shuffled (FixMatch's labelled "
                                     "batch); the steps per epoch stay those of --batch-size (0: off).")
    view_policy: str = setting("cycle", "cycle: view = (epoch + per-sample offset) mod K; random: uniform per epoch "
                                        "and sample.", choices="featcache.datasets:VIEW_POLICIES")
    max_views: int | None = setting(None, "Use only the first K stored views of each sample: the views a K-view "
                                          "extraction writes (views are f(seed, sample, view)) [all].")
    keep_decoded: bool = setting(False, "Keep every decoded source image in memory after its first load: later "
                                        "epochs only replay the views. Needs --workers 0 (loader workers start afresh "
                                        "each epoch). For image sets that fit in memory decoded, where decoding "
                                        "dominates a small model's step.")
    fingerprint_checks: int | None = setting(None, "Check only a seeded sample of this many replayed views per "
                                                   "epoch against their stored fingerprint (0: none) [every view].")
    online_teacher: bool = setting(False, "Compute the targets with the live teacher on the same replayed views "
                                          "(parity check and speed baseline) instead of reading the cache.")
    fresh_views: bool = setting(False, "With --online-teacher: draw new views every epoch from (seed, epoch, sample) "
                                       "with the cache's recipe, mixes included (true online distillation).")
    stream: bool | None = setting(None, "Read a wds cache as a stream of whole shards, split over processes x "
                                        "loader workers (docs/TRAIN.md) [on for a wds cache on object storage, "
                                        "else off].", toggle=True)
    decode: str = setting("auto", "Where cached targets are decoded: workers (numpy, in the loader workers), device "
                                  "(the stored bytes cross to the device, pinned and without blocking, and are decoded "
                                  "there: half the bytes for fp16, an eighth for pca), auto: device on CUDA.",
                          choices="featcache.datasets:DECODE_CHOICES")
    # Accelerate's own list also has fp8, which needs hardware and kernels featcache does not test.
    mixed_precision: str | None = setting(None, "Accelerate mixed precision [Accelerate's: `accelerate launch "
                                                "--mixed_precision` or its config file, else no].",
                                          choices=("no", "fp16", "bf16"))
    seed: int = setting(0, "Seed of init, order, views and masks.")
    workers: int = setting(2, "DataLoader worker processes.")
    checkpoint_every: int = setting(0, "Checkpoint every N steps (and at each epoch end; 0: epoch ends only).")
    resume: bool = setting(False, "Continue the run in --out from its latest checkpoint.")
    log_every: int = setting(10, "Steps between metric records and console log lines.")
    quiet: bool = setting(False, "No console output but the result (train.log in --out is still written).")
    # Accelerate's log_with: any accelerate.utils.LoggerType name; checked (and installed?) when the run starts.
    report_to: str = setting("tensorboard", "Trackers, comma-separated, as Accelerate's log_with takes them: "
                                            "tensorboard, wandb, mlflow, comet_ml, aim, ...; all (every installed "
                                            "one); none.")
    tracker_project: str = setting("featcache", "Project the trackers log the run under (it is named after --out).")
    teacher: str | None = setting(None, "Expected teacher (alias or timm name); a cache from another teacher is "
                                        "refused before step 0.")
    cache_dtype: str | None = setting(None, "Expected storage dtype of the cache (e.g. fp32 for parity runs).",
                                      choices=FLOAT_DTYPES)
    scale: tuple[float, float] | None = refused()
    ratio: tuple[float, float] | None = refused()
    hflip: float | None = refused()
    color_jitter: float | None = refused()
    aa: str | None = refused()
    reprob: float | None = refused()
    remode: str | None = refused()
    mixup: float | None = refused()
    cutmix: float | None = refused()
    mixup_prob: float | None = refused()
    mixup_switch_prob: float | None = refused()

    def validate(self) -> None:
        """Refuse settings no training can run with, before the cache or any model is opened.

        Choice fields are checked where their registry lives (the CLI checks them on entry, the dataset again), so
        that this module imports no registry.
        """
        if not self.cache:
            raise ConfigError("train needs --cache PATH (made by `featcache extract`)")
        from .storage import location, require_local

        location(self.cache, "--cache")
        require_local(location(self.out, "--out"), "the run directory (--out)")
        if self.epochs < 1:  # --max-steps only cuts a run short; the epochs still bound the schedule
            raise ConfigError(f"--epochs must be >= 1, got {self.epochs}")
        given = [f"--{f.name.replace('_', '-')} {_option_text(getattr(self, f.name))}" for f in dataclasses.fields(self)
                 if "refused" in f.metadata and getattr(self, f.name) is not None]
        if given:
            raise ConfigError(f"train does not take {', '.join(given)}: {VIEWS_ARE_CACHED}. Extract a cache with "
                              f"those views instead (`featcache extract {' '.join(given)} ...`); --online-teacher "
                              "--fresh-views draws new views with the cache's recipe")
        if self.max_views is not None and self.max_views < 1:
            raise ConfigError(f"--max-views must be >= 1, got {self.max_views}")
        if self.keep_decoded and self.workers > 0:
            raise ConfigError(f"--keep-decoded needs --workers 0 (got {self.workers}): DataLoader workers start afresh "
                              "every epoch, so what they decoded is gone by the next one; drop --keep-decoded, or "
                              "pass --workers 0")
        if self.labelled_only and self.label_shots is None:
            raise ConfigError("--labelled-only needs --label-shots N: without it every sample is labelled, so there is "
                              "nothing to leave out (drop --labelled-only)")
        if self.labelled_batch < 0:
            raise ConfigError(f"--labelled-batch must be >= 0 (0: off), got {self.labelled_batch}")
        if self.labelled_batch and (self.label_shots is None or self.labelled_only):
            why = ("every batch holds only labelled items already" if self.labelled_only else
                   "without --label-shots every sample is labelled, so every batch is labelled already")
            raise ConfigError(f"--labelled-batch {self.labelled_batch}: {why}; drop --labelled-batch")
        if self.fresh_views and not self.online_teacher:
            raise ConfigError("--fresh-views needs --online-teacher: the cache holds targets only for its stored "
                              "views, so new views need the teacher to run on them")


def _option_text(value: Any) -> str:
    """A value as it is typed on the command line (``(0.5, 1.0)`` -> ``0.5 1.0``)."""
    return " ".join(map(str, value)) if isinstance(value, (tuple, list)) else str(value)


#: L2 strengths the linear probe tries on the held-out part of the training features.
WEIGHT_DECAYS = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2)


@dataclass
class ProbeConfig:
    """What to probe and on which data (CLI: ``featcache probe``; :func:`featcache.probe.run_probe`)."""

    student: str = setting("", "A finished run directory (student.safetensors + student.json) or a checkpoint file "
                               "(then also --model).")
    data: str = setting("", "Training split for the linear classifier (ImageFolder or image shards).")
    val: str = setting("", "Evaluation split; its classes are matched to --data's by folder name.")
    model: str | None = setting(None, "timm name of a checkpoint file's model (a run dir records its own).")
    model_kwargs: dict[str, Any] = setting({}, 'Extra timm.create_model kwargs as JSON, e.g. \'{"depth": 6}\'.')
    img_size: int | None = setting(None, "Input side in pixels [the run's / the model's].")
    random_init: bool = setting(False, "Probe a seeded randomly initialised model of the same shape (the baseline); "
                                       "results go to probe_random_init.json in a run dir.")
    weight_decays: tuple[float, ...] = setting(WEIGHT_DECAYS, "L2 strengths tried on the hold-out.", cli=False)
    steps: int = setting(200, "L-BFGS iterations per classifier fit.")
    batch_size: int = setting(64, "Images per feature-extraction batch.")
    workers: int = setting(0, "DataLoader worker processes.")
    device: str = setting("auto", "auto (cuda if available), cpu, cuda ...")
    out: str | None = setting(None, "Result JSON [RUN_DIR/probe.json for a run dir, else only printed].")

    def validate(self) -> None:
        """Refuse a probe without its three inputs, or of a student path that does not exist."""
        if not self.student or not self.data or not self.val:
            raise ConfigError("probe needs --student RUN_DIR_OR_CHECKPOINT, --data TRAIN_SPLIT and --val VAL_SPLIT")
        if not Path(self.student).exists():
            raise MissingFileError(f"--student {self.student!r} is neither a run directory nor a checkpoint file")


def from_dict(cls: type[C], values: Mapping[str, Any]) -> C:
    """Build a config dataclass from a mapping, naming unknown keys and listing the known ones."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ConfigError(f"unknown {cls.__name__} keys {unknown}; known keys: {sorted(names)}")
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name in values:
            v = values[f.name]
            # YAML has no tuples: a list read back for a tuple field becomes the tuple the dataclass declares.
            kwargs[f.name] = tuple(v) if isinstance(f.default, tuple) and v is not None else v
    return cls(**kwargs)


def from_options(cls: type[C], values: Mapping[str, Any]) -> C:
    """Build ``cls`` from option values as typed (or as a YAML file gives them), then :func:`from_dict`.

    Text becomes the field's value here: ``0,1,11`` an int list, ``'{"depth": 4}'`` a dict, repeated ``KEY=VALUE``
    pairs the ``method_args`` dict; a field's ``none_if`` value (``--grad-clip 0``) becomes None.
    """
    values = dict(values)
    for f in dataclasses.fields(cls):
        _coerce(f, values)
    return from_dict(cls, values)


def _coerce(f: dataclasses.Field, values: dict[str, Any]) -> None:
    """Turn the option text of field ``f`` in ``values`` into its config value, in place."""
    meta, value = f.metadata, values.get(f.name)
    default = f.default if f.default_factory is dataclasses.MISSING else f.default_factory()
    if "option" in meta:
        values[f.name] = parse_pairs(values.pop(meta["option"], ()), value)
    elif isinstance(default, dict) and f.name in values:
        values[f.name] = parse_json_object(value, f.name)
    elif isinstance(default, list) and isinstance(value, str):
        values[f.name] = parse_int_list(value, f.name)
    if "none_if" in meta and values.get(f.name) == meta["none_if"]:
        values[f.name] = None


def _option(key: str) -> str:
    return "--" + key.replace("_", "-")


def parse_int_list(text: str, key: str = "layers") -> list[int]:
    """``'0,1,11'`` -> ``[0, 1, 11]``."""
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"{_option(key)}: expected comma-separated integers like 0,1,11, got {text!r}") from None


def parse_json_object(raw: Any, key: str) -> dict[str, Any]:
    """A JSON-object option (``--teacher-kwargs '{"depth": 4}'``) as a dict; a dict (from YAML) passes through."""
    if not isinstance(raw, str):
        return raw or {}
    try:
        parsed = json.loads(raw)
    except json.JSONDecodeError as err:
        raise ConfigError(f"{_option(key)}: {raw!r} is not JSON ({err}); write e.g. '{{\"depth\": 4}}'") from None
    if not isinstance(parsed, dict):
        raise ConfigError(f"{_option(key)}: expected a JSON object like '{{\"depth\": 4}}', got {raw!r}")
    return parsed


def parse_pairs(pairs: Iterable[str], base: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """``("alpha=3e-5", "nkd.temperature=2")`` -> ``{"alpha": 3e-5, "nkd": {"temperature": 2}}`` over ``base``.

    Values are read as YAML, so ``[0, 1]`` is a list and ``true`` a bool; ``name.key`` sets one part of a composite.
    """
    out: dict[str, Any] = {k: (dict(v) if isinstance(v, dict) else v) for k, v in (base or {}).items()}
    for pair in pairs or ():
        key, sep, raw = str(pair).partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--method-arg: expected key=value or method.key=value, got {pair!r}")
        name, dot, sub = key.strip().partition(".")
        if dot:
            out.setdefault(name, {})[sub] = yaml_value(raw)
        else:
            out[name] = yaml_value(raw)
    return out


def yaml_value(raw: str) -> Any:
    """A YAML scalar/list, with ``1e-4`` read as a float (YAML 1.1 reads exponents without a dot as strings)."""
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as err:
        raise ConfigError(f"--method-arg: {raw!r} is not a YAML value ({err}); write e.g. 3e-5, [0, 1] or true"
                          ) from None
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping with the safe loader (no tags that run code).

    Raises:
        MissingFileError: the file does not exist.
        ConfigError: the file is not YAML the safe loader accepts, or not a mapping at the top level.
    """
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise MissingFileError(f"config file {str(path)!r} does not exist; check the path") from None
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as err:  # its text spans lines (a snippet and a caret): keep the problem and where
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err).strip().splitlines()[0]
        raise ConfigError(f"{path}{where}: not a plain YAML file ({problem}); configs are data: keys and values "
                          "only, no !!python tags") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a YAML mapping at the top level (key: value lines), got "
                          f"{type(data).__name__}")
    return data


def to_dict(config: Any) -> dict[str, Any]:
    """Plain, YAML-safe dict of a config dataclass (tuples become lists)."""
    return {k: _plain(v) for k, v in dataclasses.asdict(config).items()}


def _plain(value: Any) -> Any:
    """``value`` with tuples turned into lists, recursively: the safe dumper refuses Python tuples."""
    if isinstance(value, (tuple, list)):
        return [_plain(x) for x in value]
    if isinstance(value, dict):
        return {k: _plain(x) for k, x in value.items()}
    return value


def save_yaml(config: Any, path: str | Path) -> None:
    """Write ``config`` as the YAML that :func:`load_yaml` + :func:`from_dict` read back to an equal config."""
    Path(path).write_text(yaml.safe_dump(to_dict(config), sort_keys=False))


__all__ = ["ExtractConfig", "TrainConfig", "ProbeConfig", "WEIGHT_DECAYS", "setting", "from_dict", "from_options",
           "load_yaml", "parse_int_list", "parse_json_object", "parse_pairs", "save_yaml", "to_dict", "yaml_value"]
