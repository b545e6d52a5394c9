"""The one configuration schema: YAML files, `key=value` overrides, Python dicts and objects.

Sections are dataclasses. Each field is declared with `setting(default, help, bound)`: its one-line help (shown by
`velotune config --keys`) and its numeric range sit beside it. Validation walks the type hints, so an unknown key,
a wrong type or a value out of range is an error that names the key and the file and line, or the override.
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import logging
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

from .config_fields import AT_LEAST_ONE, FRACTION, NON_NEGATIVE, POSITIVE, Bound, is_number, setting
from .config_objectives import (EmbeddingConfig, GRPOConfig, PreferenceConfig, SpeechConfig, TTSConfig,
                                VisionConfig)
from .errors import ConfigError

log = logging.getLogger("velotune")

__all__ = ["ALIASES", "Bound", "Config", "DataConfig", "FinetuneConfig", "GRPOConfig", "LoraConfig", "ModelConfig",
           "PreferenceConfig", "TrainConfig", "load_config", "sections", "setting", "top_level_keys"]


@dataclass
class ModelConfig:
    path: str = setting("", "local Hugging Face model directory, or a hub id (org/name)")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = setting(
        "auto", "weight dtype; auto: bf16 on GPUs; on CPUs a bf16 checkpoint stays bf16 where the CPU multiplies bf16 "
        "natively (AVX512-BF16, AMX), else fp32")
    quantize: Literal[None, "nf4", "int8"] = setting(None, "load the base quantized: nf4 (QLoRA) or int8")
    device: str | None = setting(None, "cpu, cuda, cuda:1 ...; null: cuda when available")
    max_seq_length: int | None = setting(None, "context length; null: the model's max_position_embeddings",
                                         AT_LEAST_ONE)


@dataclass
class FinetuneConfig:
    method: Literal["lora", "full"] = setting(
        "lora", "lora: train adapters (QLoRA: lora with model.quantize nf4); full: train the weights themselves")
    freeze_embeddings: bool = setting(False, "full fine-tuning: keep the embeddings and lm_head fixed")
    train_last_n_layers: int | None = setting(None, "full fine-tuning: train only the last N blocks; null: all",
                                              NON_NEGATIVE)


@dataclass
class LoraConfig:
    r: int = setting(16, "adapter rank", AT_LEAST_ONE)
    alpha: float = setting(16.0, "adapters are scaled by alpha / r (alpha / sqrt(r) with rslora)", POSITIVE)
    dropout: float = setting(0.0, "dropout on the adapters' input while training", FRACTION)
    targets: Union[str, list] = setting(
        "all-linear", "all-linear (every linear but the output head), module names such as [q_proj, v_proj], "
                      "or a regex over full module names")
    rslora: bool = setting(False, "rank-stabilised scaling: alpha / sqrt(r)")
    dora: bool = setting(False, "weight-decomposed LoRA (DoRA): a trained magnitude per output feature")
    modules_to_save: list = setting([], "modules trained in full and saved with the adapter, e.g. [lm_head]",
                                    comma_list=True)


@dataclass
class DataConfig:
    path: Union[str, list, None] = setting(None, "jsonl / json / csv / tsv / parquet file, a folder, or a list")
    format: Literal["auto", "alpaca", "sharegpt", "messages", "prompt_completion", "text"] = setting(
        "auto", "record format; auto: told from the first record's fields")
    chat_template: str | None = setting(
        None, "built-in template (chatml, llama3, alpaca ...), Jinja text or a .jinja file; null: the tokenizer's own")
    system_prompt: str | None = setting(None, "system message added to conversations that have none")
    train_on: Literal["assistant", "all"] = setting("assistant", "loss on assistant turns only, or on every token")
    max_seq_length: int | None = setting(None, "tokens per sample; null: model.max_seq_length, else 2048",
                                         AT_LEAST_ONE)
    overflow: Literal["truncate", "drop"] = setting("truncate", "samples over max_seq_length: cut, or left out")
    packing: bool = setting(True, "pack several samples into each row, without padding")
    padding_free: bool | None = setting(
        None, "without packing: a batch's samples run as rows of documents with the fewest positions (each still "
              "attends only to itself); null: on for velotune's own losses, off for an objective with its own loss")
    eval_path: Union[str, list, None] = setting(None, "held-out file(s) for evaluation")
    eval_fraction: float = setting(0.0, "share of `path` held out for evaluation when no eval_path is given",
                                   FRACTION)
    max_samples: int | None = setting(None, "use only the first N samples; null: all", AT_LEAST_ONE)
    shuffle: bool = setting(True, "shuffle the samples every epoch")


@dataclass
class TrainConfig:
    output_dir: str = setting("runs/velotune", "where checkpoints, metrics and the adapter or model are written")
    overwrite: bool = setting(False, "replace an output_dir that holds another run")
    resume: bool = setting(False, "continue from the last checkpoint in output_dir")
    seed: int = setting(42, "seed of every random choice (data order, initialisation, dropout)",
                        Bound(0, 2 ** 32 - 1))
    epochs: float = setting(1.0, "passes over the data (fractions allowed); max_steps wins when set", POSITIVE)
    max_steps: int | None = setting(None, "optimizer steps; null: as many as epochs take", POSITIVE)
    batch_size: int = setting(4, "rows per micro-batch, per device (samples, without data.packing)", AT_LEAST_ONE)
    grad_accum: int = setting(1, "micro-batches per optimizer step", AT_LEAST_ONE)
    lr: float = setting(2e-4, "peak learning rate", NON_NEGATIVE)
    embedding_lr: float | None = setting(
        None, "peak learning rate of a trained embedding table and output head (continued pre-training, new "
              "tokens; they train in full or as lora.modules_to_save); null: lr", NON_NEGATIVE)
    lora_plus_ratio: float | None = setting(
        None, "LoRA+: the B matrices learn at lr x this ratio (the paper suggests 16); null: the same lr",
        POSITIVE)
    weight_decay: float = setting(0.0, "AdamW weight decay (never on biases and norms)", NON_NEGATIVE)
    betas: list = setting([0.9, 0.999], "AdamW betas [beta1, beta2]", Bound(0, 1, high_open=True, count=2))
    optimizer: Literal["adamw", "adamw8bit"] = setting("adamw", "adamw, or adamw8bit (bitsandbytes 8-bit states)")
    scheduler: Literal["linear", "cosine", "constant"] = setting("linear", "learning-rate decay after warmup")
    warmup_steps: int = setting(0, "optimizer steps of linear warmup; 0: warmup_ratio decides", NON_NEGATIVE)
    warmup_ratio: float = setting(0.0, "warmup as a share of all steps, when warmup_steps is 0", FRACTION)
    max_grad_norm: float | None = setting(1.0, "gradient clipping: the largest gradient norm; null: no clipping",
                                          POSITIVE)
    precision: Literal["auto", "bf16", "fp16", "fp32"] = setting(
        "auto", "autocast dtype; auto and fp32: none (the weights' dtype); fp16 adds loss scaling")
    gradient_checkpointing: Union[bool, Literal["offload"]] = setting(
        False, "recompute activations in backward to save memory; offload: block inputs kept on the CPU")
    checkpoint_every_n_layers: int = setting(
        1, "with gradient_checkpointing: recompute blocks 0, n, 2n, ... only; the others keep their activations "
        "(faster, more memory; transformers' every_n_layers)", AT_LEAST_ONE)
    save_every: int | None = setting(None, "optimizer steps between checkpoints; null: none before the end",
                                     POSITIVE)
    keep_last: int = setting(2, "checkpoints kept in output_dir (older ones are deleted)", AT_LEAST_ONE)
    eval_every: int | None = setting(None, "optimizer steps between evaluations; null: only at the end", POSITIVE)
    log_every: int = setting(1, "optimizer steps between log lines", AT_LEAST_ONE)
    report_to: list = setting([], "metrics also go to: tensorboard, wandb (a list, or a comma-separated string)",
                              comma_list=True)
    progress: bool = setting(True, "show a progress bar")
    distributed: Literal["none", "ddp", "fsdp2"] = setting("none", "none; ddp or fsdp2 when started by torchrun")


def _section(cls, help: str):
    return field(default_factory=cls, metadata={"help": help})


@dataclass
class Config:
    objective: str = setting("sft", "what is trained for: sft (supervised fine-tuning, next-token loss on the "
                                    "assistant turns or all tokens), pretrain (raw text, every token), dpo, orpo, "
                                    "simpo (preference pairs), kto (rows labelled desirable or not), "
                                    "grpo (sampled completions scored by reward functions), contrastive, triplet, "
                                    "cosent (embedding models), asr (speech recognition, Whisper), tts (speech "
                                    "from codec tokens), or a name given to velotune.register_objective")
    model: ModelConfig = _section(ModelConfig, "the base model and how it is loaded")
    finetune: FinetuneConfig = _section(FinetuneConfig, "what is trained")
    lora: LoraConfig = _section(LoraConfig, "LoRA adapters (finetune.method: lora)")
    data: DataConfig = _section(DataConfig, "the data set and how it becomes token rows")
    train: TrainConfig = _section(TrainConfig, "the training loop: steps, optimizer, schedule, checkpoints")
    preference: PreferenceConfig = _section(PreferenceConfig, "preference objectives (dpo, orpo, simpo, kto)")
    grpo: GRPOConfig = _section(GRPOConfig, "reinforcement learning with group-relative advantages (objective grpo)")
    embedding: EmbeddingConfig = _section(EmbeddingConfig, "embedding models (objectives contrastive, triplet, cosent)")
    speech: SpeechConfig = _section(SpeechConfig, "speech recognition with Whisper (objective asr)")
    tts: TTSConfig = _section(TTSConfig, "text-to-speech with audio-codec tokens (objective tts)")
    vision: VisionConfig = _section(VisionConfig, "vision-language models (sft with images): what trains")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def sections() -> dict[str, type]:
    """Section name -> its dataclass, in schema order (top-level keys such as `objective` are not sections)."""
    hints = typing.get_type_hints(Config)
    return {f.name: hints[f.name] for f in dataclasses.fields(Config) if dataclasses.is_dataclass(hints[f.name])}


def top_level_keys() -> list[dataclasses.Field]:
    """The keys written at the top level of a config rather than inside a section."""
    hints = typing.get_type_hints(Config)
    return [f for f in dataclasses.fields(Config) if not dataclasses.is_dataclass(hints[f.name])]


# Names of transformers' TrainingArguments and PEFT's LoraConfig -> ours. They are read as our keys, with an info
# line, at the top level or inside the section they belong to; our own keys always need their section.
ALIASES = {
    "learning_rate": "train.lr", "num_train_epochs": "train.epochs", "per_device_train_batch_size": "train.batch_size",
    "gradient_accumulation_steps": "train.grad_accum", "max_grad_norm": "train.max_grad_norm",
    "warmup_steps": "train.warmup_steps", "warmup_ratio": "train.warmup_ratio", "weight_decay": "train.weight_decay",
    "max_steps": "train.max_steps", "seed": "train.seed", "output_dir": "train.output_dir",
    "logging_steps": "train.log_every", "save_steps": "train.save_every", "eval_steps": "train.eval_every",
    "save_total_limit": "train.keep_last", "report_to": "train.report_to",
    "lora_alpha": "lora.alpha", "lora_r": "lora.r", "r": "lora.r", "target_modules": "lora.targets",
    "lora_dropout": "lora.dropout", "use_rslora": "lora.rslora", "use_dora": "lora.dora",
    "modules_to_save": "lora.modules_to_save", "embedding_learning_rate": "train.embedding_lr",
    "loraplus_lr_ratio": "train.lora_plus_ratio",
}


# ---- building and validating -----------------------------------------------------------------------------

def load_config(source, overrides=None) -> Config:
    """A Config from a YAML path, a dict or a Config, with `key=value` overrides applied."""
    if isinstance(source, Config):
        data, origin, places = source.to_dict(), "<Config>", {}
    elif isinstance(source, dict):
        data, origin, places = copy.deepcopy(source), "<dict>", {}
    else:
        data, origin, places = _read_yaml(Path(source))
    _resolve_aliases(data, origin, places)
    for item in overrides or []:
        _apply_override(data, places, item)
    return _build(Config, data, origin, places, ())


def _read_yaml(path: Path):
    import yaml
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (byte {exc.object[exc.start]:#04x} at offset {exc.start})") \
            from None
    try:
        data = yaml.safe_load(text) or {}
        node = yaml.compose(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}:{where}: invalid YAML: {getattr(exc, 'problem', exc)}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections (model, lora, data, train, ...)")
    return data, str(path), {key: f"{path}:{line}" for key, line in _key_lines(node, ()).items()}


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


def _alias_target(parts: tuple) -> tuple | None:
    """(section, key) for a transformers / PEFT name written at the top level or in its own section."""
    target = ALIASES.get(parts[-1]) if len(parts) in (1, 2) else None
    if target is None:
        return None
    section, key = target.split(".")
    if len(parts) == 1 and parts[0] not in sections():
        return section, key
    if len(parts) == 2 and parts[0] == section and parts[1] != key:
        return section, key
    return None


def _resolve_aliases(data: dict, origin: str, places: dict):
    """Moves values written under transformers / PEFT names to our keys; both names at once is an error."""
    written = [(key,) for key in data] + [(name, key) for name in sections() if isinstance(data.get(name), dict)
                                           for key in data[name]]
    for parts in written:
        target = _alias_target(parts)
        if target is None:
            continue
        if data.get(target[0]) is None:  # `train:` with nothing under it is an empty section
            data[target[0]] = {}
        if not isinstance(data[target[0]], dict):
            continue  # reported by _build: the section must be a mapping
        alias, ours = ".".join(parts), ".".join(target)
        where = places.get(alias, origin)
        if target[1] in data[target[0]]:
            raise ConfigError(f"{where}: '{alias}' and '{ours}' both set {ours}: keep one")
        holder = data[parts[0]] if len(parts) == 2 else data
        data[target[0]][target[1]] = holder.pop(parts[-1])
        if alias in places:
            places[ours] = places.pop(alias)
        log.info("%s: '%s' is read as '%s'", where, alias, ours)


def _apply_override(data: dict, places: dict, item: str):
    import yaml
    blame = f"override '{item}'"
    key, sep, raw = item.partition("=")
    parts = tuple(part.strip() for part in key.split("."))
    if not sep or not all(parts):
        raise ConfigError(f"{blame}: expected key=value, e.g. lora.r=32")
    target = _alias_target(parts)
    if target is not None:
        log.info("%s: '%s' is read as '%s'", blame, key.strip(), ".".join(target))
        parts = target
    holder = data
    for part in parts[:-1]:
        if holder.get(part) is None:  # absent, or `train:` with nothing under it
            holder[part] = {}
        holder = holder[part]
        if not isinstance(holder, dict):
            raise ConfigError(f"{blame}: '{part}' is not a section")
    try:
        holder[parts[-1]] = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        holder[parts[-1]] = raw
    dotted = ".".join(parts)
    for replaced in [k for k in places if k.startswith(dotted + ".")]:  # a section set whole: its old lines go
        del places[replaced]
    places[dotted] = blame


def _where(origin: str, places: dict, path: tuple) -> str:
    """The override or file:line that set `path` (or the section holding it); else the source's name."""
    for end in range(len(path), 0, -1):
        place = places.get(".".join(path[:end]))
        if place:
            return place
    return origin


