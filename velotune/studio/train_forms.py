"""The Train page's form, generated from the one configuration schema (velotune/config.py): the fields it shows
(`form_schema`), the checks of what the user typed (`validate_form`) and the way to and from a YAML file that
`velotune train` reads (`form_to_yaml`, `yaml_to_form`).

The page sends a flat dict of dotted keys as written in YAML ("train.lr", "lora.r", "objective"). Values may be
typed JSON (numbers, booleans, lists, null) or the text of an input box. Text is read the way the YAML loader
would read it after `key: `, with two exceptions that suit a form: a field that takes text (or this exact word
among its choices) keeps the text as typed, and an empty box of a field that may be null means null. Every check
is the schema's own (`load_config`), so an error says exactly what the same value in a YAML file would, without
the file and line in front.
"""
from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, Union

from ..config import Config, _alias_target, _resolve_aliases, load_config, sections, top_level_keys
from ..errors import ConfigError

# Training cannot start without these, although the schema has defaults for them (plan_run and the data reader
# refuse the empty default); validate_form(complete=True) reports them.
REQUIRED = {"model.path": "model.path: required (a Hugging Face model directory or hub id)",
            "data.path": "data.path: required (a jsonl, json, csv, tsv or parquet file, a folder, or a list)"}

# The objectives each objective-specific section is read by (None: every objective), so the page can hide a
# section that the chosen objective ignores. grpo reads preference.reference as well.
SECTION_OBJECTIVES = {"preference": ["dpo", "orpo", "simpo", "kto", "grpo"], "grpo": ["grpo"],
                      "embedding": ["contrastive", "mnrl", "triplet", "cosent"],
                      "speech": ["asr", "speech-recognition"], "tts": ["tts"]}

_FORM_ORIGIN = "<dict>"  # what load_config puts before its messages for a dict: not a place the user can look at


# ---- the schema as form fields ---------------------------------------------------------------------------------

def form_schema() -> dict:
    """The form, read from the schema: {"top_level": [field], "sections": [{"name", "help", "objectives",
    "fields": [field]}], "keys": [every dotted key, in order]}. A field: {"key", "section", "name", "type",
    "types", "nullable", "type_text", "default", "help", "choices", "suggestions", "bound", "required",
    "comma_list"}."""
    section_help = {f.name: f.metadata.get("help", "") for f in dataclasses.fields(Config)}
    top = [_field_entry(None, f, hint) for f, hint in _fields_with_hints(Config, top_level_keys())]
    out_sections = []
    for name, cls in sections().items():
        fields = [_field_entry(name, f, hint) for f, hint in _fields_with_hints(cls, dataclasses.fields(cls))]
        out_sections.append({"name": name, "help": section_help[name], "objectives": SECTION_OBJECTIVES.get(name),
                             "fields": fields})
    keys = [f["key"] for f in top] + [f["key"] for s in out_sections for f in s["fields"]]
    return {"top_level": top, "sections": out_sections, "keys": keys}


def _fields_with_hints(cls, fields):
    hints = typing.get_type_hints(cls)
    return [(f, hints[f.name]) for f in fields]


def _field_entry(section: str | None, f: dataclasses.Field, hint) -> dict:
    from ..config_help import type_text
    kinds, choices, nullable = _kinds(hint)
    key = f"{section}.{f.name}" if section else f.name
    if key == "objective":
        # A plain string in the schema, checked against the registry when a run starts (make_objective).
        from ..training.objectives import objective_names
        choices = objective_names()
    bound = f.metadata.get("bound")
    return {"key": key, "section": section, "name": f.name, "type": "|".join(kinds), "types": kinds,
            "nullable": nullable, "type_text": type_text(hint), "default": _json_safe(_default(f)),
            "help": f.metadata.get("help", ""), "choices": choices, "suggestions": _suggestions(key),
            "bound": _bound_entry(bound) if bound is not None else None, "required": key in REQUIRED,
            "comma_list": bool(f.metadata.get("comma_list"))}


