"""Preference pairs: `prompt` / `chosen` / `rejected` records -> two encoded sequences per pair, each trained on
its completion only (the loss mask of SFT, with the prompt never trained).

Accepted records, as TRL and the published preference sets write them:
    {"prompt": "text", "chosen": "text", "rejected": "text"}                       plain text, no chat template
    {"prompt": [messages], "chosen": [assistant turn(s)], "rejected": [...]}       conversations
    {"prompt": "text" | [messages], "chosen": "text", "rejected": "text"}          with a list prompt: chat
    {"chosen": [whole conversation], "rejected": [whole conversation]}           the shared start is the prompt
A bad row (a missing field, an empty completion, chosen equal to rejected) is dropped, counted by reason and
named in the log; a row of the wrong shape (a number where text belongs) is an error naming it.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from ..errors import ConfigError, DataError
from .dataset import PreparedData, _source_name, _split, choose_chat_template
from .encode import DataStats, Encoded, encode
from .formats import Sample, _messages
from .readers import read_records

log = logging.getLogger("velotune")

NAMED_IN_LOG = 5  # bad rows named per reason (all are counted)


class BadRow(Exception):
    """A record that cannot make a pair; its reason is what the log counts it under."""


@dataclass
class PairSample:
    chosen: Sample
    rejected: Sample
    train_from: int      # conversations: the first message of the completion (0 for plain text)
    origin: str


@dataclass
class PairExample:
    chosen: Encoded
    rejected: Encoded
    origin: str = ""
    reference: "torch.Tensor | None" = None  # precomputed reference log-probs [chosen, rejected] (DPO)

    def __len__(self) -> int:  # tokens the pair puts through the model (what batching balances)
        return len(self.chosen) + len(self.rejected)


def pair_sample(record, where: str) -> PairSample:
    """One record as a pair of samples; BadRow(reason) for a row to drop and count, DataError for a malformed one."""
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a record (dict), got {type(record).__name__}")
    for name in ("chosen", "rejected"):
        if record.get(name) is None:
            raise BadRow(f"missing field '{name}'")
    prompt, chosen, rejected = record.get("prompt"), record["chosen"], record["rejected"]
    if prompt is None and not (isinstance(chosen, list) and isinstance(rejected, list)):
        raise BadRow("missing field 'prompt'")
    if prompt is None:  # whole conversations: what they share is the prompt
        chosen_msgs = _conversation(chosen, where, "chosen")
        rejected_msgs = _conversation(rejected, where, "rejected")
        shared = _shared_start(chosen_msgs, rejected_msgs)
        prompt_msgs, chosen_msgs, rejected_msgs = chosen_msgs[:shared], chosen_msgs[shared:], rejected_msgs[shared:]
        if not prompt_msgs:
            raise BadRow("no shared prompt ('chosen' and 'rejected' differ from their first message)")
        return _chat_pair(prompt_msgs, chosen_msgs, rejected_msgs, where)
    if isinstance(prompt, list) or isinstance(chosen, list) or isinstance(rejected, list):
        prompt_msgs = (_conversation(prompt, where, "prompt") if isinstance(prompt, list)
                       else [{"role": "user", "content": _text(prompt, where, "prompt")}])
        return _chat_pair(prompt_msgs, _completion_turns(chosen, where, "chosen"),
                          _completion_turns(rejected, where, "rejected"), where)
    prompt_text = _text(prompt, where, "prompt")
    chosen_text, rejected_text = _text(chosen, where, "chosen"), _text(rejected, where, "rejected")
    for name, text in (("chosen", chosen_text), ("rejected", rejected_text)):
        if not text.strip():
            raise BadRow(f"empty '{name}' completion")
    if chosen_text == rejected_text:
        raise BadRow("'chosen' equals 'rejected'")
    return PairSample(Sample(prompt=prompt_text, text=chosen_text, origin=where),
                      Sample(prompt=prompt_text, text=rejected_text, origin=where), 0, where)


def _chat_pair(prompt_msgs, chosen_msgs, rejected_msgs, where) -> PairSample:
    for name, msgs in (("chosen", chosen_msgs), ("rejected", rejected_msgs)):
        if not msgs or not any(m["role"] == "assistant" and m["content"].strip() for m in msgs):
            raise BadRow(f"empty '{name}' completion")
    if chosen_msgs == rejected_msgs:
        raise BadRow("'chosen' equals 'rejected'")
    k = len(prompt_msgs)
    return PairSample(Sample(messages=prompt_msgs + chosen_msgs, origin=where),
                      Sample(messages=prompt_msgs + rejected_msgs, origin=where), k, where)


def _conversation(value, where, name) -> list[dict]:
    if not isinstance(value, list):
        raise DataError(f"{where}: field '{name}' must be a list of messages, got {type(value).__name__}")
    return _messages({name: value}, where, name, "preference").messages


def _completion_turns(value, where, name) -> list[dict]:
    """A completion given as text (one assistant turn) or as a list of messages."""
    if isinstance(value, list):
        return _conversation(value, where, name)
    return [{"role": "assistant", "content": _text(value, where, name)}]


def _text(value, where, name) -> str:
    if not isinstance(value, str):
        raise DataError(f"{where}: field '{name}' must be text, got {type(value).__name__} (preference format)")
    return value


def _shared_start(a: list[dict], b: list[dict]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


# ---- a data set ------------------------------------------------------------------------------------------

def prepare_pairs(data_cfg, tokenizer, *, max_seq_length: int, seed: int = 42) -> PreparedData:
    """Reads `data.path` (and the eval split) as preference pairs and encodes both sides of each."""
    if not data_cfg.path:
        raise ConfigError("data.path is not set: give a jsonl, json, csv or parquet file of prompt / chosen / "
                          "rejected records")
    if data_cfg.format != "auto":
        raise ConfigError(f"data.format: {data_cfg.format!r} is an SFT format; preference objectives read "
                          "prompt / chosen / rejected records (leave data.format auto)")
    if tokenizer is None:
        raise ConfigError("the model has no tokenizer files: velotune needs a tokenizer to encode data.path")
    name = _source_name(data_cfg.path)
    samples, read, bad = _read_pairs(data_cfg.path, name, data_cfg.max_samples)
    if data_cfg.eval_path:
        eval_samples, eval_read, eval_bad = _read_pairs(data_cfg.eval_path, _source_name(data_cfg.eval_path), None)
    else:
        samples, eval_samples = _split(samples, data_cfg.eval_fraction, seed)
        eval_read, eval_bad = len(eval_samples), {}
        read -= eval_read
    is_chat = any(s.chosen.is_chat for s in samples + eval_samples)
    template = choose_chat_template(data_cfg.chat_template, tokenizer, required=is_chat)
    text = template.text if template is not None and is_chat else None
    train, stats = _encode_pairs(samples, tokenizer, text, data_cfg, max_seq_length)
    stats.records, stats.dropped_bad = read, _counts(bad)
    _log_bad(name, bad)
    if not train:
        raise DataError(f"no pairs left in {name}: {_why_none(stats, bad)}")
    if eval_samples or eval_bad:
        eval_examples, eval_stats = _encode_pairs(eval_samples, tokenizer, text, data_cfg, max_seq_length)
        eval_stats.records, eval_stats.dropped_bad = eval_read, _counts(eval_bad)
        _log_bad(_source_name(data_cfg.eval_path) if data_cfg.eval_path else "the eval split", eval_bad)
        stats.eval = eval_stats
    else:
        eval_examples = []
    return PreparedData(train, eval_examples, stats, "preference", True, template)


def _read_pairs(path, name: str, max_samples):
    records = read_records(path)
    if max_samples:
        records = records.head(max_samples)
    if not records:
        raise DataError(f"no records in {name}")
    first = records[0]
    if isinstance(first, dict) and not ({"chosen", "rejected"} & set(first)):
        raise DataError(f"{records.origins[0]}: a preference objective reads 'prompt', 'chosen' and 'rejected' "
                        f"fields; this record has {sorted(first)}")
    samples, bad = [], {}
    for record, where in zip(records, records.origins):
        try:
            samples.append(pair_sample(record, where))
        except BadRow as exc:
            bad.setdefault(str(exc), []).append(where)
    return samples, len(records), bad


def _encode_pairs(samples: list[PairSample], tokenizer, template, data_cfg, max_len: int):
    stats = DataStats()
    examples = []
    for pair in samples:
        sides, side_stats = [], DataStats()
        for sample in (pair.chosen, pair.rejected):
            sides.append(encode(sample, tokenizer, template, train_on="assistant", max_len=max_len,
                                overflow=data_cfg.overflow, stats=side_stats, train_from=pair.train_from))
        if None in sides:  # a pair is kept whole or dropped whole
            stats.dropped_too_long += side_stats.dropped_too_long > 0
            stats.dropped_fully_masked += side_stats.dropped_too_long == 0
            continue
        stats.samples += 1
        stats.truncated += side_stats.truncated > 0
        stats.target_tokens += side_stats.target_tokens
        stats.total_tokens += side_stats.total_tokens
        examples.append(PairExample(sides[0], sides[1], pair.origin))
    return examples, stats


def _counts(bad: dict) -> dict:
    return {reason: len(rows) for reason, rows in bad.items()}


def _log_bad(name: str, bad: dict):
    for reason, rows in bad.items():
        named = ", ".join(rows[:NAMED_IN_LOG]) + (f" and {len(rows) - NAMED_IN_LOG} more"
                                                  if len(rows) > NAMED_IN_LOG else "")
        log.warning("%s: dropped %d row%s (%s): %s", name, len(rows), "" if len(rows) == 1 else "s", reason, named)


def _why_none(stats: DataStats, bad: dict) -> str:
    parts = [f"{len(rows)} bad ({reason})" for reason, rows in bad.items()]
    if stats.dropped_too_long:
        parts.append(f"{stats.dropped_too_long} longer than max_seq_length (data.overflow is 'drop')")
    if stats.dropped_fully_masked:
        parts.append(f"{stats.dropped_fully_masked} with no completion token left after truncation to "
                     "max_seq_length (the prompt fills it)")
    return "; ".join(parts) or "the data set is empty"
