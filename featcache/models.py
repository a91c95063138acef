"""timm plumbing shared by teachers and students: names, loading, normalisation, device, block taps.

Teachers (stage 1) and students (stage 2) are both plain timm models, so everything that touches timm's API lives
here once: the alias table, :func:`load_model` (hub, offline hub cache or a local checkpoint, never unpickling),
the weights hash, the input normalisation, the block count and index resolver (timm's ``feature_take_indices``
contract), and :func:`forward_taps`, the one call to ``forward_intermediates`` that every feature consumer uses.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import socket
import urllib.request
from pathlib import Path
from urllib.parse import urlsplit
from typing import Any, NamedTuple, Sequence

import timm
import torch
import torch.nn as nn

from .errors import ConfigError, MissingFileError, WeightsUnavailableError

#: Short names -> the real timm ``architecture.tag`` behind each, as used by the source papers.
MODEL_ALIASES: dict[str, str] = {
    "deit3_small": "deit3_small_patch16_224.fb_in22k_ft_in1k",  # ViTKD (DeiT III-S teacher)
    "deit3_base": "deit3_base_patch16_224.fb_in22k_ft_in1k",  # ViTKD (DeiT III-B teacher)
    "deit3_large": "deit3_large_patch16_224.fb_in22k_ft_in1k",  # ViTKD (DeiT III-L teacher)
    "deit_tiny": "deit_tiny_patch16_224.fb_in1k",  # ViTKD student
    "deit_small": "deit_small_patch16_224.fb_in1k",  # ViTKD (DeiT-S teacher / student)
    "deit_base": "deit_base_patch16_224.fb_in1k",  # ViTKD student, ScaleKD student
    # WeCoLoRA's supervised ViT-B: timm 0.3.2's default vit_base_patch16_224 weights, the original JAX
    # in21k->in1k port (mean = std = 0.5), which timm now tags orig_in21k_ft_in1k.
    "vit_base": "vit_base_patch16_224.orig_in21k_ft_in1k",
    "vit_base_mae": "vit_base_patch16_224.mae",  # WeCoLoRA (self-supervised MAE teacher)
    "swin_large": "swin_large_patch4_window7_224.ms_in22k_ft_in1k",  # ScaleKD teacher
    "resnet50": "resnet50.a1_in1k",  # ScaleKD student
}

#: timm's model sources (``timm.models.parse_model_name``): what follows is a Hub repo id or a folder written by
#: ``timm.models.save_for_hf`` (a run's ``student/``), passed to ``timm.create_model`` unchanged.
MODEL_SOURCES = ("hf-hub:", "local-dir:")

#: Seconds to wait for the hub (or the proxy in front of it) to accept a connection before giving up on downloads.
HUB_CONNECT_TIMEOUT_S = 3.0

#: Seed of the weight init of models built without pretrained weights or a checkpoint.
RANDOM_INIT_SEED = 0

#: Keys under which common training codebases (timm, DeiT, mmcls) nest the state dict in a checkpoint.
_STATE_DICT_WRAPPERS = ("state_dict", "model", "state_dict_ema")


def resolve_name(name: str) -> str:
    """Alias -> full timm ``architecture.tag`` name; other names pass through unchanged."""
    return MODEL_ALIASES.get(name, name)


def architecture_and_tag(model: nn.Module, full: str) -> tuple[str, str | None]:
    """timm's architecture and pretrained tag of ``model``, created as ``full``: read from the name
    (``architecture.tag``), or from the model's pretrained config for ``hf-hub:``/``local-dir:`` names."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    if full.startswith(MODEL_SOURCES):
        return str(cfg.get("architecture") or type(model).__name__), cfg.get("tag")
    arch, _, tag = full.partition(".")
    return arch, tag or cfg.get("tag")


def resolve_device(device: str) -> torch.device:
    """``auto`` -> ``cuda`` when available, else ``cpu``; anything else is passed to torch."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def normalization(model: nn.Module) -> dict[str, Any]:
    """The model's timm data config (``resolve_model_data_config``): mean, std, interpolation, ``crop_pct``,
    ``crop_mode`` and input side; what timm's own evaluation transform of the model uses."""
    cfg = timm.data.resolve_model_data_config(model)
    return {"mean": [float(v) for v in cfg["mean"]], "std": [float(v) for v in cfg["std"]],
            "interpolation": str(cfg.get("interpolation", "bicubic")), "input_size": int(cfg["input_size"][-1]),
            "crop_pct": float(cfg.get("crop_pct", 0.875)), "crop_mode": str(cfg.get("crop_mode", "center"))}


