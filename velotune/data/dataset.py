"""`build_datasets`: the `data` config section -> encoded train and eval examples with their counts."""
from __future__ import annotations

import logging

import torch

from ..errors import ConfigError, DataError
from .encode import DataStats, encode
from .formats import detect_format, normalise
from .readers import read_records
from .templates import resolve_chat_template

log = logging.getLogger("velotune")

DEFAULT_MAX_SEQ_LENGTH = 2048


def build_datasets(data_cfg, tokenizer, *, max_seq_length: int | None = None, seed: int = 42):
    """Reads, normalises and encodes `data.path` (and the eval split): returns (train, eval, DataStats).

    `max_seq_length` is the length the trainer settled on; without it data.max_seq_length, else 2048.
    The returned stats are the train split's; `stats.eval` holds the eval split's (None without one).
    """
    if not data_cfg.path:
        raise ConfigError("data.path is not set: give a jsonl, json, csv or parquet file (or a list of them)")
    if tokenizer is None:
        raise ConfigError("the model has no tokenizer files: velotune needs a tokenizer to encode data.path")
    max_len = max_seq_length or data_cfg.max_seq_length or DEFAULT_MAX_SEQ_LENGTH
    name = _source_name(data_cfg.path)
    samples, records_read = _samples(data_cfg.path, data_cfg, name)
    if data_cfg.eval_path:
        eval_samples, eval_read = _samples(data_cfg.eval_path, data_cfg, _source_name(data_cfg.eval_path))
    else:
        samples, eval_samples = _split(samples, data_cfg.eval_fraction, seed)
        eval_read = len(eval_samples)
        records_read -= eval_read

    needs_template = any(s.is_chat for s in samples) or any(s.is_chat for s in eval_samples)
    template = resolve_chat_template(data_cfg.chat_template, tokenizer) if needs_template else None
    train, stats = _encode_all(samples, tokenizer, template, data_cfg, max_len)
    stats.records = records_read
    if not train:
        raise DataError(_nothing_left(name, stats, max_len))
    eval_examples, eval_stats = _encode_all(eval_samples, tokenizer, template, data_cfg, max_len)
    if eval_samples:
        eval_stats.records = eval_read
        stats.eval = eval_stats
        if not eval_examples:
            log.warning("eval data: %s", _nothing_left("the eval split", eval_stats, max_len))
    _log_stats(name, stats, max_len)
    return train, eval_examples, stats


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
    return samples, len(records)


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


def _log_stats(name: str, stats: DataStats, max_len: int):
    log.info("data %s: %d samples (%d truncated to %d tokens, %d dropped as too long, %d with no trained "
             "tokens), %d tokens of which %d trained", name, stats.samples, stats.truncated, max_len,
             stats.dropped_too_long, stats.dropped_fully_masked, stats.total_tokens, stats.target_tokens)
    for reason, count in (("too long", stats.dropped_too_long), ("no trained tokens", stats.dropped_fully_masked)):
        if count:
            log.warning("%s: dropped %d of %d samples (%s)", name, count, stats.records, reason)
