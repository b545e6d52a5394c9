"""Choosing the next token: penalties, temperature, top-k, top-p, min-p, then greedy or a seeded draw.

The order is the one Hugging Face `generate` and vLLM use: penalties change the raw logits, then the
temperature scales them, then top-k, top-p and min-p remove tokens (each on what the previous one left),
then a token is drawn from what remains (or the largest is taken when `temperature == 0`).

Penalties, for the tokens of each row:
- `repetition_penalty` (CTRL / Hugging Face): every token seen in the prompt or the output so far has its
  logit divided by the penalty when positive, multiplied by it when negative. 1.0 = off.
- `presence_penalty` (OpenAI): subtracted once from the logit of every token already generated. 0 = off.
- `frequency_penalty` (OpenAI): subtracted once per time a token was generated. 0 = off.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import torch

from ..errors import ConfigError

NEG_INF = float("-inf")
SEED_MAX = 2 ** 63 - 1                 # seeds are 0..SEED_MAX (what every torch generator takes)
# Beyond these a penalty only pushes logits towards overflow: 1e-300 turns every seen logit into +-inf.
REPETITION_PENALTY_RANGE = (0.01, 100.0)


@dataclass
class SamplingParams:
    max_new_tokens: int = 128
    temperature: float = 0.0          # 0 = greedy (argmax)
    top_k: int = 0                    # keep the k most likely tokens; 0 = off
    top_p: float = 1.0                # keep the smallest set whose probability reaches top_p; 1 = off
    min_p: float = 0.0                # drop tokens less likely than min_p * the most likely one; 0 = off
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None           # a seeded torch.Generator for the draws; None = torch's global RNG
    stop: list = field(default_factory=list)            # stop strings (text-level; not part of the output)
    stop_token_ids: list = field(default_factory=list)  # extra token ids that end a row (not returned)
    ignore_eos: bool = False          # keep going past EOS (benchmarks)

    def __post_init__(self):
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = [s for s in (self.stop or []) if s]
        if isinstance(self.stop_token_ids, int):
            self.stop_token_ids = [self.stop_token_ids]
        self.stop_token_ids = [int(t) for t in (self.stop_token_ids or [])]
        self.validate()

    @property
    def greedy(self) -> bool:
        return self.temperature <= 1e-6

    @property
    def uses_penalties(self) -> bool:
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0

    def validate(self):
        def bad(name, expected):
            raise ConfigError(f"sampling: '{name}' = {getattr(self, name)!r}: expected {expected}")
        for name in ("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty"):
            if not math.isfinite(getattr(self, name)):
                bad(name, "a finite number")
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 0:
            bad("max_new_tokens", "an integer >= 0")
        if self.temperature < 0:
            bad("temperature", "a number >= 0 (0 = greedy)")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            bad("top_k", "an integer >= 0 (0 = off)")
        if not 0.0 < self.top_p <= 1.0:
            bad("top_p", "a number in (0, 1] (1 = off)")
        if not 0.0 <= self.min_p <= 1.0:
            bad("min_p", "a number in [0, 1] (0 = off)")
        low, high = REPETITION_PENALTY_RANGE
        if not low <= self.repetition_penalty <= high:
            bad("repetition_penalty", f"a number in [{low:g}, {high:g}] (1 = off)")
        if self.seed is not None and (not isinstance(self.seed, int) or not 0 <= self.seed <= SEED_MAX):
            bad("seed", f"an integer in 0..{SEED_MAX}, or None")
        return self

    def replace(self, **changes) -> "SamplingParams":
        return dataclasses.replace(self, **changes)


FIELDS = tuple(f.name for f in dataclasses.fields(SamplingParams))


# ---- the filters, each on [batch, vocab] logits ------------------------------------------------------------

def apply_temperature(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    return logits if temperature in (0.0, 1.0) else logits / temperature


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keeps the k largest logits of each row (ties with the k-th are kept too); the rest become -inf."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, NEG_INF)


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Keeps the smallest set of most likely tokens whose probabilities add up to at least p (nucleus)."""
    if p >= 1.0:
        return logits
    probs = torch.softmax(logits.float(), dim=-1)
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    before = sorted_probs.cumsum(dim=-1) - sorted_probs     # mass of the more likely tokens
    drop_sorted = before >= p
    drop_sorted[..., 0] = False                             # the most likely token always stays
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, NEG_INF)


