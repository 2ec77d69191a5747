"""Options as typed dataclass fields: one declaration gives the default, the checks, the command-line flag and its help.

A config section is a dataclass whose fields are made with :func:`option`. :func:`check_config` validates every
field of a config from that metadata (type, finite numbers, bounds, choices) and then calls the section's own
``check_fields()`` for rules that span fields; every error is a :class:`ConfigError` naming the field and its flag.
The command line (:mod:`fastdd.commands.options`) is built from the same fields, so adding an option is one field
plus the code that uses it.

This module imports nothing heavy: ``fastdd --help`` reads the configs without loading torch.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass
from typing import Any, Callable, Iterable

from fastdd.errors import FastddError


class ConfigError(FastddError, ValueError):
    """A config field holds a value it cannot take; the message names the field and its command-line flag."""


@dataclass(frozen=True)
class OptionInfo:
    """What a field's :func:`option` declared beyond its default.

    Attributes:
        help: one or more sentences for ``--help`` (without the default: that is added from the field).
        panel: the ``--help`` panel the flag is listed in (the concern: "Data", "Trust", ...).
        choices: the allowed values of a string field (compared after :func:`normalize_choice`), or None; a
            zero-argument callable returning them where the list lives in a heavier module (read when needed).
        at_least, above, at_most, below: bounds of a number (inclusive / exclusive), or None.
        flag: the flag (default ``--field-name``); for a bool ``"--on/--off"``.
        default_text: how ``--help`` shows a default of None (e.g. "by IPC"); None shows nothing.
        split: a string field that takes a comma-separated list (``--ood a,b`` or repeated ``--ood a --ood b``).
        recorded_at_default: False for an option added after runs were recorded: a run's settings record omits it
            while it has its default, so the runs recorded before it still resume.
        words: a number field that also takes these words in place of a number (``--mask-ratio auto``).
    """

    help: str
    panel: str
    choices: tuple[str, ...] | Callable[[], Iterable[str]] | None = None
    at_least: float | None = None
    above: float | None = None
    at_most: float | None = None
    below: float | None = None
    flag: str | None = None
    default_text: str | None = None
    split: bool = False
    recorded_at_default: bool = True
    words: tuple[str, ...] = ()


_INFO = "fastdd"


class Section:
    """Base of every config dataclass: a config is checked (:func:`check_config`) as it is made, so one that exists
    is valid."""

    def __post_init__(self) -> None:
        check_config(self)


def option(
    default: Any = dataclasses.MISSING,
    help: str = "",
    *,
    panel: str,
    default_factory: Callable[[], Any] | Any = dataclasses.MISSING,
    **info: Any,
) -> Any:
    """A dataclass field with its command-line description and checks (see :class:`OptionInfo` for ``info``)."""
    metadata = {_INFO: OptionInfo(help=help, panel=panel, **info)}
    if default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def redefault(section: type, name: str, default: Any, **info: Any) -> Any:
    """The field ``name`` of ``section`` again with another default (and optionally other info), for a subclass
    that changes a default: ``iterations: int = redefault(DistillConfig, "iterations", 20000)``."""
    old = info_of(field_of(section, name))
    return dataclasses.field(default=default, metadata={_INFO: dataclasses.replace(old, **info)})


def field_of(config: type | Any, name: str) -> dataclasses.Field:
    for f in dataclasses.fields(config):
        if f.name == name:
            return f
    raise KeyError(name)


def info_of(f: dataclasses.Field) -> OptionInfo:
    """The :class:`OptionInfo` of a field made by :func:`option`."""
    try:
        return f.metadata[_INFO]
    except KeyError:
        raise TypeError(f"field {f.name!r} was not declared with fastdd.config.option()") from None


def flag_of(f: dataclasses.Field) -> str:
    """The flag that sets the field, e.g. ``--lr-img`` (the first of a bool's ``--on/--off`` pair)."""
    flag = info_of(f).flag
    return flag.split("/")[0] if flag else "--" + f.name.replace("_", "-")


def normalize_choice(value: str) -> str:
    """The spelling choices are compared in: lower case, ``_`` as ``-`` (``Fashion_MNIST`` -> ``fashion-mnist``)."""
    return value.strip().lower().replace("_", "-")


def field_types(config: type | Any) -> dict[str, Any]:
    """The resolved annotation of every field of ``config`` (a class or an instance)."""
    cls = config if isinstance(config, type) else type(config)
    return typing.get_type_hints(cls)


def base_type(annotation: Any) -> tuple[type, bool]:
    """``(int, True)`` for ``int | None``; ``(str, False)`` for ``str``. Lists are not option types."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) != 1:
            raise TypeError(f"an option must have one type (or that type | None), got {annotation}")
        return args[0], True
    return annotation, False


def choices_of(f: dataclasses.Field) -> tuple[str, ...] | None:
    """The allowed values of a string field, or None when any string goes."""
    choices = info_of(f).choices
    return tuple(choices()) if callable(choices) else choices


def field_error(f: dataclasses.Field, problem: str) -> ConfigError:
    """``--flag PROBLEM (config field NAME).``: the one sentence every config error has."""
    return ConfigError(f"{flag_of(f)} {problem} (config field {f.name}).")


def _check_value(f: dataclasses.Field, expected: type, value: Any) -> Any:
    """``value`` checked against the field's type and :class:`OptionInfo`; returns it normalised (choices' spelling,
    ints given as floats); raises ConfigError naming the field."""
    info = info_of(f)
    if info.words and isinstance(value, str):
        if normalize_choice(value) in info.words:
            return normalize_choice(value)
        raise field_error(f, f"must be a number or {' or '.join(info.words)}, got {value!r}")
    if expected is bool:
        if not isinstance(value, bool):
            raise field_error(f, f"must be true or false, got {value!r}")
        return value
    if expected is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                value = int(value)
            else:
                raise field_error(f, f"must be a whole number, got {value!r}")
    elif expected is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise field_error(f, f"must be a number, got {value!r}")
        value = float(value)
        if not math.isfinite(value):
            raise field_error(f, f"must be a finite number, got {value}")
    elif expected is str:
        if not isinstance(value, str):
            raise field_error(f, f"must be text, got {value!r}")
        choices = choices_of(f)
        if choices is not None:
            canonical = {normalize_choice(c): c for c in choices}
            parts = [v for v in value.split(",") if v.strip()] if info.split else [value]
            for part in parts:
                if normalize_choice(part) not in canonical:
                    raise field_error(f, f"must be one of {', '.join(choices)}, got {part.strip()!r}")
            value = ",".join(canonical[normalize_choice(part)] for part in parts)
    bounds = (
        (info.at_least, lambda v, b: v >= b, "at least"),
        (info.above, lambda v, b: v > b, "greater than"),
        (info.at_most, lambda v, b: v <= b, "at most"),
        (info.below, lambda v, b: v < b, "less than"),
    )
    for bound, ok, words in bounds:
        if bound is not None and not ok(value, bound):
            shown = int(bound) if float(bound).is_integer() else bound
            raise field_error(f, f"must be {words} {shown}, got {value}")
    return value


def check_config(config: Any) -> Any:
    """Check every field of the dataclass ``config`` against its declaration, normalise choices in place, then run
    ``config.check_fields()`` (rules spanning fields) when the class defines it; returns ``config``.

    Raises:
        ConfigError: the first field that is wrong, named with its flag.
    """
    types_ = field_types(config)
    for f in dataclasses.fields(config):
        if f.metadata.get(_INFO) is None:
            continue
        value = getattr(config, f.name)
        expected, optional = base_type(types_[f.name])
        if value is None:
            if not optional:
                raise field_error(f, "needs a value")
            continue
        object.__setattr__(config, f.name, _check_value(f, expected, value))
    for cls in reversed(type(config).__mro__):
        rule = cls.__dict__.get("check_fields")
        if rule is not None:
            rule(config)
    return config


def option_fields(config: type | Any) -> list[dataclasses.Field]:
    """The fields of ``config`` declared with :func:`option`, in declaration order."""
    return [f for f in dataclasses.fields(config) if _INFO in f.metadata]


def from_options(cls: type, options: dict[str, Any], *, context: str) -> Any:
    """``cls(**options)`` for a dataclass, None values meaning "use the default", then :func:`check_config`.

    Raises:
        ConfigError: a key is not a field of ``cls`` (``context`` says what took the options), or a value is wrong.
    """
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(k for k, v in options.items() if k not in known and v is not None)
    if unknown:
        flags = ", ".join(f"--{k.replace('_', '-')} (config field {k})" for k in unknown)
        raise ConfigError(f"option(s) {flags} do not apply to {context}; it accepts: "
                          f"{', '.join(sorted('--' + k.replace('_', '-') for k in known))}.")
    return check_config(cls(**{k: v for k, v in options.items() if v is not None}))


def recorded_settings(config: Any) -> dict[str, Any]:
    """``dataclasses.asdict(config)`` without the options that are not recorded at their default."""
    values = dataclasses.asdict(config)
    for f in option_fields(config):
        if not info_of(f).recorded_at_default and values[f.name] == f.default:
            del values[f.name]
    return values


def pick(section: type, config: Any) -> Any:
    """The ``section`` part of a config composed from sections: ``section(**its fields of config)``; a field the
    config does not have keeps the section's default."""
    return section(**{f.name: getattr(config, f.name) for f in dataclasses.fields(section) if hasattr(config, f.name)})
