"""Unpaired preference data (KTO): `prompt` / `completion` / `label` records -> one encoded sequence per row, its
completion trained, with the label (True: desirable) and a mismatched "KL" sequence: the same prompt followed by
another row's completion, the sample KTO's reference point is estimated from.

    {"prompt": "text", "completion": "text", "label": true}
    {"prompt": [messages], "completion": [assistant turn(s)], "label": false}

The KL partner of each row is fixed when the data is prepared (the completion of the row after it in a seeded
shuffle), not drawn from whatever shares its micro-batch: the estimate is then the same for any batch split.
Bad rows (a missing field, an empty completion, a label that is not true / false) are dropped, counted and named.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import DataError
from .dataset import PreparedData, choose_chat_template
from .encode import DataStats, Encoded, encode
from .formats import Sample
from .preference import _completion_turns, _conversation, _text
from .row_sets import BadRow, bad_reasons, check_source, note_rows, read_and_split

LABELS = {True: True, False: False, "true": True, "false": False}  # 1 and 0 hash as True and False: accepted


@dataclass
class UnpairedSample:
    prompt: list | str          # messages, or plain text
    completion: list | str
    desirable: bool
    origin: str


@dataclass
class UnpairedExample:
    sequence: Encoded           # prompt + completion, the completion trained
    kl_sequence: Encoded        # prompt + another row's completion (KTO's reference point)
    desirable: bool
    origin: str = ""
    reference: "torch.Tensor | None" = None  # precomputed reference log-probs [sequence, kl_sequence]

    def __len__(self) -> int:  # what batching balances: the tokens the row puts through the model
        return len(self.sequence) + len(self.kl_sequence)

    def sides(self) -> tuple[Encoded, Encoded]:
        """The two sequences a batch holds for this example, in the order of `reference`."""
        return self.sequence, self.kl_sequence


def unpaired_sample(record, where: str) -> UnpairedSample:
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a record (dict), got {type(record).__name__}")
    for name in ("prompt", "completion", "label"):
        if record.get(name) is None:
            raise BadRow(f"missing field '{name}'")
    label = record["label"]
    key = label.lower() if isinstance(label, str) else label
    if isinstance(key, float) or key not in LABELS:
        raise BadRow("'label' is not true or false")
    prompt, completion = record["prompt"], record["completion"]
    if isinstance(prompt, list) or isinstance(completion, list):
        prompt = (_conversation(prompt, where, "prompt") if isinstance(prompt, list)
                  else [{"role": "user", "content": _text(prompt, where, "prompt")}])
        completion = _completion_turns(completion, where, "completion")
        if not any(m["role"] == "assistant" and m["content"].strip() for m in completion):
            raise BadRow("empty 'completion'")
    else:
        prompt, completion = _text(prompt, where, "prompt"), _text(completion, where, "completion")
        if not completion.strip():
            raise BadRow("empty 'completion'")
    return UnpairedSample(prompt, completion, LABELS[key], where)


def _as_sample(prompt, completion, where) -> tuple[Sample, int]:
    """A Sample of prompt + completion, and the message the completion starts at (0 for plain text)."""
    if isinstance(prompt, list):
        completion = completion if isinstance(completion, list) else [{"role": "assistant", "content": completion}]
        return Sample(messages=prompt + completion, origin=where), len(prompt)
    if isinstance(completion, list):  # a text prompt with another row's chat completion: as a user turn
        return Sample(messages=[{"role": "user", "content": prompt}] + completion, origin=where), 1
    return Sample(prompt=prompt, text=completion, origin=where), 0


def prepare_unpaired(data_cfg, tokenizer, *, max_seq_length: int, seed: int = 42) -> PreparedData:
    check_source(data_cfg, tokenizer, "prompt / completion / label records", "kto")
    train, held = read_and_split(data_cfg, unpaired_sample, seed=seed, check_first=_not_pairs)
    _check_classes(train.rows, train.name)
    is_chat = any(isinstance(s.prompt, list) for s in train.rows + (held.rows if held else []))
    template = choose_chat_template(data_cfg.chat_template, tokenizer, required=is_chat)
    text = template.text if template is not None and is_chat else None
    examples, stats = _encode(train.rows, tokenizer, text, data_cfg, max_seq_length, seed)
    note_rows(stats, train)
    if not examples:
        raise DataError(f"no rows left in {train.name}: "
                        + ("; ".join(bad_reasons(train)) or "every row lost its completion to max_seq_length"))
    eval_examples = []
    if held is not None:
        eval_examples, stats.eval = _encode(held.rows, tokenizer, text, data_cfg, max_seq_length, seed + 1)
        note_rows(stats.eval, held)
    return PreparedData(examples, eval_examples, stats, "unpaired", True, template)


def _not_pairs(record, where):
    if isinstance(record, dict) and "label" not in record and {"chosen", "rejected"} <= set(record):
        raise DataError(f"{where}: kto reads unpaired rows (prompt, completion, label); this record is a pair "
                        "(chosen / rejected): use objective dpo, or write each side as its own row")


def _check_classes(samples: list, name: str):
    desirable = sum(s.desirable for s in samples)
    if samples and desirable in (0, len(samples)):
        kind = "desirable (label true)" if desirable else "undesirable (label false)"
        raise DataError(f"{name}: every row is {kind}: kto needs both classes (its loss weighs one against the "
                        f"other); with desirable rows only, train them with objective sft")


def _encode(samples: list, tokenizer, template, data_cfg, max_len: int, seed: int):
    stats, examples = DataStats(), []
    order = torch.randperm(len(samples), generator=torch.Generator().manual_seed(seed)).tolist()
    partner = {order[i]: order[(i + 1) % len(order)] for i in range(len(order))}
    for i, row in enumerate(samples):
        other = samples[partner[i]] if len(samples) > 1 else row
        sides, side_stats = [], DataStats()
        for completion in (row.completion, other.completion):
            sample, start = _as_sample(row.prompt, completion, row.origin)
            sides.append(encode(sample, tokenizer, template, train_on="assistant", max_len=max_len,
                                overflow=data_cfg.overflow, stats=side_stats, train_from=start))
        if sides[0] is None or sides[1] is None:
            stats.dropped_too_long += side_stats.dropped_too_long > 0
            stats.dropped_fully_masked += side_stats.dropped_too_long == 0
            continue
        stats.samples += 1
        stats.truncated += side_stats.truncated > 0
        stats.target_tokens += sides[0].num_targets
        stats.total_tokens += len(sides[0]) + len(sides[1])
        examples.append(UnpairedExample(sides[0], sides[1], row.desirable, row.origin))
    return examples, stats