def load_model(name: str, pretrained: bool = True, checkpoint: str | None = None, img_size: int | None = None,
               num_classes: int | None = None, init_seed: int = RANDOM_INIT_SEED, **kwargs: Any) -> nn.Module:
    """Create any timm model by alias or name (teachers and students alike).

    Args:
        name: alias (see ``MODEL_ALIASES``), timm name optionally with a ``.tag``, or a timm source name
            (``hf-hub:org/repo``, ``local-dir:PATH``, see :data:`MODEL_SOURCES`).
        pretrained: load timm's pretrained weights: from the local hub cache without touching the network, else
            downloaded; raises :class:`~featcache.errors.WeightsUnavailableError` within seconds when the hub is
            unreachable.
        checkpoint: a local ``.safetensors`` file or torch state dict, loaded with ``weights_only=True``.
        img_size: timm's ``img_size`` override (ViTs resample their position embedding).
        num_classes: classifier size override.
        init_seed: seed of the random weight init (students pass the run's ``--seed``; teachers keep the default).
        **kwargs: passed to ``timm.create_model``; ``None`` values are dropped, as timm's factory does.
    """
    kwargs = {k: v for k, v in dict(kwargs, img_size=img_size, num_classes=num_classes).items() if v is not None}
    full = resolve_name(name)
    _check_known(name, full)
    # A randomly initialised model (tests, `--no-pretrained`) must be the same model every time it is built,
    # or `verify` and `--online-teacher` would compare against a different teacher: seed its init locally.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(init_seed)
        model = _create(full, pretrained and checkpoint is None, kwargs)
    if checkpoint is not None:
        _load_weights(model, checkpoint, full)
    return model


def _load_weights(model: nn.Module, checkpoint: str, full: str) -> None:
    """Load ``checkpoint`` into ``model``, refusing one made for another architecture in one line."""
    try:
        model.load_state_dict(load_state_dict(checkpoint))
    except RuntimeError as err:  # torch lists every missing / unexpected key and shape, over many lines
        detail = " ".join(str(err).split())
        detail = detail if len(detail) <= 300 else detail[:300] + " ..."
        raise ConfigError(f"checkpoint {str(checkpoint)!r} does not fit timm model {full!r} ({detail}); "
                          "pass the checkpoint of that architecture, or the --teacher / --student it was saved "
                          "from") from None


def _check_known(name: str, full: str) -> None:
    """Refuse a name timm has neither a model nor a pretrained config for, naming how to find candidates."""
    if full.startswith(MODEL_SOURCES):
        return _check_source(full)
    arch = full.split(".")[0]
    if timm.get_pretrained_cfg(arch) is None and not timm.is_model(arch):
        raise ConfigError(f"unknown timm model {name!r}; list candidates with `timm.list_models('*{name}*')` or "
                          f"`featcache teachers`")


def _check_source(full: str) -> None:
    """A ``local-dir:`` folder must hold timm's ``config.json`` (``hf-hub:`` ids are checked by the hub)."""
    source, _, where = full.partition(":")
    if source == "local-dir" and not (Path(where) / "config.json").is_file():
        raise MissingFileError(f"{full!r}: {where!r} has no config.json; a local-dir: model is a folder written by "
                               "timm.models.save_for_hf, e.g. the student/ folder of a featcache run")


def _create(full: str, pretrained: bool, kwargs: dict[str, Any]) -> nn.Module:
    """``timm.create_model``, with files from the hub cache first and a fast, named failure offline.

    An ``hf-hub:`` name needs the hub even without pretrained weights: its ``config.json`` names the architecture.
    """
    if full.startswith("local-dir:") or not (pretrained or full.startswith("hf-hub:")):
        return _create_timm(full, pretrained, kwargs)
    with _hub_offline():  # HF_HUB_OFFLINE semantics: the cache answers, or the hub is never asked
        try:
            return _create_timm(full, pretrained, kwargs)
        except OSError as err:  # huggingface_hub's LocalEntryNotFoundError, urllib's URLError
            missing = err
    why = "HF_HUB_OFFLINE is set" if _offline_env() else _hub_unreachable()
    if why is None:
        try:
            return _create_timm(full, pretrained, kwargs)
        except OSError as err:
            missing, why = err, "the download failed"
    raise WeightsUnavailableError(_offline_hint(full, why, missing)) from missing


