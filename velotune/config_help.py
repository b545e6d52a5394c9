"""`schema_help()`: every configuration key with its type, default, range and one-line help, read from the schema
itself (velotune/config.py), for `velotune config --keys` and the epilog of `velotune train --help`."""
from __future__ import annotations

import dataclasses
import json
import types
import typing
from typing import Literal, Union

from .config import ALIASES, Config, sections, top_level_keys


def schema_help() -> str:
    """The configuration keys, section by section: `section.key: type = default (range)` and its help below."""
    lines = ["Configuration keys (YAML sections; override any as section.key=value, e.g. train.lr=1e-4):"]
    section_help = {f.name: f.metadata.get("help", "") for f in dataclasses.fields(Config)}
    hints = typing.get_type_hints(Config)
    for f in top_level_keys():
        lines += ["", f"{f.name}: {type_text(hints[f.name])} = {_default_text(f)}", f"      {f.metadata.get('help', '')}"]
    for name, cls in sections().items():
        lines += ["", f"{name}: {section_help[name]}"]
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            bound = f.metadata.get("bound")
            limits = f" ({bound})" if bound is not None else ""
            lines.append(f"  {name}.{f.name}: {type_text(hints[f.name])} = {_default_text(f)}{limits}")
            lines.append(f"      {f.metadata.get('help', '')}")
    lines += ["", "Names from transformers and PEFT are read as ours (at the top level or in their section):",
              _wrap(", ".join(f"{alias} -> {ours}" for alias, ours in ALIASES.items()), indent="  ")]
    return "\n".join(lines)


def type_text(hint) -> str:
    """A type hint as users write values: `float or null`, `auto | float32 | bfloat16`."""
    origin = typing.get_origin(hint)
    if origin is Literal:
        return " | ".join("null" if a is None else str(a) for a in typing.get_args(hint))
    if origin in (Union, types.UnionType):
        return " or ".join(type_text(h) for h in typing.get_args(hint))
    if hint is type(None):
        return "null"
    return getattr(hint, "__name__", str(hint))


def _default_text(f: dataclasses.Field) -> str:
    value = f.default_factory() if f.default is dataclasses.MISSING else f.default
    return json.dumps(value)


def _wrap(text: str, indent: str, width: int = 110) -> str:
    lines, line = [], indent
    for word in text.split(" "):
        if len(line) + len(word) + 1 > width and line.strip():
            lines.append(line.rstrip())
            line = indent
        line += word + " "
    lines.append(line.rstrip())
    return "\n".join(lines)
