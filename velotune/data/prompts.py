"""Prompt data for reinforcement learning (GRPO): records with a `prompt` (text, or a list of messages) and any
other columns, which are handed to the reward functions (a reference answer, test cases, ...).

A chat prompt is rendered with the chat template and its generation prompt; a text prompt is tokenized as it is. A
prompt longer than `max_prompt_length` keeps its last tokens (`truncate_left`, the end of a prompt is what the
completion follows) or is left out (`drop`); either way it is counted. A record without a usable prompt is dropped,
counted and named.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from ..errors import ConfigError, DataError
from .dataset import PreparedData, choose_chat_template
from .encode import DataStats
from .formats import _messages
from .row_sets import BadRow, bad_reasons, check_source, note_rows, read_and_split
from .templates import render

log = logging.getLogger("velotune")


@dataclass
class PromptExample:
    prompt_ids: torch.Tensor     # int32 [P]
    prompt: object               # the prompt as the data gave it (text or messages): what reward functions see
    extras: dict = field(default_factory=dict)   # the record's other columns
    origin: str = ""

    def __len__(self) -> int:
        return int(self.prompt_ids.shape[0])


def prompt_of(record, where: str):
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a record (dict), got {type(record).__name__}")
    prompt = record.get("prompt")
    if prompt is None:
        raise BadRow("missing field 'prompt'")
    if isinstance(prompt, list):
        messages = _messages({"prompt": prompt}, where, "prompt", "prompt").messages
        if not messages:
            raise BadRow("empty 'prompt'")
        return messages
    if not isinstance(prompt, str):
        raise DataError(f"{where}: field 'prompt' must be text or a list of messages, got {type(prompt).__name__}")
    if not prompt.strip():
        raise BadRow("empty 'prompt'")
    return prompt


def prepare_prompts(data_cfg, grpo_cfg, tokenizer, *, max_seq_length: int, seed: int = 42) -> PreparedData:
    check_source(data_cfg, tokenizer, "records with a 'prompt' column", "grpo")
    budget = grpo_cfg.max_prompt_length or max_seq_length - grpo_cfg.max_completion_length
    if budget < 1:
        raise ConfigError(f"grpo.max_completion_length ({grpo_cfg.max_completion_length}) leaves no room for a prompt "
                          f"in data.max_seq_length ({max_seq_length}): raise max_seq_length or set "
                          "grpo.max_prompt_length")
    train, held = read_and_split(data_cfg, _row, seed=seed)
    is_chat = any(isinstance(prompt, list) for prompt, _, _ in train.rows + (held.rows if held else []))
    template = choose_chat_template(data_cfg.chat_template, tokenizer, required=is_chat)
    text = template.text if template is not None and is_chat else None
    examples, stats = _encode(train.rows, tokenizer, text, budget, grpo_cfg.prompt_overflow)
    note_rows(stats, train)
    if stats.truncated:
        log.warning("%s: %d prompt(s) longer than %d tokens kept their last %d (grpo.prompt_overflow: truncate_left)",
                    train.name, stats.truncated, budget, budget)
    if not examples:
        raise DataError(f"no prompts left in {train.name}: "
                        + ("; ".join(bad_reasons(train)) or f"every prompt is longer than {budget} tokens"))
    eval_examples = []
    if held is not None:
        eval_examples, stats.eval = _encode(held.rows, tokenizer, text, budget, grpo_cfg.prompt_overflow)
        note_rows(stats.eval, held)
    return PreparedData(examples, eval_examples, stats, "prompts", True, template)


def _row(record, where):
    return prompt_of(record, where), {k: v for k, v in record.items() if k != "prompt"}, where


def _encode(rows, tokenizer, template, budget: int, overflow: str):
    stats, examples = DataStats(), []
    for prompt, extras, where in rows:
        if isinstance(prompt, list):
            text = render(tokenizer, template, prompt, add_generation_prompt=True, where=where)
            ids = list(tokenizer(text, add_special_tokens=False).input_ids)
            if tokenizer.bos_token_id is not None and not text.startswith(tokenizer.bos_token or "\0"):
                probe = tokenizer("a", add_special_tokens=True).input_ids
                if probe and probe[0] == tokenizer.bos_token_id:
                    ids = [tokenizer.bos_token_id] + ids
        else:
            ids = list(tokenizer(prompt).input_ids)
        if len(ids) > budget:
            if overflow == "drop":
                stats.dropped_too_long += 1
                continue
            ids = ids[-budget:]
            stats.truncated += 1
        stats.samples += 1
        stats.total_tokens += len(ids)
        examples.append(PromptExample(torch.tensor(ids, dtype=torch.int32), prompt, extras, where))
    return examples, stats