def _create_timm(full: str, pretrained: bool, kwargs: dict[str, Any]) -> nn.Module:
    """``timm.create_model``, retried without ``img_size`` for models that do not take it (CNNs).

    Raises:
        ConfigError: naming the kwargs, when timm rejects the user's ``--teacher-kwargs`` / ``--student-kwargs``.
    """
    try:
        return _create_model(full, pretrained, kwargs)
    except (TypeError, ValueError, AssertionError) as err:
        extra = {k: v for k, v in kwargs.items() if k not in ("img_size", "num_classes")}
        if not extra:
            raise
        reason = " ".join(str(err).split()) or type(err).__name__
        raise ConfigError(f"timm model {full!r} rejects the kwargs {extra} ({type(err).__name__}: {reason}); fix "
                          "the --teacher-kwargs / --student-kwargs value (or the recipe's teacher_kwargs / "
                          "student_kwargs) that passed them") from None


def _create_model(full: str, pretrained: bool, kwargs: dict[str, Any]) -> nn.Module:
    try:
        return timm.create_model(full, pretrained=pretrained, **kwargs)
    except TypeError:  # img_size is a ViT-only argument
        if "img_size" not in kwargs:
            raise
        kwargs = {k: v for k, v in kwargs.items() if k != "img_size"}
        return timm.create_model(full, pretrained=pretrained, **kwargs)


@contextlib.contextmanager
def _hub_offline():
    """``HF_HUB_OFFLINE=1`` for the block: huggingface_hub reads the flag on every request, so files come from the
    local cache and a miss fails at once instead of after its retries (~50 s against an unreachable endpoint)."""
    from huggingface_hub import constants

    saved, constants.HF_HUB_OFFLINE = constants.HF_HUB_OFFLINE, True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = saved


def _offline_env() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE")


def _hub_unreachable() -> str | None:
    """``None`` when the hub's endpoint (or the proxy for it) accepts a TCP connection, else why not."""
    from huggingface_hub import constants

    url = urlsplit(constants.ENDPOINT)
    proxy = urllib.request.getproxies().get(url.scheme)
    target = urlsplit(proxy if "://" in (proxy or "") else f"http://{proxy}") if proxy else url
    port = target.port or (443 if target.scheme == "https" else 80)
    try:
        socket.create_connection((target.hostname, port), timeout=HUB_CONNECT_TIMEOUT_S).close()
    except OSError as err:
        return f"{'the proxy for ' if proxy else ''}{constants.ENDPOINT} is unreachable ({err})"
    return None


def _offline_hint(full: str, why: str, err: Exception) -> str:
    from huggingface_hub import constants

    what = "the config and weights" if full.startswith("hf-hub:") else "the pretrained weights"
    return (f"cannot load {what} of {full!r}: they are not in the local hub cache "
            f"({constants.HF_HUB_CACHE}) and {why} [{type(err).__name__}]. Without a network: pass --checkpoint PATH "
            "(--student-checkpoint PATH for a student) with a local .safetensors or state dict; or --no-pretrained "
            f"for a seeded random init; or fill the offline hub cache on a machine with a network (`python -c "
            f"\"import timm; timm.create_model('{full}', pretrained=True)\"`), copy its HF_HOME here and set "
            "HF_HOME (and HF_HUB_OFFLINE=1)")


def load_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Load weights without ever unpickling: safetensors, or torch's ``weights_only=True`` loader.

    A checkpoint that holds arbitrary Python objects is refused by torch's restricted unpickler (an
    ``UnpicklingError``), so nothing from a downloaded file can run code here.
    """
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"checkpoint {str(path)!r} does not exist; pass the path of a .safetensors file or a "
                               "torch state dict")
    if path.suffix == ".safetensors":
        return _load_safetensors(path)
    state = _torch_load(path)
    for key in _STATE_DICT_WRAPPERS:
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            return state[key]
    return state


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except SafetensorError as err:
        raise ConfigError(f"checkpoint {str(path)!r} is not a readable .safetensors file ({err}); re-save or "
                          "re-download it") from None


def _torch_load(path: Path) -> Any:
    """``torch.load`` with ``weights_only=True``; a file it refuses is named with the safe ways out only (torch's own
    text suggests turning the safe loader off, which must never be shown)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, OSError, KeyError, ValueError) as err:  # not a torch file, or a truncated one
        reason = f"{type(err).__name__}: {_first_sentence(str(err))}"
        raise ConfigError(f"checkpoint {str(path)!r} is not a readable torch state dict ({reason}); pass a "
                          ".safetensors file or one saved with `torch.save(model.state_dict(), path)`") from None
    except Exception as err:
        if type(err).__name__ != "UnpicklingError":  # the restricted unpickler refused the file
            raise
        found = _first_sentence(str(err).partition("WeightsUnpickler error:")[2].split(" Please")[0])
        raise ConfigError(f"checkpoint {str(path)!r} cannot be loaded safely{f' ({found})' if found else ''}: "
                          "featcache reads tensors only and never unpickles Python objects; save the state dict "
                          "alone (`torch.save(model.state_dict(), path)`) or as .safetensors "
                          "(`safetensors.torch.save_file`)") from None


