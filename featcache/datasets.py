"""Stage-2 datasets: cached views joined with their source images, and a held-out evaluation folder.

Training items replay the exact input the teacher saw: the source image is decoded and the stored view
parameters are applied again (`featcache.views.replay`); the cached targets of that row come along.

View policy (how epochs draw from the K stored views of each sample; only *valid* views are used):
    ``cycle``   view ``= valid[(epoch + offset(sample)) mod n_valid]`` with a per-sample offset drawn once from
                ``(seed, sample)``: every view is used once per ``n_valid`` epochs and different samples see
                different views in the same epoch.
    ``random``  view drawn uniformly from ``default_rng([seed, epoch, sample])``: independent per epoch.
Both depend on ``(seed, epoch, sample)`` only, never on workers or batch order, so a resumed run and a run on
more processes see the same (sample, view) pairs. ``max_views`` restricts both to the first K stored views.

Mixed views (Mixup / CutMix) replay both components, the sample's and its partner's, and their label is timm's
soft ``mixup_target`` (:func:`featcache.views.mix_target`). ``fresh_views`` (``--online-teacher --fresh-views``)
draws a new view per epoch from ``(seed, epoch, sample)`` instead of replaying a stored one.

Replay drift: every replayed item is re-fingerprinted and compared with the CRC-32 stored at extraction (a
CRC-32 of a 224 px view costs tens of microseconds); ``fingerprint_checks=N`` checks a seeded sample of N items per
epoch instead. A mismatch raises :class:`ReplayDriftError` naming the file, the cache row and the likely cause (the
student would otherwise learn from targets of a different input); an image that no longer decodes raises
:class:`DecodeError` with the same row. Both are raised in the DataLoader worker and reach the user as one line.
"""
from __future__ import annotations

import functools
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from .errors import ConfigError, DecodeError, ReplayDriftError
from .sources import ImageSource
from .stores.base import StoreReader
from .stores.encodings import stored_names
from .views import (Recipe, draw_view, eval_recipe, fingerprint, fresh_view_seed, make_view, mix_target, replay,
                    sample_params)

VIEW_POLICIES = ("cycle", "random")
DECODES = ("workers", "device")  # where cached targets are decoded
DECODE_CHOICES = ("auto", "workers", "device")  # ``--decode`` (read as a literal): auto is device on CUDA


class ViewDataset(Dataset):
    """Row -> the replayed uint8 view and its records. Randomness comes from ``view_seed`` alone, so the
    result does not depend on worker count, batch size or which rows a resumed run still needs."""

    def __init__(self, source: ImageSource, recipe: Recipe, seed: int, views: int, rows: list[int],
                 skip_corrupt: bool = False) -> None:
        self.source, self.recipe, self.seed, self.views = source, recipe, seed, views
        self.rows, self.skip_corrupt = rows, skip_corrupt

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, Any]:
        row = self.rows[i]
        sample, view = divmod(row, self.views)
        item = {"row": row, "sample": sample, "view": view, "label": self.source.items[sample].label, "error": ""}
        try:  # a mixed view also decodes its partner (a sample position drawn from the view's seed)
            v = make_view(self.source.load(sample), self.recipe, self.seed, sample, view, len(self.source),
                          self.source.load)
        except DecodeError as err:  # reported by the main process, which names the file or records the skip
            size = self.recipe.img_size
            reason = f"{type(err.__cause__).__name__}: {err.__cause__}" if err.__cause__ else str(err)
            return dict(item, image=torch.zeros(3, size, size, dtype=torch.uint8), seed=0, valid=0, fingerprint=0,
                        params=np.zeros(len(self.recipe.param_names)), error=reason, path=err.path,
                        relpath=err.relpath or self.source.items[sample].relpath)
        return dict(item, image=v.image, seed=v.seed, params=v.params, fingerprint=v.fingerprint, valid=1, path="",
                    relpath="")


def choose_view(policy: str, valid_views: Sequence[int], epoch: int, sample: int, seed: int) -> int:
    """The stored view of ``sample`` used in ``epoch`` under ``policy`` (see the module docstring)."""
    n = len(valid_views)
    if policy == "cycle":
        return int(valid_views[(epoch + _cycle_offset(seed, sample, n)) % n])
    if policy == "random":
        return int(valid_views[int(np.random.default_rng([seed, epoch, sample]).integers(n))])
    raise ValueError(f"unknown view policy {policy!r}; choose one of {', '.join(VIEW_POLICIES)}")