def _build(cls, data, origin, places, path):
    if not isinstance(data, dict):
        raise ConfigError(f"{_where(origin, places, path)}: '{'.'.join(path)}' must be a mapping")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        sub = path + (str(key),)
        if key not in fields:
            raise ConfigError(f"{_where(origin, places, sub)}: unknown key '{'.'.join(sub)}'{_suggestion(sub)}")
        kwargs[key] = _check(hints[key], fields[key], value, _where(origin, places, sub), sub, (origin, places))
    return cls(**kwargs)


def _check(hint, fld, value, where, path, source):
    if dataclasses.is_dataclass(hint):
        return _build(hint, value if value is not None else {}, *source, path)
    key = ".".join(path)
    if fld.metadata.get("comma_list") and isinstance(value, str):
        value = [part.strip() for part in value.split(",") if part.strip()]
    typed = _typed(hint, value)
    if typed is _REFUSED:
        raise ConfigError(f"{where}: '{key}' = {value!r}: expected {_describe(hint)}")
    bound = fld.metadata.get("bound")
    problem = bound.problem(typed) if bound is not None and typed is not None else None
    if problem:
        nullable = " (or null)" if _accepts(hint, None) else ""
        raise ConfigError(f"{where}: '{key}' = {typed!r}: {problem}{nullable}")
    return typed