def _first_sentence(text: str) -> str:
    """The first line / sentence of a library's message, for a one-line error."""
    return " ".join(text.strip().splitlines()[0].split(". ")[0].split()) if text.strip() else ""


def weights_sha256(model: nn.Module) -> str:
    """SHA-256 over the model's parameters and buffers (names, dtypes, shapes, bytes), in state-dict order."""
    digest = hashlib.sha256()
    for key, tensor in model.state_dict().items():
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        # Flattened first: torch cannot reinterpret a 0-d tensor (BatchNorm's step counter) as bytes. For every
        # other tensor the bytes are the same as without it, so hashes recorded in existing caches still match.
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def count_blocks(model: nn.Module) -> int:
    """Number of feature taps ``forward_intermediates`` indexes.

    timm's ``feature_info`` when the model has one (it is what timm indexes: e.g. EfficientNet has 7 block groups
    but 5 taps), else the length of ViT ``blocks`` / ``stages`` / Swin ``layers``.
    """
    info = getattr(model, "feature_info", None)
    if isinstance(info, list) and info:
        return len(info)
    for attr in ("blocks", "stages", "layers"):
        blocks = getattr(model, attr, None)
        if isinstance(blocks, (nn.Sequential, nn.ModuleList)):
            return len(blocks)
    raise ConfigError(f"cannot count the feature taps of {type(model).__name__}: it has no feature_info/blocks/"
                      "stages; use a timm model that supports forward_intermediates")


def resolve_layers(indices: Sequence[int], num_blocks: int) -> list[int]:
    """Absolute block indices for ``indices`` under timm's ``feature_take_indices`` contract.

    Negative indices count from the end (``-1`` is the last block); an index outside ``[-num_blocks, num_blocks)``
    raises, naming the valid range. Unlike timm, the order is kept and duplicates are refused, because each index
    names one cached target.
    """
    resolved = []
    for index in indices:
        absolute = num_blocks + int(index) if int(index) < 0 else int(index)
        if not 0 <= absolute < num_blocks:
            raise ConfigError(f"block index {index} is out of range for a model with {num_blocks} blocks "
                              f"(valid: 0..{num_blocks - 1} or -{num_blocks}..-1)")
        resolved.append(absolute)
    if len(set(resolved)) != len(resolved):
        raise ConfigError(f"block indices {list(indices)} name a block twice (resolved: {resolved})")
    return resolved


def resolve_layer(index: int, num_blocks: int) -> int:
    """One block index under the same contract as :func:`resolve_layers`."""
    return resolve_layers([index], num_blocks)[0]


class Taps(NamedTuple):
    """What one :func:`forward_taps` pass returns.

    Attributes:
        final: the final features, what ``model.forward_head`` turns into logits.
        features: one tensor per requested block, before the final norm: ``[B, T, D]`` with prefix tokens first
            for ViT-like models, the ``[B, C, H, W]`` map for CNNs.
    """

    final: torch.Tensor
    features: list[torch.Tensor]


def forward_taps(model: nn.Module, images: torch.Tensor, layers: Sequence[int]) -> Taps:
    """Run ``model`` once through timm's ``forward_intermediates``, keeping the block outputs ``layers``.

    ViT-like models (those with ``num_prefix_tokens``) return ``NLC`` tokens with their prefix tokens (CLS,
    registers, distillation) concatenated in front, so a cached block has timm's own token order; other models
    return their NCHW stage maps unchanged. Indices are absolute (see :func:`resolve_layers`).
    """
    if not hasattr(model, "num_prefix_tokens"):
        final, maps = model.forward_intermediates(images, indices=list(layers), norm=False)
        return Taps(final, list(maps))
    final, inter = model.forward_intermediates(images, indices=list(layers), norm=False, return_prefix_tokens=True,
                                               output_fmt="NLC")
    # timm gives (tokens, prefix) pairs only when the model has prefix tokens; plain tensors otherwise.
    return Taps(final, [torch.cat([f[1], f[0]], dim=1) if isinstance(f, tuple) else f for f in inter])


__all__ = ["HUB_CONNECT_TIMEOUT_S", "MODEL_ALIASES", "MODEL_SOURCES", "RANDOM_INIT_SEED", "Taps",
           "architecture_and_tag", "count_blocks", "forward_taps", "load_model", "load_state_dict", "normalization",
           "resolve_device", "resolve_layer", "resolve_layers", "resolve_name", "weights_sha256"]
