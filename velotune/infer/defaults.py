"""Where each generation setting comes from.

Every setting is taken from the first of these that gives it a value (None means "not given"):

1. the request (the arguments of `vt.generate`, a chat command, a server request);
2. the user's config (a mapping or object, or its `generation` section);
3. the model's `generation_config.json` (in `model.source_dir`). Its sampling values (temperature, top_k,
   top_p, min_p) count only with `"do_sample": true`, as in transformers; `"do_sample": false` means greedy
   (temperature 0). `max_new_tokens` and `repetition_penalty` count either way;
4. velotune's small per-family table below (`FAMILY_DEFAULTS`), for checkpoints that say nothing;
5. the global defaults (`GLOBAL_DEFAULTS`).

`resolve_sampling` returns the values, the source of each value, and the `SamplingParams` they make; the chat
CLI prints `describe()`. End-of-sequence ids are not a setting: generation stops on all of them
(`eos_token_ids`).
"""
from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from .sampling import FIELDS, SamplingParams

log = logging.getLogger("velotune")

GENERATION_CONFIG = "generation_config.json"
# The context (prompt + new tokens) a server holds requests to when the model states none.
DEFAULT_CONTEXT_LENGTH = 4096

GLOBAL_DEFAULTS: dict[str, Any] = dict(
    max_new_tokens=512,
    temperature=0.7,
    top_k=0,
    top_p=0.9,
    min_p=0.0,
    repetition_penalty=1.0,
    presence_penalty=0.0,
    frequency_penalty=0.0,
    seed=None,
    stop=[],
    stop_token_ids=[],
    ignore_eos=False,
)

# Sampling settings each family's makers recommend for their chat models, used when the checkpoint's
# generation_config.json gives none. Only sampling shape lives here: nothing that changes greedy output.
FAMILY_DEFAULTS: dict[str, dict[str, Any]] = {
    "llama": dict(temperature=0.6, top_p=0.9),                      # Llama 3.x instruct
    "mistral": dict(temperature=0.7, top_p=1.0),
    "qwen2": dict(temperature=0.7, top_p=0.8, top_k=20),            # Qwen2 / 2.5 instruct
    "qwen3": dict(temperature=0.6, top_p=0.95, top_k=20, min_p=0.0),  # Qwen3 (thinking mode)
    "gemma": dict(temperature=1.0, top_p=0.95, top_k=64),
    "gemma2": dict(temperature=1.0, top_p=0.95, top_k=64),
    "phi3": dict(temperature=0.0),                                  # Phi-3 cards decode greedily
}

SAMPLING_FROM_GENERATION_CONFIG = ("temperature", "top_k", "top_p", "min_p")
ALWAYS_FROM_GENERATION_CONFIG = ("max_new_tokens", "repetition_penalty")

SOURCE_REQUEST = "request"
SOURCE_CONFIG = "config"
SOURCE_GENERATION_CONFIG = GENERATION_CONFIG
SOURCE_DEFAULT = "default"


def source_family(model_type: str) -> str:
    return f"family ({model_type})"


@dataclass
class ResolvedSampling:
    values: dict
    sources: dict

    def params(self) -> SamplingParams:
        return SamplingParams(**self.values)

    def describe(self, keys=None) -> str:
        """One line per setting: `temperature = 0.6   (generation_config.json)`."""
        keys = keys or [k for k in FIELDS if k in self.values]
        width = max(len(k) for k in keys)
        return "\n".join(f"{k:<{width}} = {self.values[k]!r}   ({self.sources[k]})" for k in keys)

    def __iter__(self):  # values, sources = resolve_sampling(...)
        yield self.values
        yield self.sources


