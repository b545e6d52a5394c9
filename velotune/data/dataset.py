"""`prepare_data`: the `data` config section -> encoded train and eval examples, their counts, the data format
and the chat template they were rendered with (and why that one)."""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from ..errors import ConfigError, DataError
from .encode import DataStats, Encoded, encode
from .formats import detect_format, normalise
from .readers import read_records
from .templates import builtin_name, default_template, resolve_chat_template

log = logging.getLogger("velotune")

DEFAULT_MAX_SEQ_LENGTH = 2048


@dataclass
class ChatTemplate:
    text: str
    name: str     # a built-in's name, the file it came from, "custom" (Jinja text) or "tokenizer" (its own)
    source: str   # "data.chat_template" or "tokenizer"

    def describe(self) -> str:
        """Which template, and why this one."""
        if self.source == "data.chat_template":
            return f"{self.name} (set by data.chat_template)"
        same = f", which is {self.name}" if self.name != "tokenizer" else ""
        return f"the tokenizer's own{same} (data.chat_template is not set)"


@dataclass
class PreparedData:
    train: list[Encoded]
    eval: list[Encoded]
    stats: DataStats                 # the train split's; stats.eval: the eval split's
    format: str                      # of data.path
    format_detected: bool            # False: data.format named it
    template: ChatTemplate | None    # what chat samples were rendered with (else what a chat would use)


def build_datasets(data_cfg, tokenizer, *, max_seq_length: int | None = None, seed: int = 42):
    """`prepare_data`'s (train, eval, DataStats)."""
    data = prepare_data(data_cfg, tokenizer, max_seq_length=max_seq_length, seed=seed)
    return data.train, data.eval, data.stats


def prepare_data(data_cfg, tokenizer, *, max_seq_length: int | None = None, seed: int = 42) -> PreparedData:
    """Reads, normalises and encodes `data.path` (and the eval split).

    `max_seq_length` is the length the trainer settled on; without it data.max_seq_length, else 2048.
    """
    if not data_cfg.path:
        raise ConfigError("data.path is not set: give a jsonl, json, csv or parquet file (or a list of them)")
    if tokenizer is None:
        raise ConfigError("the model has no tokenizer files: velotune needs a tokenizer to encode data.path")
    max_len = max_seq_length or data_cfg.max_seq_length or DEFAULT_MAX_SEQ_LENGTH
    name = _source_name(data_cfg.path)
    samples, records_read, fmt = _samples(data_cfg.path, data_cfg, name)
    if data_cfg.eval_path:
        eval_samples, eval_read, _ = _samples(data_cfg.eval_path, data_cfg, _source_name(data_cfg.eval_path))
    else:
        samples, eval_samples = _split(samples, data_cfg.eval_fraction, seed)
        eval_read = len(eval_samples)
        records_read -= eval_read

    is_chat = any(s.is_chat for s in samples) or any(s.is_chat for s in eval_samples)
    template = choose_chat_template(data_cfg.chat_template, tokenizer, required=is_chat)
    text = template.text if template is not None and is_chat else None
    train, stats = _encode_all(samples, tokenizer, text, data_cfg, max_len)
    stats.records = records_read
    if not train:
        raise DataError(_nothing_left(name, stats, max_len))
    eval_examples, eval_stats = _encode_all(eval_samples, tokenizer, text, data_cfg, max_len)
    if eval_samples:
        eval_stats.records = eval_read
        stats.eval = eval_stats
        if not eval_examples:
            log.warning("eval data: %s", _nothing_left("the eval split", eval_stats, max_len))
    _warn_dropped(name, stats)
    return PreparedData(train, eval_examples, stats, fmt, data_cfg.format == "auto", template)


def choose_chat_template(spec: str | None, tokenizer, *, required: bool) -> ChatTemplate | None:
    """data.chat_template when set (errors name it), else the tokenizer's own; None when neither is there and
    the data is not chat (`required=False`)."""
    if not spec and not required and not default_template(getattr(tokenizer, "chat_template", None)):
        return None
    text = resolve_chat_template(spec, tokenizer)
    name = builtin_name(text)
    if name is None and not spec:
        name = "tokenizer"
    elif name is None:  # a spec that resolved and is neither a built-in nor Jinja text names a file
        name = spec if "{{" not in spec and "{%" not in spec else "custom"
    return ChatTemplate(text, name, "data.chat_template" if spec else "tokenizer")


def _source_name(path) -> str:
    if isinstance(path, (list, tuple)):
        return ", ".join(str(p) for p in path)
    return str(path)


def _samples(path, data_cfg, name):
    records = read_records(path)
    if data_cfg.max_samples:
        records = records.head(data_cfg.max_samples)
    fmt = data_cfg.format if data_cfg.format != "auto" else detect_format(records, name)
    samples = [normalise(record, fmt, system_prompt=data_cfg.system_prompt, where=where)
               for record, where in zip(records, records.origins)]
    return samples, len(records), fmt


def _split(samples, fraction: float, seed: int):
    """A seeded random eval split of `fraction` of the samples; both keep their original order."""
    if not fraction:
        return samples, []
    if not 0.0 < fraction < 1.0:
        raise ConfigError(f"data.eval_fraction = {fraction}: expected a number in [0, 1)")
    n_eval = max(1, round(len(samples) * fraction))
    if n_eval >= len(samples):
        raise ConfigError(f"data.eval_fraction = {fraction} of {len(samples)} samples leaves none to train on")
    picked = set(torch.randperm(len(samples), generator=torch.Generator().manual_seed(seed))[:n_eval].tolist())
    train = [s for i, s in enumerate(samples) if i not in picked]
    held = [s for i, s in enumerate(samples) if i in picked]
    return train, held


def _encode_all(samples, tokenizer, template, data_cfg, max_len):
    stats = DataStats()
    examples = []
    for sample in samples:
        example = encode(sample, tokenizer, template, train_on=data_cfg.train_on, max_len=max_len,
                         overflow=data_cfg.overflow, stats=stats)
        if example is not None:
            examples.append(example)
    return examples, stats


def _nothing_left(name: str, stats: DataStats, max_len: int) -> str:
    if stats.dropped_fully_masked and not stats.dropped_too_long:
        return (f"every sample in {name} has no trained tokens: check train_on / the chat template "
                "(are there assistant turns?)")
    if stats.dropped_too_long and not stats.dropped_fully_masked:
        return (f"every sample in {name} is longer than max_seq_length={max_len} and data.overflow is 'drop': "
                "raise max_seq_length or use overflow: truncate")
    return (f"no samples left in {name}: {stats.dropped_too_long} longer than max_seq_length={max_len} (dropped), "
            f"{stats.dropped_fully_masked} with no trained tokens")


def _warn_dropped(name: str, stats: DataStats):
    """The counts themselves are in the run's plan (training.plan); samples lost are also a warning."""
    for reason, count in (("too long", stats.dropped_too_long), ("no trained tokens", stats.dropped_fully_masked)):
        if count:
            log.warning("%s: dropped %d of %d samples (%s)", name, count, stats.records, reason)
