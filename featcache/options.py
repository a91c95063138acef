"""Command-line options built from the config fields and library signatures, so each default is written once.

A config field (:func:`featcache.config.setting`) carries its default, help text and choices; :func:`field_option`
turns it into a click option. Choices that a registry owns are stored in the field as a ``"module:NAME"`` reference
and resolved here, when the option is built, never when :mod:`featcache.config` is imported. Options of commands
without a config (``verify --samples``) read their default from the library function's signature
(:func:`default_option`). Neither imports the module holding a registry or a signature: until a command runs,
:mod:`featcache.declared` reads them from the source, so no ``--help`` loads torch. :class:`Command` builds a
command's options on first use, so that ``featcache --help`` imports neither a registry nor YAML
(:mod:`featcache.config` is imported when a command runs).
"""
from __future__ import annotations

import dataclasses
import importlib
import re
import types
import typing
from typing import Any, Callable

import click

from .errors import ConfigError


class CacheLocation(click.ParamType):
    """A cache argument: an existing local path, or a URL (``s3://...``), checked when the command opens it
    (:func:`featcache.storage.location`: an unsupported scheme is one line there, and nothing is written)."""

    name = "cache"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if re.match(r"^[A-Za-z][A-Za-z0-9+.-]+:", str(value)) or "::" in str(value):
            return str(value)
        return click.Path(exists=True).convert(value, param, ctx)


def resolve(ref: str) -> Any:
    """``"module:NAME"`` -> that object, imported only now."""
    module, _, name = ref.partition(":")
    return getattr(importlib.import_module(module), name)


def names_of(ref: Any) -> list[str]:
    """The values a choices reference allows: a tuple as is, or the names of a ``"module:NAME"`` registry/sequence.

    A reference is never imported for this: until its module is, the names are read from its source
    (:mod:`featcache.declared`), so that ``--help`` loads no torch.
    """
    from .declared import names

    return names(ref) if isinstance(ref, str) else list(ref)


class Command(click.Command):
    """A command whose options are built on first use (help, parsing, completion), not at import.

    Args:
        config: ``"module:Class"`` of the config dataclass whose fields become the options, after ``--config``.
        build: returns the options of a command without a config.

    Attributes:
        build_options: what builds the options (kept: tests build them again with the registries imported).
    """

    def __init__(self, *args: Any, config: str | None = None, build: Callable[[], list] | None = None, **kw: Any):
        super().__init__(*args, **kw)
        self.config = config
        self.build_options = build if config is None else self._config_options
        self._pending = True

    def _config_options(self) -> list[click.Parameter]:
        return config_options(resolve(self.config), self.name)

    @property
    def params(self) -> list[click.Parameter]:
        if getattr(self, "_pending", False):  # click's __init__ assigns params before _pending exists
            self._pending = False
            if self.build_options is not None:
                self._params.extend(self.build_options())
        return self._params

    @params.setter
    def params(self, value: list[click.Parameter]) -> None:
        self._params = value