@functools.lru_cache(maxsize=1 << 16)
def _cycle_offset(seed: int, sample: int, n: int) -> int:
    """The ``cycle`` policy's per-sample start view; cached: it is fixed for the run, and building a numpy
    Generator (~17 us) per item is waste in the loader's hot path. Bounded: unbounded, it grows by ~150 B per sample
    in every worker (~190 MB at ImageNet scale), for a saving that is small next to decoding the image."""
    return int(np.random.default_rng([seed, sample, 0x5EED]).integers(n))


def labelled_mask(labels: Sequence[int], label_shots: int | None) -> np.ndarray:
    """True for the first ``label_shots`` samples of each class (in sample order); all True when ``None``."""
    labels = np.asarray(labels, dtype=np.int64)
    if label_shots is None:
        return np.ones(len(labels), dtype=bool)
    order = np.argsort(labels, kind="stable")  # grouped by class, sample order inside each
    ordered = labels[order]
    group_start = np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1]])
    rank = np.arange(len(labels)) - np.repeat(group_start, np.diff(np.r_[group_start, len(labels)]))
    keep = np.zeros(len(labels), dtype=bool)
    keep[order[rank < label_shots]] = True
    return keep


class CachedViewDataset(Dataset):
    """One item per sample: its replayed view for the current epoch, the cached targets and the label.

    Args:
        reader: the cache (picklable; opens its files lazily in each worker).
        source: the images the cache was extracted from, in sample order (`source_from_manifest`).
        recipe: the view recipe recorded in the manifest.
        targets: names of the cached targets to return (``[]`` with ``with_targets=False``).
        view_policy: ``cycle`` or ``random`` (module docstring).
        label_shots: keep labels for the first this-many samples per class; others get label -1.
        seed: seeds the view policy and the per-epoch fingerprint sample.
        fingerprint_checks: None checks every item's replay against the stored fingerprint; N checks a seeded
            sample of N items per epoch (0: none).
        with_targets: read cached targets (False for ``--online-teacher``, which computes them).
        num_classes: classes of the soft label targets of a mixed recipe (the student's).
        label_smoothing: smoothing of those soft targets (a mixed recipe's labels are timm's ``mixup_target``).
        fresh_views: draw a new view per epoch (`fresh_view_seed`) instead of replaying a stored one; no targets.
        max_views: use only stored views ``0 .. max_views - 1`` of each sample (``None``: all).
        labelled_only: keep only the labelled samples, repeated so that an epoch has as many items as there are
            samples in the cache (the same optimizer steps as a run over all of them); pass ``p`` of epoch ``e``
            over them uses the views of epoch ``e * passes + p``, so every pass takes the next view.
        labelled_items: items per epoch of a labelled stream after the epoch's items (``--labelled-batch``, served
            by :class:`~featcache.samplers.LabelledBatchSampler`): item ``epoch_items + r`` is pass ``p = r // L``
            over the ``L`` labelled samples, with the views of view epoch ``epoch * P + p`` (``P``: the stream's
            passes per epoch), the rule ``labelled_only`` applies to its own passes.
        keep_decoded: keep every decoded source image in memory after its first load (in each loader process), so
            later epochs only replay views; for image sets small enough to hold decoded.
        decode: ``workers``: items carry decoded float32 ``targets``; ``device``: items carry the ``stored`` arrays
            as read (compact: fp16, int8, pca bytes), for the training loop to decode on its device.
    """

    def __init__(self, reader: StoreReader, source: ImageSource, recipe: Recipe, targets: list[str],
                 view_policy: str = "cycle", label_shots: int | None = None, seed: int = 0,
                 fingerprint_checks: int | None = None, with_targets: bool = True, num_classes: int | None = None,
                 label_smoothing: float = 0.0, fresh_views: bool = False, max_views: int | None = None,
                 decode: str = "workers", labelled_only: bool = False, keep_decoded: bool = False,
                 labelled_items: int = 0):
        if view_policy not in VIEW_POLICIES:
            raise ConfigError(f"unknown view policy {view_policy!r}; choose one of {', '.join(VIEW_POLICIES)}")
        if recipe.mix is not None and not num_classes:
            raise ValueError("a mixed recipe's labels are soft targets: pass num_classes")
        if fresh_views and with_targets:
            raise ValueError("fresh views have no cached targets: pass with_targets=False (the teacher runs online)")
        if decode not in DECODES:
            raise ConfigError(f"unknown target decode {decode!r}; choose one of {', '.join(DECODES)}")
        self.reader, self.source, self.recipe = reader, source, recipe
        self.targets = list(targets) if with_targets else []
        self.decode = decode
        self.stored = stored_names(reader.manifest, self.targets) if self.targets else []
        self.view_policy, self.seed, self.fingerprint_checks = view_policy, seed, fingerprint_checks
        self.num_classes, self.label_smoothing, self.fresh_views = num_classes, label_smoothing, fresh_views
        self.views = reader.manifest.views_per_sample
        self.used_views = min(self.views, max_views or self.views)
        self.label_shots, self.labelled_only = label_shots, labelled_only
        self.labelled_items = 0
        self.decoded: dict[int, torch.Tensor] | None = {} if keep_decoded else None
        self.drift = environment_drift(reader.manifest.get("versions", {}))
        self._index()
        self.set_epoch(0)
        if labelled_items:
            self.add_labelled_stream(labelled_items)

    def add_labelled_stream(self, items: int) -> None:
        """Serve ``items`` labelled-stream items per epoch after the epoch's own (see ``labelled_items``)."""
        if self.labelled_only:
            raise ValueError("labelled_only already serves only labelled items; a labelled stream adds nothing")
        if not len(self.labelled_positions):
            raise ConfigError("--labelled-batch: no sample of the cache is labelled; pass --label-shots >= 1")
        self.labelled_items = int(items)
        self.set_epoch(self.epoch)  # the epoch grew: its fingerprint sample is drawn over every item again

    # Per-sample bookkeeping: numpy arrays over the cache's records, rebuilt (cheaply, from the mapped records) in
    # each process instead of pickled: a DataLoader worker receives the reader and the source by reference only.
    _derived = ("_valid", "samples", "labels", "sample_labels", "epoch_items", "labelled_positions")

    def __getstate__(self) -> dict[str, Any]:
        state = {k: v for k, v in self.__dict__.items() if k not in self._derived}
        if state.get("decoded") is not None:
            state["decoded"] = {}  # each process keeps its own decoded images; shipping them would copy them all
        return state

    def __getattr__(self, name: str) -> Any:
        if name in CachedViewDataset._derived and "reader" in self.__dict__:
            self._index()
            return self.__dict__[name]
        raise AttributeError(name)

    def _index(self) -> None:
        valid = np.asarray(self.reader.records()["valid"]).reshape(-1, self.views)[:, :self.used_views] != 0
        samples = np.flatnonzero(valid.any(axis=1))
        labels = self.source.label_array()[samples]  # a view's recorded label is its image's
        labels = np.where(labelled_mask(labels, self.label_shots), labels, -1)
        self.epoch_items = len(samples)  # items per epoch: the cache's samples, whichever are kept
        if self.labelled_only:
            samples, labels = _labelled(samples, labels)
        self._valid, self.samples, self.labels = valid, samples, labels
        self.labelled_positions = np.flatnonzero(labels >= 0)  # the labelled stream's samples, as positions
        self.sample_labels = np.full(len(self.source), -1, dtype=np.int64)  # by sample position: a partner's label
        self.sample_labels[self.samples] = self.labels

    @property
    def params(self) -> np.ndarray:
        """Every row's drawn view parameters (mapped from the cache: rows are read as items touch them)."""
        return self.reader.records()["params"]

    @property
    def fingerprints(self) -> np.ndarray:
        return self.reader.records()["fingerprint"]

    def rows_of(self, position: int) -> np.ndarray:
        """The valid rows of the sample at ``position`` of :attr:`samples` (``row = sample * K + view``)."""
        sample = int(self.samples[position])
        return np.flatnonzero(self._valid[sample]) + sample * self.views

    @property
    def passes(self) -> int:
        """Passes over the kept samples per epoch (1 unless ``--labelled-only`` dropped some)."""
        return -(-self.epoch_items // len(self.samples))

    def __len__(self) -> int:
        return self.epoch_items + self.labelled_items

    def set_epoch(self, epoch: int) -> None:
        """Select the views of ``epoch`` and the items whose fingerprint is checked this epoch."""
        self.epoch = int(epoch)
        self.checked = checked_items(self.fingerprint_checks, len(self), [self.seed, self.epoch, 0xF1])

    def locate(self, index: int) -> tuple[int, int]:
        """Item ``index`` of the epoch -> (kept sample position, the view epoch its pass uses)."""
        if index >= self.epoch_items:  # the labelled stream: pass r // L over the L labelled samples
            r, group = index - self.epoch_items, len(self.labelled_positions)
            passes = -(-self.labelled_items // group)
            return int(self.labelled_positions[r % group]), self.epoch * passes + r // group
        kept = len(self.samples)
        return index % kept, self.epoch * self.passes + index // kept

    def row_of(self, index: int) -> int:
        """The cache row (stored view) item ``index`` uses in the current epoch."""
        position, view_epoch = self.locate(index)
        return choose_view(self.view_policy, self.rows_of(position), view_epoch, int(self.samples[position]),
                           self.seed)

    def __getitem__(self, index: int) -> dict[str, Any]:
        if self.fresh_views:
            return self.fresh_item(index)
        return self.item(index, self.row_of(index))

    def item(self, index: int, row: int, stored: dict[str, np.ndarray] | None = None) -> dict[str, Any]:
        """Item ``index`` from cache row ``row``; its ``stored`` arrays when the caller read them already (a
        stream of whole shards, :mod:`featcache.streaming`), else they are read here."""
        sample = int(self.samples[self.locate(index)[0]])
        params = np.asarray(self.params[row])
        partner = self.recipe.partner_of(params)  # a mixed view: its partner's image is replayed too
        image = replay(self.load(sample, row), self.recipe, params,
                       None if partner is None else self.load(partner, row))
        if self.checked is None or index in self.checked:
            self.check_fingerprint(sample, row, image)
        out: dict[str, Any] = {"image": image, "label": self.label(index, params), "row": row, "sample": sample}
        if not self.targets:
            return out
        stored = stored if stored is not None else self.reader.read_stored_row(row, self.stored)
        if self.decode == "device":
            out["stored"] = {k: _tensor(stored[k]) for k in self.stored}
        else:  # np.require copies only a read-only row (an fp32 pass-through of the reader's buffer).
            out["targets"] = {k: torch.from_numpy(np.require(v, np.float32, ["W"]))
                              for k, v in self.reader.decode(stored, self.targets).items()}
        return out

    def load(self, sample: int, row: int) -> torch.Tensor:
        """The decoded source image of ``sample``; a file that no longer decodes is named with its cache row."""
        try:
            return self.image(sample)
        except DecodeError as err:
            raise DecodeError(err.path or self.source.path_of(sample), err.reason or str(err), err.relpath,
                              fix=f"cache row {row} was extracted from it, so it changed since extraction or --data "
                                  "points at another copy of the images; restore the file, or re-extract the cache"
                              ) from None

    def image(self, sample: int) -> torch.Tensor:
        """The decoded source image of ``sample``, decoded once per process with ``keep_decoded``."""
        if self.decoded is None:
            return self.source.load(sample)
        if sample not in self.decoded:
            self.decoded[sample] = self.source.load(sample)
        return self.decoded[sample]

    def fresh_item(self, index: int) -> dict[str, Any]:
        """``--fresh-views``: a view drawn for this epoch from ``(seed, epoch, sample)`` with the cache's recipe."""
        position, view_epoch = self.locate(index)
        sample = int(self.samples[position])
        view = draw_view(self.image(sample), self.recipe, fresh_view_seed(self.seed, view_epoch, sample), sample,
                         len(self.source), self.image)
        return {"image": view.image, "label": self.label(index, view.params), "row": -1, "sample": sample}

    def label(self, index: int, params: np.ndarray) -> int | torch.Tensor:
        """The hard label of item ``index``, or for a mixed recipe the lambda-mixed smoothed one-hot of its view."""
        label = int(self.labels[self.locate(index)[0]])
        if self.recipe.mix is None:
            return label
        _, mix, _ = self.recipe.split(params)
        partner = self.recipe.partner_of(params)
        partner_label = -1 if partner is None else int(self.sample_labels[partner])
        return mix_target(label, partner_label, float(mix[1]), self.num_classes, self.label_smoothing)

    def check_fingerprint(self, sample: int, row: int, image: torch.Tensor) -> None:
        """Raise :class:`ReplayDriftError` if the replayed ``image`` is not the view the teacher saw."""
        got, stored = fingerprint(image), int(self.fingerprints[row])
        if got == stored:
            return
        raise ReplayDriftError(
            f"replayed view of sample {sample} ({self.source.path_of(sample)}, cache row {row}) has fingerprint "
            f"{got:#010x}, but the cache stored {stored:#010x}: the student would not see the input the teacher saw. "
            f"Likely cause: {drift_cause(self.drift)}. Restore the original file or environment (--data DIR points "
            "training at another copy of the images), or re-extract the cache.")


def _labelled(samples: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``--labelled-only``: the samples that kept their label (``labels >= 0``), and those labels."""
    keep = labels >= 0
    if not keep.any():
        raise ConfigError("--labelled-only: no sample of the cache is labelled; pass --label-shots >= 1")
    return samples[keep], labels[keep]


def checked_items(checks: int | None, n: int, seed: Sequence[int]) -> set[int] | None:
    """The items of an epoch whose fingerprint is checked: None for all, else a seeded sample of ``checks``."""
    if checks is not None and checks < 0:
        raise ConfigError(f"--fingerprint-checks must be >= 0 (or unset: every item), got {checks}")
    if checks is None or checks >= n:
        return None
    return set(np.random.default_rng(seed).choice(n, size=checks, replace=False).tolist()) if checks else set()


def environment_drift(recorded: dict[str, str]) -> list[str]:
    """The libraries that render a view (decode aside) whose version differs from the one recorded at extraction."""
    import torchvision

    now = {"torch": torch.__version__, "torchvision": torchvision.__version__, "numpy": np.__version__}
    return [f"{name} {recorded[name]} at extraction, {v} now" for name, v in now.items()
            if name in recorded and str(recorded[name]) != v]


def drift_cause(drift: list[str]) -> str:
    if drift:
        return f"the libraries that resample the view changed ({'; '.join(drift)})"
    return ("the image file changed on disk since extraction, or --data points at a different copy of the dataset "
            "(with the same torch/torchvision as at extraction, only a different Pillow/libjpeg could also decode it "
            "differently)")


def _tensor(stored: np.ndarray) -> torch.Tensor:
    """A stored array as a writable tensor; uint16 (bf16 bits) as int16, which every torch op and collate handles."""
    stored = stored.view(np.int16) if stored.dtype == np.uint16 else stored
    return torch.from_numpy(np.require(stored, requirements=["W"]))


class EvalDataset(Dataset):
    """A held-out ImageFolder (or shards) with deterministic resize + centre-crop views at ``img_size``.

    Labels are remapped by class *name* onto ``class_names`` (the cache's classes), so the evaluation folder
    may hold a subset of the classes in any order; a class the cache does not know is an error.
    """

    def __init__(self, source: ImageSource, img_size: int, class_names: Sequence[str], crop_pct: float = 0.875,
                 interpolation: str = "bicubic"):
        unknown = [c for c in source.classes if c not in class_names]
        if unknown:
            raise ValueError(f"--val {source.root!r} has classes {unknown[:5]} that the cache does not know "
                             f"(cache classes: {list(class_names)[:10]}...); evaluate on folders named like "
                             "the training classes")
        index = {name: i for i, name in enumerate(class_names)}
        self.source = source
        self.label_map = [index[c] for c in source.classes]
        self.recipe = eval_recipe(img_size, crop_pct=crop_pct, interpolation=interpolation)

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> dict[str, Any]:
        try:
            image = self.source.load(index)
        except DecodeError as err:
            raise DecodeError(err.path or self.source.path_of(index), err.reason or str(err), err.relpath,
                              fix="fix it or remove it from the --val folder") from None
        params = sample_params(self.recipe, 0, (image.shape[-2], image.shape[-1]))
        label = self.label_map[self.source.items[index].label]
        return {"image": replay(image, self.recipe, params), "label": label}
