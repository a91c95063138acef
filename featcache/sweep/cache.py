"""The sweep's stage 1: use the cache as it is when complete (the teacher is never built), else extract it once.

Whether a complete cache is the one the spec's ``extract:`` section describes is read from its manifest alone, so
the check needs no teacher. Layer indices are resolved with :func:`featcache.models.resolve_layers`, the resolver
``featcache extract`` uses, so an index extraction would refuse is refused here too.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Mapping

from ..config import ExtractConfig, from_dict
from ..errors import CacheError, ConfigError, SweepError
from ..models import resolve_layers
from .spec import SweepSpec


def cache_status(path: str | Path) -> tuple[bool, Any]:
    """``(complete, manifest)`` of the cache at ``path``; ``(False, None)`` if there is none."""
    from ..storage import location
    from ..stores import open_reader

    if not location(path, "cache").exists():  # a URL too (s3://...): an unknown scheme is refused here
        return False, None
    try:
        reader = open_reader(path, require_complete=False)
    except CacheError:
        return False, None
    return reader.manifest.complete, reader.manifest


def extract_mismatch(extract: ExtractConfig, manifest: Mapping[str, Any]) -> list[str]:
    """Fields of an extraction config that disagree with an existing cache's manifest, read without a teacher.

    Only what the config states is compared (``None`` fields, e.g. a default ``img_size``, are not).

    Raises:
        SweepError: when ``extract.layers`` names a block the cache's teacher does not have (extraction refuses it).
    """
    from ..extract import storage_section  # torch-free, but featcache.extract imports the teacher stack

    teacher = manifest.get("teacher", {})
    subset, views, storage = manifest.get("subset", {}), manifest.get("views", {}), manifest.get("storage", {})
    checks = {
        "teacher": (extract.teacher, teacher.get("name")),
        "pretrained": (extract.pretrained, teacher.get("pretrained")),
        "checkpoint": (_abs(extract.checkpoint), _abs(teacher.get("checkpoint"))),
        "layers": (_layers(extract.layers, teacher.get("num_blocks")), sorted(manifest.get("layers", []))),
        "img_size": (extract.img_size, manifest.get("img_size") if extract.img_size is not None else None),
        "shots": (extract.shots, subset.get("shots")),
        "fraction": (extract.fraction, subset.get("fraction")),
        "subset_seed": (extract.subset_seed, subset.get("subset_seed", extract.subset_seed)),
        "views": (extract.views, views.get("count")),
        "seed": (extract.seed, views.get("seed", extract.seed)),
        "view recipe": (_view_recipe(extract, manifest), views.get("recipe")),
        "teacher_kwargs": (dict(extract.teacher_kwargs), manifest.get("teacher_kwargs", {})),
    }
    # the storage section is a function of the config alone: compare all of it (keys an older cache lacks match)
    checks.update({key: (want, storage.get(key, want)) for key, want in storage_section(extract).items()})
    return [k for k, (want, have) in checks.items() if want != have]


def _layers(layers: list[int], num_blocks: Any) -> list[int]:
    """The absolute, sorted block indices ``extract`` would cache for ``layers`` (as given without a block count)."""
    if not num_blocks:
        return sorted(layers)
    try:
        return sorted(resolve_layers(layers, int(num_blocks)))
    except ConfigError as err:
        raise SweepError(f"the spec's extract.layers {list(layers)} do not fit the cache's teacher: {err}; fix "
                         "extract.layers") from None


def _view_recipe(extract: ExtractConfig, manifest: Mapping[str, Any]) -> dict[str, Any] | None:
    """The view recipe ``extract`` would record, built from the manifest's geometry (no teacher needed)."""
    from ..extract import view_recipe

    norm = manifest.get("normalization", {})
    if norm.get("interpolation") is None or manifest.get("img_size") is None:
        return manifest.get("views", {}).get("recipe")  # nothing to compare against: not a mismatch
    recipe = view_recipe(extract, int(extract.img_size or manifest["img_size"]), norm)
    return json.loads(json.dumps(recipe.to_dict()))  # tuples -> lists, as the manifest stores them


def _abs(path: str | None) -> str | None:
    return str(Path(path).resolve()) if path else None


def ensure_cache(spec: SweepSpec, log: Callable[[str], None] = print) -> None:
    """Use the sweep's cache as it is when complete (the teacher is not built); otherwise extract it first."""
    complete, manifest = cache_status(spec.cache)
    extract = extract_config(spec)
    if complete:
        differ = extract_mismatch(extract, manifest) if extract is not None else []
        if differ:
            raise SweepError(f"the complete cache at {spec.cache!r} was extracted with different {differ} than "
                             "the spec's `extract:`; point `cache:` at a new path, or set extract.overwrite")
        log(f"cache complete: the teacher will not be run ({spec.cache})")
        return
    state = "is incomplete" if manifest is not None else "does not exist"
    if extract is None:
        raise SweepError(f"cache {spec.cache!r} {state}; add an `extract:` section to the spec, or run "
                         "`featcache extract --out` with that path first")
    from ..extract import run_extract

    log(f"cache {spec.cache!r} {'is incomplete' if manifest is not None else 'is missing'}: extracting it once")
    run_extract(extract)


def extract_config(spec: SweepSpec) -> ExtractConfig | None:
    """The spec's ``extract:`` section as a validated :class:`ExtractConfig` (``None`` without one)."""
    if spec.extract is None:
        return None
    try:
        config = from_dict(ExtractConfig, spec.extract)
        config.validate()
    except ValueError as err:
        raise SweepError(f"the spec's `extract:` section is invalid: {err}") from None
    return config
