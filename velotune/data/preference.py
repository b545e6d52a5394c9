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

from dataclasses import dataclass

import torch

from ..errors import DataError
from .dataset import PreparedData, choose_chat_template
from .encode import DataStats, Encoded, encode
from .formats import Sample, _messages
from .row_sets import BadRow, bad_reasons, check_source, note_rows, read_and_split


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

    def sides(self) -> tuple[Encoded, Encoded]:
        """The two sequences a batch holds for this example, in the order of `reference`."""
        return self.chosen, self.rejected


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
    check_source(data_cfg, tokenizer, "prompt / chosen / rejected records", "preference objectives")
    train, held = read_and_split(data_cfg, pair_sample, seed=seed, check_first=_looks_like_pairs)
    is_chat = any(s.chosen.is_chat for s in train.rows + (held.rows if held else []))
    template = choose_chat_template(data_cfg.chat_template, tokenizer, required=is_chat)
    text = template.text if template is not None and is_chat else None
    examples, stats = _encode_pairs(train.rows, tokenizer, text, data_cfg, max_seq_length)
    note_rows(stats, train)
    if not examples:
        raise DataError(f"no pairs left in {train.name}: {_why_none(stats, train)}")
    eval_examples = []
    if held is not None:
        eval_examples, stats.eval = _encode_pairs(held.rows, tokenizer, text, data_cfg, max_seq_length)
        note_rows(stats.eval, held)
    return PreparedData(examples, eval_examples, stats, "preference", True, template)


def _looks_like_pairs(record, where):
    if isinstance(record, dict) and not ({"chosen", "rejected"} & set(record)):
        raise DataError(f"{where}: a preference objective reads 'prompt', 'chosen' and 'rejected' fields; this "
                        f"record has {sorted(record)}")


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


def _why_none(stats: DataStats, parsed) -> str:
    parts = bad_reasons(parsed)
    if stats.dropped_too_long:
        parts.append(f"{stats.dropped_too_long} longer than max_seq_length (data.overflow is 'drop')")
    if stats.dropped_fully_masked:
        parts.append(f"{stats.dropped_fully_masked} with no completion token left after truncation to "
                     "max_seq_length (the prompt fills it)")
    return "; ".join(parts) or "the data set is empty"