def _kinds(hint) -> tuple[list[str], list | None, bool]:
    """(the kinds of value a field takes, its fixed choices or None, whether null is allowed)."""
    kinds, choices, nullable = [], [], False
    for part in _flat_union(hint):
        if part is type(None):
            nullable = True
        elif typing.get_origin(part) is Literal:
            words = typing.get_args(part)
            nullable = nullable or None in words
            choices += [w for w in words if w is not None]
            kinds.append("choice")
        else:
            kinds.append(_KIND_NAMES.get(typing.get_origin(part) or part, "any"))
    if "choice" in kinds and "bool" in kinds:
        # e.g. gradient_checkpointing: false | true | offload reads best as one list of three choices
        kinds.remove("bool")
        choices = [False, True] + choices
    return list(dict.fromkeys(kinds)), (choices or None), nullable


_KIND_NAMES = {bool: "bool", int: "int", float: "float", str: "str", list: "list", dict: "dict", Any: "any"}


def _flat_union(hint) -> list:
    if typing.get_origin(hint) in (Union, types.UnionType):
        return [leaf for arg in typing.get_args(hint) for leaf in _flat_union(arg)]
    return [hint]


def _suggestions(key: str) -> list | None:
    """Common values of a free-text field (the page may offer them; others are allowed)."""
    if key == "data.chat_template":
        from ..data.templates import template_names
        return template_names()
    return None


def _bound_entry(bound) -> dict:
    return {"low": bound.low, "high": bound.high, "low_open": bound.low_open, "high_open": bound.high_open,
            "count": bound.count, "text": str(bound)}


def _default(f: dataclasses.Field):
    return f.default_factory() if f.default is dataclasses.MISSING else f.default


def _json_safe(value):
    return json.loads(json.dumps(value))


def _schema_fields() -> dict[str, tuple[dataclasses.Field, Any]]:
    """Dotted key -> (its dataclass field, its type hint), in schema order."""
    out = {f.name: (f, hint) for f, hint in _fields_with_hints(Config, top_level_keys())}
    for name, cls in sections().items():
        out.update({f"{name}.{f.name}": (f, hint) for f, hint in _fields_with_hints(cls, dataclasses.fields(cls))})
    return out


# ---- what the page sends -> the values a YAML file would hold ------------------------------------------------------

def form_values(values: dict) -> dict:
    """The page's values as the YAML loader would hold them (text read as YAML where the field does not take
    text; see the module docstring). Keys are kept as given."""
    known = _schema_fields()
    return {key: _value_for(known.get(_canonical(key)), value) for key, value in values.items()}


def _canonical(key: str) -> str:
    """A transformers / PEFT name (learning_rate, lora.lora_alpha) as our dotted key; others as given."""
    parts = tuple(str(key).split("."))
    target = _alias_target(parts)
    return ".".join(target) if target else str(key)


def _value_for(known, value):
    if known is None or not isinstance(value, str):
        return value
    kinds, choices, nullable = _kinds(known[1])
    if nullable and not value.strip():
        return None
    if "str" in kinds or value in (choices or ()):
        return value
    import yaml
    try:
        parsed = yaml.safe_load(value)
    except yaml.YAMLError:
        return value
    if isinstance(parsed, str) and "float" in kinds:
        try:  # YAML 1.1 reads 1e-4 as text; the schema reads it as the number (config._typed)
            return float(parsed)
        except ValueError:
            pass
    return parsed


def nested(values: dict) -> dict:
    """Flat dotted keys -> the nested mapping of a YAML file, in schema order (keys the schema does not know
    last, as given). Values are taken as they are (see form_values)."""
    order = {key: i for i, key in enumerate(_schema_fields())}
    ranked = sorted(values, key=lambda k: order.get(_canonical(k), len(order)))
    out: dict = {}
    for key in ranked:
        _put(out, str(key), values[key])
    return out


def _put(out: dict, key: str, value):
    parts = key.split(".")
    holder = out
    for part in parts[:-1]:
        if holder.get(part) is None:
            holder[part] = {}
        holder = holder[part]
        if not isinstance(holder, dict):
            raise ConfigError(f"'{key}': '{part}' is not a section")
    holder[parts[-1]] = value


# ---- checking ------------------------------------------------------------------------------------------------------

