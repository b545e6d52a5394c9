"""The one configuration schema: YAML files, `key=value` overrides, Python dicts and objects.

Sections are dataclasses; validation walks their type hints, so an unknown key or a wrong type is an
error that names the key, the file and (for YAML) the line.
"""
from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

from .errors import ConfigError


@dataclass
class ModelConfig:
    path: str = ""                                   # local Hugging Face directory or hub id
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    quantize: Literal[None, "nf4", "int8"] = None
    device: str | None = None
    max_seq_length: int | None = None


@dataclass
class LoraConfig:
    r: int = 16
    alpha: float = 16.0
    dropout: float = 0.0
    targets: Union[str, list] = "all-linear"        # "all-linear" or module names such as [q_proj, v_proj]
    rslora: bool = False
    dora: bool = False
    modules_to_save: list = field(default_factory=list)


@dataclass
class FinetuneConfig:
    method: Literal["lora", "full"] = "lora"        # QLoRA is lora with model.quantize: nf4
    freeze_embeddings: bool = False                   # full fine-tuning: keep embeddings and lm_head fixed
    train_last_n_layers: int | None = None           # full fine-tuning: train only the last N blocks


@dataclass
class DataConfig:
    path: Union[str, list, None] = None              # jsonl / json / csv / parquet file(s)
    format: Literal["auto", "alpaca", "sharegpt", "messages", "prompt_completion", "text"] = "auto"
    chat_template: str | None = None                 # built-in name; default: the tokenizer's template
    system_prompt: str | None = None
    train_on: Literal["assistant", "all"] = "assistant"  # loss on assistant turns only, or on every token
    max_seq_length: int | None = None                # default: model.max_seq_length, else 2048
    overflow: Literal["truncate", "drop"] = "truncate"
    packing: bool = True
    eval_path: Union[str, list, None] = None
    eval_fraction: float = 0.0                       # held out from `path` when no eval_path is given
    max_samples: int | None = None
    shuffle: bool = True


@dataclass
class TrainConfig:
    output_dir: str = "runs/velotune"
    overwrite: bool = False
    resume: bool = False
    seed: int = 42
    epochs: float = 1.0
    max_steps: int | None = None                     # optimizer steps; overrides epochs when set
    batch_size: int = 4
    grad_accum: int = 1
    lr: float = 2e-4
    weight_decay: float = 0.0
    betas: list = field(default_factory=lambda: [0.9, 0.999])
    optimizer: Literal["adamw", "adamw8bit"] = "adamw"
    scheduler: Literal["linear", "cosine", "constant"] = "linear"
    warmup_steps: int = 0
    warmup_ratio: float = 0.0
    max_grad_norm: float | None = 1.0
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    gradient_checkpointing: Union[bool, Literal["offload"]] = False  # "offload": block inputs kept on the CPU
    save_every: int | None = None                    # optimizer steps between checkpoints
    keep_last: int = 2
    eval_every: int | None = None
    log_every: int = 1
    report_to: list = field(default_factory=list)     # "tensorboard", "wandb"
    progress: bool = True
    distributed: Literal["none", "ddp", "fsdp2"] = "none"


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ---- building and validating -----------------------------------------------------------------------------

def load_config(source, overrides=None) -> Config:
    """A Config from a YAML path, a dict or a Config, with `key=value` overrides applied."""
    if isinstance(source, Config):
        data, origin, lines = source.to_dict(), "<Config>", {}
    elif isinstance(source, dict):
        data, origin, lines = source, "<dict>", {}
    else:
        data, origin, lines = _read_yaml(Path(source))
    for item in overrides or []:
        _apply_override(data, item)
    return _build(Config, data, origin, lines, ())


def _read_yaml(path: Path):
    import yaml
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    text = path.read_text(encoding="utf-8")
    try:
        data = yaml.safe_load(text) or {}
        node = yaml.compose(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}:{where}: invalid YAML: {getattr(exc, 'problem', exc)}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections (model, lora, data, train, ...)")
    return data, str(path), _key_lines(node, ())


def _key_lines(node, prefix) -> dict:
    """Maps each dotted key path to its 1-based line in the YAML file."""
    import yaml
    lines = {}
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            path = prefix + (str(key_node.value),)
            lines[".".join(path)] = key_node.start_mark.line + 1
            lines.update(_key_lines(value_node, path))
    return lines


def _apply_override(data: dict, item: str):
    import yaml
    if "=" not in item:
        raise ConfigError(f"override '{item}': expected key=value, e.g. lora.r=32")
    key, _, raw = item.partition("=")
    parts = key.strip().split(".")
    target = data
    for part in parts[:-1]:
        target = target.setdefault(part, {})
        if not isinstance(target, dict):
            raise ConfigError(f"override '{item}': '{part}' is not a section")
    try:
        target[parts[-1]] = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        target[parts[-1]] = raw


def _where(origin, lines, path) -> str:
    key = ".".join(path)
    line = lines.get(key)
    return f"{origin}:{line}" if line else origin


def _build(cls, data, origin, lines, path):
    if not isinstance(data, dict):
        raise ConfigError(f"{_where(origin, lines, path)}: '{'.'.join(path)}' must be a mapping")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        sub = path + (str(key),)
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else f"; known keys: {', '.join(names)}"
            raise ConfigError(f"{_where(origin, lines, sub)}: unknown key '{'.'.join(sub)}'{hint}")
        kwargs[key] = _check(hints[key], value, origin, lines, sub)
    return cls(**kwargs)


def _check(hint, value, origin, lines, path):
    if dataclasses.is_dataclass(hint):
        return _build(hint, value if value is not None else {}, origin, lines, path)
    if _accepts(hint, value):
        return float(value) if hint is float and isinstance(value, int) else value
    # YAML 1.1 reads `2e-4` (no dot) as a string: numbers written that way are still numbers.
    if isinstance(value, str) and _accepts(hint, 0.0):
        try:
            return float(value)
        except ValueError:
            pass
    raise ConfigError(f"{_where(origin, lines, path)}: '{'.'.join(path)}' = {value!r}: expected {_describe(hint)}")


def _accepts(hint, value) -> bool:
    origin = typing.get_origin(hint)
    if hint is Any:
        return True
    if origin is Literal:
        return value in typing.get_args(hint)
    if origin in (Union, types.UnionType):
        return any(_accepts(h, value) for h in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if origin is list or hint is list:
        return isinstance(value, list)
    if isinstance(hint, type):
        return isinstance(value, hint)
    return True


def _describe(hint) -> str:
    origin = typing.get_origin(hint)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(hint))
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(h) for h in typing.get_args(hint))
    if hint is type(None):
        return "null"
    return getattr(hint, "__name__", str(hint))
