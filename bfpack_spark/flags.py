"""The config model's command-line surface: how each field is given as a flag, its value parsed from a
string, and the settings reference the docs site renders. Here, beside the model (``config.py``), so
that the parser of ``bfpack pack`` and the docs page are made from the same fields and cannot disagree.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Literal, get_args, get_origin

import yaml

from bfpack_spark.config import ConfigError, field_specs


def flag_kind(hint: Any) -> tuple[str, str | None, list | None]:
    """How a field of type ``hint`` is given on the command line: (``switch`` (--x / --no-x), ``repeated``
    (one value per flag, collected) or ``value``; its metavar; its choices). The CLI's parser and the
    settings page both ask here, so they cannot disagree."""
    args = get_args(hint)
    if hint is bool or (bool in args and type(None) in args):
        return "switch", None, None
    if get_origin(hint) in (list, dict):
        return "repeated", "PATH" if get_origin(hint) is list else "KEY=VALUE", None
    base = next((a for a in args if a is not type(None)), hint) if get_origin(hint) is not Literal else hint
    if get_origin(base) is Literal:
        return "value", None, list(get_args(base))
    return "value", {int: "N", float: "X"}.get(base, "TEXT"), None


def flag_form(flag: str, hint: Any) -> str:
    """How a field is given on the command line: ``--seq-len N``, ``--append-eos / --no-append-eos``."""
    kind, metavar, choices = flag_kind(hint)
    if kind == "switch":
        return f"--{flag} / --no-{flag}"
    return f"--{flag} {'|'.join(map(str, choices)) if choices else metavar}"


def shown_default(f: dataclasses.Field) -> str | None:
    """A field's default as the docs and ``--help`` show it (YAML-like: ``2048``, ``null``, ``[]``), or
    None for a field without one."""
    default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
    if default is dataclasses.MISSING:
        return None
    return default if isinstance(default, str) else json.dumps(default)


def settings_markdown() -> str:
    """The settings reference, one row per field of the config model: the docs site renders it from
    here, so the page and ``bfpack pack --help`` cannot disagree."""
    rows = ["| setting | flag | default | meaning |", "| --- | --- | --- | --- |"]
    for section, flag, f, hint in field_specs():
        default = shown_default(f)
        meaning = f.metadata["help"].replace("|", "\\|")
        shown = "" if default is None else f"`{default}`"
        rows.append(f"| `{section}.{f.name}` | `{flag_form(flag, hint)}` | {shown} | {meaning} |")
    return "\n".join(rows) + "\n"


def coerce_value(name: str, raw: str, hint: Any) -> Any:
    """A command-line string as the field's type (YAML scalars: 4096, 0.5, true, null)."""
    if type(None) in get_args(hint) and raw.lower() in ("null", "none", ""):
        return None
    base = next((a for a in get_args(hint) if a is not type(None)), hint) if get_origin(hint) is not Literal else hint
    if base is str or get_origin(base) is Literal:
        return raw
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{name}: cannot parse {raw!r}: {exc}") from None
    if value is None:  # '' or 'null' for a setting that must have a value
        raise ConfigError(f"{name}: expected {'an integer' if base is int else 'a value'}, got {raw!r}")
    return value
