"""Reward functions of reinforcement learning (GRPO): built-ins and the user's own, named in the config.

    grpo:
      reward_funcs: [exact_match, format, mypkg.rewards:brevity]
      reward_weights: [1.0, 0.2, 0.1]

A function is called as TRL calls one: `fn(prompts=[...], completions=[...], **columns)`, a list per argument with
one entry per completion (a prompt is repeated for each of its group's completions; `columns` are the data's other
columns, likewise repeated), and returns one number per completion (None counts as 0). Completions are text, or
for chat prompts a list holding one assistant message, as TRL gives them. What goes wrong is named: a function
that cannot be imported (before any weights load), one that raises (with the rows of the call), the wrong number
of rewards, or a value that is not a finite number (with its row).
"""
from __future__ import annotations

import importlib
import math
import re
from dataclasses import dataclass
from typing import Callable

import torch

from ..errors import ConfigError, TrainingError

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


@dataclass
class Reward:
    name: str
    fn: Callable
    weight: float


def completion_text(completion) -> str:
    """The text of a completion as reward functions get it (text, or a list of messages)."""
    if isinstance(completion, list):
        return "".join(m.get("content", "") for m in completion if isinstance(m, dict))
    return str(completion)


def final_answer(text: str) -> str:
    """The answer a completion ends on: the last \\boxed{...}, else what follows the last '####' or 'answer:', else
    the last number, else the stripped text."""
    boxed = re.findall(r"\\boxed\{([^{}]*)\}", text)
    if boxed:
        return _normal(boxed[-1])
    for marker in ("####", "answer:"):
        at = text.lower().rfind(marker)
        if at >= 0:
            after = text[at + len(marker):].strip()
            return _normal(after.splitlines()[0] if after else "")
    numbers = _NUMBER.findall(text)
    return _normal(numbers[-1]) if numbers else _normal(text)


def _normal(answer: str) -> str:
    answer = answer.strip().rstrip(".").strip()
    if _NUMBER.fullmatch(answer):
        return answer.replace(",", "")
    return answer.lower()


def exact_match_reward(column: str) -> Callable:
    def exact_match(prompts, completions, **columns):
        if column not in columns:
            raise KeyError(f"the data has no '{column}' column (grpo.answer_column) for exact_match")
        return [1.0 if final_answer(completion_text(c)) == _normal(str(ref)) else 0.0
                for c, ref in zip(completions, columns[column])]
    return exact_match


def format_reward(pattern: str) -> Callable:
    regex = re.compile(pattern)

    def format(prompts, completions, **columns):  # noqa: A001 - the reward's name in the config
        return [1.0 if regex.search(completion_text(c)) else 0.0 for c in completions]
    return format


def length_reward(max_length: int) -> Callable:
    def length(prompts, completions, **columns):
        return [-len(completion_text(c)) / max(1, max_length) for c in completions]
    return length


def resolve_rewards(grpo_cfg) -> list[Reward]:
    """The configured reward functions, imported and checked now (before any weights load)."""
    names = list(grpo_cfg.reward_funcs or [])
    if not names:
        raise ConfigError("grpo.reward_funcs: empty; name at least one (exact_match, format, length or "
                          "module:function)")
    weights = grpo_cfg.reward_weights
    if weights is None:
        weights = [1.0] * len(names)
    if len(weights) != len(names) or not all(isinstance(w, (int, float)) and math.isfinite(w) for w in weights):
        raise ConfigError(f"grpo.reward_weights: {weights!r}: expected {len(names)} finite number(s), one per "
                          f"reward function ({', '.join(map(str, names))})")
    builtins = {"exact_match": lambda: exact_match_reward(grpo_cfg.answer_column),
                "format": lambda: format_reward(grpo_cfg.format_regex),
                "length": lambda: length_reward(grpo_cfg.max_completion_length)}
    rewards = []
    for name, weight in zip(names, weights):
        name = str(name)
        if name in builtins:
            fn = builtins[name]()
        elif ":" in name:
            fn = _import(name)
        else:
            raise ConfigError(f"grpo.reward_funcs: {name!r} is neither a built-in ({', '.join(builtins)}) nor "
                              "module:function")
        rewards.append(Reward(name, fn, float(weight)))
    if "format" in names:
        try:
            re.compile(grpo_cfg.format_regex)
        except re.error as exc:
            raise ConfigError(f"grpo.format_regex: {grpo_cfg.format_regex!r} is not a regular expression ({exc})") \
                from None
    return rewards


def _import(name: str) -> Callable:
    module_name, _, attr = name.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"grpo.reward_funcs: cannot import {module_name!r} for {name!r} ({exc}); is it on "
                          "PYTHONPATH?") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ConfigError(f"grpo.reward_funcs: {module_name!r} has no function {attr!r}")
    return fn


def score(rewards: list[Reward], prompts: list, completions: list, columns: dict, origins: list) -> torch.Tensor:
    """[completions, functions] fp32 rewards, unweighted; errors name the function and the rows."""
    out = torch.zeros(len(completions), len(rewards), dtype=torch.float32)
    for j, reward in enumerate(rewards):
        try:
            values = reward.fn(prompts=prompts, completions=completions, **columns)
        except Exception as exc:  # the user's code: reported with where it ran, the run stops cleanly
            rows = ", ".join(dict.fromkeys(origins))
            raise TrainingError(f"reward function {reward.name!r} raised {type(exc).__name__}: {exc} (on the "
                                f"completions of {rows})") from exc
        values = list(values) if values is not None else []
        if len(values) != len(completions):
            raise TrainingError(f"reward function {reward.name!r} returned {len(values)} value(s) for "
                                f"{len(completions)} completions: it must return one number per completion")
        for i, value in enumerate(values):
            value = 0.0 if value is None else value
            if not isinstance(value, (int, float)) or not math.isfinite(value):
                raise TrainingError(f"reward function {reward.name!r} returned {value!r} for a completion of "
                                    f"{origins[i]}: rewards must be finite numbers (or None)")
            out[i, j] = float(value)
    return out
