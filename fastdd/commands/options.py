"""The command line derived from the config fields: one Typer option per field, grouped in help panels by concern.

Every derived option defaults to None ("not given"), so a value can come, in order of precedence, from the command
line, from the ``--config`` YAML file, or from the field's default; the help text shows the field's default.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import typing
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

import typer

from fastdd.config.options import (
    base_type,
    choices_of,
    field_types,
    info_of,
    normalize_choice,
    option_fields,
)
from fastdd.errors import FastddError

CONFIG_PANEL = "Output"


def _show(value: Any) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    return str(value)


def default_text(f: dataclasses.Field, owners: dict[str, dataclasses.Field] | None = None) -> str:
    """``(default: X)`` for ``--help``: the field's default, or per owner when owners disagree
    (``dc, dsa 0.1; dm 1.0; mtt, tesla the preset``)."""

    def one(g: dataclasses.Field) -> str | None:
        if g.default is None or g.default is dataclasses.MISSING:
            return info_of(g).default_text
        return _show(g.default)

    if owners:
        by_value: dict[str | None, list[str]] = {}
        for owner, g in owners.items():
            by_value.setdefault(one(g), []).append(owner)
        if len(by_value) > 1:
            parts = [f"{', '.join(names)} {value}" for value, names in by_value.items() if value is not None]
            return f"(default: {'; '.join(parts)})" if parts else ""
    text = one(f)
    return f"(default: {text})" if text is not None else ""


def typer_parameter(f: dataclasses.Field, annotation: Any, owners: dict[str, dataclasses.Field] | None = None
                    ) -> inspect.Parameter:
    """The keyword parameter (a ``typer.Option`` defaulting to None) that sets field ``f``; ``owners`` as in
    :func:`default_text`."""
    info = info_of(f)
    expected, _ = base_type(annotation)
    dashed = f.name.replace("_", "-")
    flag = info.flag or (f"--{dashed}/--no-{dashed}" if expected is bool else f"--{dashed}")
    choices = choices_of(f)
    help_text = " ".join(part for part in (info.help, default_text(f, owners)) if part)
    metavar = None
    if choices and not info.split:
        metavar = "[" + "|".join(choices) + "]"
    elif choices:
        help_text += f" Choices: {', '.join(choices)}."
    if info.words:
        metavar = f"<{expected.__name__}|{'|'.join(info.words)}>"
        default = typer.Option(None, flag, help=help_text, rich_help_panel=info.panel, show_default=False,
                               metavar=metavar, parser=_number_or_word(expected, info.words))
        return inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=Optional[str])
    default = typer.Option(None, flag, help=help_text, rich_help_panel=info.panel, show_default=False, metavar=metavar)
    kind = list[str] if info.split else expected
    return inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=Optional[kind])


def _number_or_word(kind: type, words: tuple[str, ...]) -> Callable[[str], Any]:
    """The parser of a number option that also takes ``words``: the word (normalised) or the number."""

    def parse(text: str) -> Any:
        if normalize_choice(text) in words:
            return normalize_choice(text)
        try:
            return kind(text)
        except ValueError:
            raise typer.BadParameter(f"must be a number or {' or '.join(words)}, got {text!r}.") from None

    return parse


def union_fields(configs: dict[str, type], exclude: Iterable[str] = ()) -> list[tuple[dataclasses.Field, Any, dict]]:
    """The option fields of several configs (e.g. one per method) once each: ``(field, annotation, owners)`` where
    ``owners`` maps each config's name to its version of the field when their defaults differ (else empty)."""
    skip = set(exclude)
    seen: dict[str, tuple[dataclasses.Field, Any, dict]] = {}
    for owner, cls in configs.items():
        types_ = field_types(cls)
        for f in option_fields(cls):
            if f.name not in skip:
                seen.setdefault(f.name, (f, types_[f.name], {}))[2][owner] = f
    result = []
    for f, annotation, owners in seen.values():
        same = len({repr(g.default) for g in owners.values()}) == 1
        result.append((f, annotation, {} if same else owners))
    return result


def with_config_options(*configs: type | dict[str, type], exclude: Iterable[str] = ()) -> Callable:
    """Add one Typer option per config field to a command function, which then receives them in ``**options``.

    ``configs``: dataclasses, or a ``{name: dataclass}`` mapping whose fields are merged (the help shows which
    names a field belongs to when not all have it, and their defaults when they differ).
    """
    fields: list[tuple[dataclasses.Field, Any, dict]] = []
    for config in configs:
        fields += union_fields(config if isinstance(config, dict) else {"": config}, exclude)

    def decorate(command: Callable) -> Callable:
        signature = inspect.signature(command)
        own = [p for p in signature.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
        names = {p.name for p in own}
        derived = [typer_parameter(f, annotation, owners) for f, annotation, owners in fields if f.name not in names]

        @functools.wraps(command)
        def wrapper(**kwargs: Any) -> Any:
            return command(**kwargs)

        parameters = own + derived
        wrapper.__signature__ = signature.replace(parameters=parameters)  # type: ignore[attr-defined]
        hints = typing.get_type_hints(command)
        wrapper.__annotations__ = {p.name: hints.get(p.name, p.annotation) for p in own}
        wrapper.__annotations__.update({p.name: p.annotation for p in derived})
        return wrapper

    return decorate


def config_file_option() -> Any:
    return typer.Option(None, "--config", help="YAML file of these options, by field name (the command line wins).",
                        rich_help_panel=CONFIG_PANEL, show_default=False)


def read_config_file(path: Path | None) -> dict[str, Any]:
    """The options of a YAML ``--config`` file (keys with ``-`` or ``_``), or ``{}`` without one."""
    if path is None:
        return {}
    import yaml

    if not path.is_file():
        raise FastddError(f"the config file {path} does not exist.")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise FastddError(f"the config file {path} is not valid YAML ({exc.__class__.__name__}).") from exc
    if not isinstance(data, dict):
        raise FastddError(f"the config file {path} must be a mapping of option names to values.")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def given_options(config_file: Path | None, options: dict[str, Any]) -> dict[str, Any]:
    """The options set for this command: the ``--config`` file's, overridden by those given on the command line;
    comma lists (``--ood a,b --ood c``) become one comma-separated string."""
    merged = read_config_file(config_file)
    for key, value in options.items():
        if value is None:
            continue
        if isinstance(value, (list, tuple)):
            value = ",".join(item.strip() for part in value for item in str(part).split(",") if item.strip())
        merged[key] = value
    return merged


def split_for(merged: dict[str, Any], *configs: type) -> list[dict[str, Any]]:
    """``merged`` dealt out to ``configs`` by field name (a name several configs have goes to each); a name that no
    config has goes to the first, whose check then names it as an option that does not apply."""
    parts = []
    for cls in configs:
        names = {f.name for f in dataclasses.fields(cls)}
        parts.append({k: v for k, v in merged.items() if k in names})
    claimed = set().union(*parts)
    parts[0].update({k: v for k, v in merged.items() if k not in claimed})
    return parts