@dataclass
class FormCheck:
    config: Config | None                             # the config the values make; None when any is wrong
    errors: list[dict] = field(default_factory=list)  # [{"field": dotted key as sent ("" : the whole form), "message"}]

    @property
    def ok(self) -> bool:
        return not self.errors

    def as_dict(self) -> dict:
        """JSON-safe: {"ok", "errors", "config" (nested dict or None)}."""
        return {"ok": self.ok, "errors": self.errors,
                "config": _json_safe(self.config.to_dict()) if self.config is not None else None}


def validate_form(values: dict, *, complete: bool = False) -> FormCheck:
    """Checks the form's values: each field alone on top of the defaults, then the good ones together with what
    `velotune train` checks of a whole config before anything loads (a known objective, settings that cannot go
    together), so that every bad field is reported at once. `complete=True`: the fields a run needs must be set."""
    errors, good = [], {}
    known = _schema_fields()
    for key, value in values.items():
        try:
            typed = _value_for(known.get(_canonical(key)), value)
            load_config(nested({key: typed}))
        except ConfigError as exc:
            errors.append({"field": key, "message": _message(exc)})
        else:
            good[key] = typed
    if complete:
        given = {_canonical(k): v for k, v in good.items()}
        errors += [{"field": key, "message": text} for key, text in REQUIRED.items()
                   if key not in {_canonical(e["field"]) for e in errors} and not given.get(key)]
    try:
        config = load_config(nested(good))
    except ConfigError as exc:  # e.g. a transformers name and our own both set one key
        message = _message(exc)
        return FormCheck(None, errors + [{"field": _field_named(message, good), "message": message}])
    errors += _whole_config_errors(config)
    return FormCheck(None if errors else config, errors)


def _whole_config_errors(config: Config) -> list[dict]:
    from ..training.model_setup import check_settings
    from ..training.objectives import make_objective
    errors = []
    for key, check in (("objective", lambda: make_objective(config.objective)),
                       ("finetune.method", lambda: check_settings(config))):
        try:
            check()
        except ConfigError as exc:
            errors.append({"field": key, "message": str(exc)})
    return errors


def _message(exc: ConfigError) -> str:
    return str(exc).removeprefix(f"{_FORM_ORIGIN}: ")


def _field_named(message: str, values: dict) -> str:
    """The first key of the form quoted in the message ("" when none is: the form as a whole)."""
    quoted = [key for key in values if f"'{key}'" in message]
    return min(quoted, key=message.index) if quoted else ""


# ---- YAML ----------------------------------------------------------------------------------------------------------

def form_to_yaml(values: dict) -> str:
    """A YAML config of the given keys only, nested by section in schema order, that `velotune train` reads."""
    import yaml
    data = nested(form_values(values))
    return yaml.safe_dump(data, sort_keys=False, default_flow_style=False, allow_unicode=True)


def yaml_to_form(text: str, origin: str = "<yaml>") -> dict:
    """A YAML config's values as the form's dotted keys (transformers / PEFT names read as ours, as the loader
    does). Invalid YAML, a top level that is not a mapping, or two names for one key are ConfigErrors naming
    `origin` and the line; the values themselves are checked by validate_form."""
    import yaml
    try:
        data = yaml.load(text, Loader=_NoAliasLoader())
    except RecursionError:
        raise ConfigError(f"{origin}: nested too deeply") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{origin}:{where}: invalid YAML: {getattr(exc, 'problem', exc)}") from None
    data = data or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{origin}: the top level must be a mapping of sections (model, lora, data, train, ...)")
    _resolve_aliases(data, origin, {})
    out = {}
    for key, value in data.items():
        if key in sections() and isinstance(value, dict):
            out.update({f"{key}.{name}": item for name, item in value.items()})
        elif not (key in sections() and value is None):  # `train:` with nothing under it sets nothing
            out[str(key)] = value
    return out


def _NoAliasLoader():
    """A safe YAML loader that refuses anchors and aliases: a few hundred bytes of nested aliases expand to
    millions of values (a config needs none)."""
    import yaml

    class NoAliasLoader(yaml.SafeLoader):
        def compose_node(self, parent, index):
            if self.check_event(yaml.AliasEvent):
                event = self.peek_event()
                raise yaml.composer.ComposerError(None, None, "YAML aliases (*name) are not accepted here",
                                                  event.start_mark)
            return super().compose_node(parent, index)
    return NoAliasLoader