def resolve_sampling(request=None, user_config=None, model=None, *, generation_config: dict | None = None,
                     model_type: str | None = None) -> ResolvedSampling:
    """Resolves every `SamplingParams` field through request > config > generation_config.json > family > global.

    `generation_config` and `model_type` default to what `model` carries; pass them to resolve without a model.
    """
    if generation_config is None:
        generation_config = read_generation_config(model)
    if model_type is None:
        model_type = model_type_of(model)
    layers = [
        (SOURCE_REQUEST, _as_settings(request, "request")),
        (SOURCE_CONFIG, _as_settings(_generation_section(user_config), "config")),
        (SOURCE_GENERATION_CONFIG, from_generation_config(generation_config)),
        (source_family(model_type), dict(FAMILY_DEFAULTS.get(model_type or "", {}))),
        (SOURCE_DEFAULT, GLOBAL_DEFAULTS),
    ]
    values, sources = {}, {}
    for key in FIELDS:
        for source, settings in layers:
            if settings.get(key) is not None:
                values[key], sources[key] = settings[key], source
                break
        else:
            values[key], sources[key] = None, SOURCE_DEFAULT
    values["stop"] = list(values["stop"]) if not isinstance(values["stop"], str) else [values["stop"]]
    return ResolvedSampling(values, sources)


def from_generation_config(generation_config: dict | None) -> dict:
    """The settings a generation_config.json gives, with transformers' meaning of `do_sample`."""
    gc = generation_config or {}
    out = {k: gc[k] for k in ALWAYS_FROM_GENERATION_CONFIG if gc.get(k) is not None}
    if gc.get("do_sample") is True:
        out.update({k: gc[k] for k in SAMPLING_FROM_GENERATION_CONFIG if gc.get(k) is not None})
    elif gc.get("do_sample") is False:
        out["temperature"] = 0.0
    if out.get("top_k") is not None:
        out["top_k"] = int(out["top_k"])
    return out


# ---- what the model carries ------------------------------------------------------------------------------

def read_generation_config(model) -> dict:
    """generation_config.json from `model.source_dir` (a velotune model, or None); else {}."""
    if model is None or model.source_dir is None:
        return {}
    path = Path(model.source_dir) / GENERATION_CONFIG
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        log.warning("%s: cannot read (%s); ignoring it", path, exc)
        return {}
    return data if isinstance(data, dict) else {}


def model_type_of(model) -> str | None:
    return model.args.model_type if model is not None else None


def _ids(value) -> list[int]:
    if value is None:
        return []
    if isinstance(value, int):
        return [value]
    if isinstance(value, (list, tuple)):
        return [int(v) for v in value if isinstance(v, int)]
    return []


def eos_token_ids(model=None, tokenizer=None, generation_config: dict | None = None, extra=()) -> list[int]:
    """Every id that ends generation: the tokenizer's EOS, generation_config.json's eos_token_id (int or
    list), config.json's eos_token_id, and `extra`; in that order, without repeats."""
    if generation_config is None:
        generation_config = read_generation_config(model)
    found = []
    if tokenizer is not None:
        found += _ids(getattr(tokenizer, "eos_token_id", None))
    found += _ids(generation_config.get("eos_token_id"))
    found += _ids(model.args.eos_token_id if model is not None else None)
    found += _ids(list(extra))
    return list(dict.fromkeys(found))


# ---- reading the request and the user's config ------------------------------------------------------------

def _generation_section(user_config):
    """The user's config itself, or its `generation` section when it has one."""
    if user_config is None:
        return None
    if isinstance(user_config, dict):
        if "generation" in user_config:
            return user_config["generation"]
        if any(k in _CONFIG_SECTIONS for k in user_config):  # a whole config with no generation section
            return None
        return user_config
    section = getattr(user_config, "generation", None)
    return section if section is not None else user_config


_CONFIG_SECTIONS = ("model", "finetune", "lora", "data", "train", "serve", "export")


def _as_settings(obj, what: str) -> dict:
    if obj is None:
        return {}
    if isinstance(obj, SamplingParams):
        return dataclasses.asdict(obj)
    if dataclasses.is_dataclass(obj):
        data = {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}
        return {k: v for k, v in data.items() if k in FIELDS}
    if not isinstance(obj, dict):
        return {k: getattr(obj, k) for k in FIELDS if hasattr(obj, k)}
    unknown = [k for k in obj if k not in FIELDS]
    if unknown:
        where = "" if what == "request" else f"{what}: "
        raise ConfigError(f"{where}unknown generation setting(s) {', '.join(map(repr, unknown))}; "
                          f"known: {', '.join(FIELDS)}")
    return dict(obj)