def min_p_filter(logits: torch.Tensor, min_p: float) -> torch.Tensor:
    """Drops tokens whose probability is below min_p times that of the most likely token."""
    if min_p <= 0.0:
        return logits
    probs = torch.softmax(logits.float(), dim=-1)
    threshold = probs.amax(dim=-1, keepdim=True) * min_p
    return logits.masked_fill(probs < threshold, NEG_INF)


class Penalties:
    """Per-row token statistics for the penalties: tokens seen in the prompt, counts of generated tokens."""

    def __init__(self, params: SamplingParams, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                 vocab_size: int):
        self.params = params
        B = input_ids.shape[0]
        self.counts = torch.zeros(B, vocab_size, dtype=torch.float32, device=input_ids.device)
        self.prompt_seen = torch.zeros(B, vocab_size, dtype=torch.bool, device=input_ids.device)
        if params.repetition_penalty != 1.0:
            ids = input_ids.clamp(0, vocab_size - 1)
            real = torch.ones_like(ids, dtype=torch.float32) if attention_mask is None else attention_mask.float()
            seen = torch.zeros(B, vocab_size, dtype=torch.float32, device=input_ids.device)
            self.prompt_seen = seen.scatter_add_(1, ids, real) > 0   # padding counts for nothing

    def update(self, tokens: torch.Tensor, active: torch.Tensor | None = None):
        """Counts the tokens just generated ([B]); rows with `active` False are not counted."""
        add = torch.ones_like(tokens, dtype=torch.float32) if active is None else active.float()
        self.counts.scatter_add_(1, tokens[:, None], add[:, None])

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        return apply_penalties(logits, self.params, self.counts, self.prompt_seen)


def apply_penalties(logits, params: SamplingParams, counts, prompt_seen=None):
    """logits [B, V] (float); counts [B, V] generated-token counts; prompt_seen [B, V] bool (or None)."""
    logits = logits.clone()
    if params.repetition_penalty != 1.0:
        seen = counts > 0
        if prompt_seen is not None:
            seen = seen | prompt_seen
        penalized = torch.where(logits > 0, logits / params.repetition_penalty, logits * params.repetition_penalty)
        logits = torch.where(seen, penalized, logits)
    if params.frequency_penalty:
        logits = logits - params.frequency_penalty * counts
    if params.presence_penalty:
        logits = logits - params.presence_penalty * (counts > 0).to(logits.dtype)
    return logits


def process_logits(logits: torch.Tensor, params: SamplingParams, penalties: Penalties | None = None):
    """The whole pipeline up to the draw: returns [B, V] fp32 logits with removed tokens at -inf."""
    logits = logits.float()
    if penalties is not None:
        logits = penalties.apply(logits)
    if params.greedy:
        return logits
    logits = apply_temperature(logits, params.temperature)
    logits = top_k_filter(logits, params.top_k)
    logits = top_p_filter(logits, params.top_p)
    return min_p_filter(logits, params.min_p)


def unusable_rows(logits: torch.Tensor) -> torch.Tensor:
    """[B] bool: rows no token can be chosen from: a NaN or +inf among their logits, or all of them -inf."""
    return logits.isnan().any(dim=-1) | logits.isposinf().any(dim=-1) | logits.isneginf().all(dim=-1)


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None = None,
           penalties: Penalties | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The next token of each row ([B], int64) from the model's last-position logits [B, V], and which rows
    had no usable logits ([B] bool, see `unusable_rows`; their token means nothing). Such a row (NaN weights,
    an overflow) fails alone: the other rows get the tokens they would get without it."""
    processed = process_logits(logits, params, penalties)
    unusable = unusable_rows(processed)
    if params.greedy:
        return processed.argmax(dim=-1), unusable
    # any finite row will do for the unusable ones: the draw of each row uses only its own probabilities
    processed = processed.masked_fill(unusable[:, None], 0.0)
    probs = torch.softmax(processed, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1), unusable


def make_generator(seed: int | None, device) -> torch.Generator | None:
    if seed is None:
        return None
    generator = torch.Generator(device=torch.device(device))
    generator.manual_seed(int(seed))
    return generator