def _strip_none(hint: Any) -> Any:
    """``int | None`` -> ``int``: an option's type is that of its value, None is its absence."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        return next(a for a in typing.get_args(hint) if a is not type(None))
    return hint


def field_option(f: dataclasses.Field, hint: Any) -> click.Option:
    """The click option of one config field: its default, help and choices as the field declares them.

    A bool is a flag, or a ``--x/--no-x`` pair when it defaults to True or asks for a toggle; a tuple takes that
    many values; an int list is typed ``0,1,11``; a dict is a JSON object, or repeated ``KEY=VALUE`` pairs.
    """
    meta, hint = f.metadata, _strip_none(hint)
    base = typing.get_origin(hint) or hint
    default = f.default if f.default_factory is dataclasses.MISSING else f.default_factory()
    flag = "--" + meta.get("option", f.name).replace("_", "-")
    kw: dict[str, Any] = {"default": default, "show_default": default not in (None, ""), "help": meta["help"]}
    if base is bool and (default or meta.get("toggle")):
        flag = f"{flag}/--no-{flag[2:]}"
    elif base is bool:
        kw.update(is_flag=True, show_default=False)
    elif base is tuple:
        kw["type"] = typing.get_args(hint)
    elif base is list:
        kw["default"] = ",".join(str(v) for v in default)
    elif base is dict and meta.get("multiple"):
        kw.update(default=(), show_default=False, multiple=True, metavar=meta.get("metavar"), callback=_check_pairs)
    elif base is dict:
        kw.update(default=None, show_default=False)
    else:
        kw["type"] = click.Choice(names_of(meta["choices"])) if "choices" in meta else base
    if "listed" in meta:
        kw["help"] += f" Registered: {', '.join(names_of(meta['listed']))}."
    return click.Option([flag], **kw)


def config_options(cls: type, command: str) -> list[click.Parameter]:
    """``--config`` plus one option per CLI field of the config dataclass ``cls``, in field order."""
    hints = typing.get_type_hints(cls)
    config = click.Option(["--config", "config_path"], type=click.Path(exists=True, dir_okay=False), default=None,
                          help=f"YAML file of {command} options (keys as below, with _); explicit options override it.")
    return [config] + [field_option(f, hints[f.name]) for f in dataclasses.fields(cls) if f.metadata.get("cli", True)]


def field_choice(owner: str, name: str) -> click.Choice:
    """The choices of field ``name`` of the config class ``owner`` (``"module:Class"``), for an option outside it."""
    field = next(f for f in dataclasses.fields(resolve(owner)) if f.name == name)
    return click.Choice(names_of(field.metadata["choices"]))


def default_option(decl: str, owner: str, name: str, **kw: Any) -> click.Option:
    """An option whose default is read from the library: the dataclass field's or keyword parameter's ``name`` of
    ``owner`` (``"module:NAME"``), so the value is written there only."""
    from .declared import default

    return click.Option([decl, name], default=default(owner, name), show_default=True, **kw)


def load_config(ctx: click.Context, config_path: str | None, options: dict[str, Any]) -> Any:
    """The command's config: YAML values overridden by the options the user typed (not by click's defaults)."""
    from .config import from_options, load_yaml

    cls, values = resolve(ctx.command.config), load_yaml(config_path) if config_path else {}
    for key, value in options.items():
        source = ctx.get_parameter_source(key)
        if key not in values or source is None or source.name != "DEFAULT":
            values[key] = value
    for f in dataclasses.fields(cls):  # a YAML value has not met click's choice check
        check_choice(f, values.get(f.name), config_path)
    return from_options(cls, values)


def check_choice(f: dataclasses.Field, value: Any, origin: str | None) -> None:
    """Refuse a value of a choice field that its registry does not know, naming the known ones."""
    if "choices" not in f.metadata or value is None or value in (allowed := names_of(f.metadata["choices"])):
        return
    raise ConfigError(f"{f.name}: {value!r} is not one of {', '.join(allowed)}" + (f" (in {origin})" if origin else ""))


def parse_method_args(pairs: tuple[str, ...] | list[str], base: dict[str, Any] | None = None) -> dict[str, Any]:
    """``("alpha=3e-5", "nkd.temperature=2")`` -> ``{"alpha": 3e-5, "nkd": {"temperature": 2}}`` (YAML-typed values).

    Raises:
        click.BadParameter: a pair is not ``key=value``, so click reports it as a usage error of ``--method-arg``.
    """
    from .config import parse_pairs

    try:
        return parse_pairs(pairs, base)
    except ConfigError as err:
        raise click.BadParameter(str(err).removeprefix("--method-arg: "), param_hint="--method-arg") from None


def _check_pairs(ctx: click.Context, param: click.Parameter, pairs: tuple[str, ...]) -> tuple[str, ...]:
    """Option callback: a malformed pair fails while parsing; the pairs are merged into the config later."""
    parse_method_args(pairs)
    return pairs