_REFUSED = object()


def _typed(hint, value):
    """`value` as the field's type (an int where only a float fits becomes a float), or _REFUSED."""
    if _accepts(hint, value):
        takes_int = hint is int or int in typing.get_args(hint)
        return float(value) if is_number(value) and not takes_int and _accepts(hint, 0.0) else value
    # YAML 1.1 reads `2e-4` (no dot) as a string: numbers written that way are still numbers.
    if isinstance(value, str) and _accepts(hint, 0.0):
        try:
            return float(value)
        except ValueError:
            pass
    return _REFUSED


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
        return is_number(value)
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


# ---- "did you mean" ----------------------------------------------------------------------------------------

def _suggestion(path: tuple) -> str:
    """' (did you mean ...?)' with at most three close names (dotted when they live in another section), or a
    pointer to the full list."""
    written = path[-1]
    pairs = _known_names(path[0] if len(path) == 2 else None)
    shown = [name for candidate, name in pairs if candidate == written]
    if not shown:
        close = difflib.get_close_matches(written, list(dict.fromkeys(c for c, _ in pairs)), n=3, cutoff=0.6)
        shown = [name for match in close for candidate, name in pairs if candidate == match]
    shown = list(dict.fromkeys(shown))[:3]
    if not shown:
        return "; `velotune config --keys` lists the known keys"
    return " (did you mean " + " or ".join(f"'{name}'" for name in shown) + "?)"


def _known_names(section: str | None) -> list[tuple[str, str]]:
    """(name as it could be written, name to suggest) for a key written in `section` (None: the top level)."""
    pairs = [] if section else [(name, name) for name in sections()] + [(f.name, f.name) for f in top_level_keys()]
    for name, cls in sections().items():
        for f in dataclasses.fields(cls):
            pairs.append((f.name, f.name if name == section else f"{name}.{f.name}"))
    for alias, target in ALIASES.items():
        target_section, key = target.split(".")
        pairs.append((alias, key if target_section == section else target))
    return pairs
