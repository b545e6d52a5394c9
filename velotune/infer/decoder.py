"""Token-level decoding: prefill the prompt into a static KV cache, then decode one token per step.

`Decoder` / `generate_ids` take token ids and give token ids and per-step log-probs; no tokenizer. Rows of a
batch are left-padded and carry an `attention_mask` (1 = real token); each row stops on its own.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Iterator

import torch

from ..errors import VelotuneError
from ..models.interface import require_model
from .cache import DEFAULT_BLOCK_SIZE, KVCache
from .defaults import eos_token_ids as find_eos_token_ids
from .sampling import Penalties, SamplingParams, make_generator, sample

# Prefill runs in chunks of about this many tokens (all rows together), so that the logits of a long prompt
# ([tokens, vocab]) never take much memory; models that support `logits_to_keep` prefill in one go.
PREFILL_TOKEN_BUDGET = 2048
MIN_PREFILL_CHUNK = 64

FINISH_EOS, FINISH_STOP, FINISH_LENGTH = "eos", "stop", "length"
FINISH_NONFINITE = "nonfinite"   # the row's logits held NaN or infinity: no token could be chosen

log = logging.getLogger("velotune")


class NonFiniteLogitsError(VelotuneError):
    """A prompt's logits became NaN or infinite (NaN weights, an overflow in float16, ...)."""

    def __init__(self, generated: int, prompt_index: int | None = None):
        which = "" if prompt_index is None else f" for prompt {prompt_index}"
        super().__init__(f"the model's logits{which} became NaN or infinite after {generated} generated "
                         "token(s), so no next token could be chosen: the weights hold NaN/inf, or the values "
                         "overflow in this dtype (try float32 or bfloat16)")


@dataclass
class GenerationOutput:
    tokens: list            # per row: generated ids, without the EOS / stop token that ended the row
    logprobs: list          # per row: log-prob of each generated id under the model (raw logits, no sampling)
    finish_reasons: list    # per row: "eos" (an EOS or stop_token_ids id), "stop" (a stop string), "length",
                            # "nonfinite" (NaN / inf logits: the row failed; the others are not affected)
    finish_tokens: list     # per row: the id that ended it ("eos"), else None
    prompt_lengths: list    # per row: real (unpadded) prompt tokens
    logits: list | None = None  # with return_logits: per step, [rows, vocab] raw logits (fp32, CPU)


class Decoder:
    """One request: a batch of left-padded prompts decoded together. Iterate `steps()`; between steps the
    caller may `finish(row, reason)` rows (e.g. on a stop string)."""

    def __init__(self, model, input_ids, attention_mask=None, params: SamplingParams | None = None, *,
                 eos_token_ids=(), pad_token_id: int | None = None, generator: torch.Generator | None = None,
                 prefill_chunk_size: int | None = None, block_size: int = DEFAULT_BLOCK_SIZE,
                 return_logits: bool = False, compact: bool = True, image_inputs: dict | None = None):
        self.model = require_model(model, "generation")
        self.params = params or SamplingParams()
        device = model_device(model)
        input_ids = torch.as_tensor(input_ids, dtype=torch.long)
        if input_ids.dim() == 1:
            input_ids = input_ids[None]
        self.input_ids = input_ids.to(device)
        B, P = self.input_ids.shape
        if attention_mask is not None:
            attention_mask = torch.as_tensor(attention_mask).to(device=device, dtype=torch.long)
            if attention_mask.shape != self.input_ids.shape:
                raise ValueError(f"attention_mask {list(attention_mask.shape)} does not match input_ids "
                                 f"{list(self.input_ids.shape)}")
            if bool(attention_mask.all()):
                attention_mask = None  # no padding: plain causal attention (faster kernels)
        self.batch_size, self.prompt_length = B, P
        limit = model.max_seq_length
        if limit is not None and P + self.params.max_new_tokens > limit:
            log.warning("prompt (%d tokens) + max_new_tokens (%d) exceed the model's max_seq_length (%d): "
                        "quality may drop past it", P, self.params.max_new_tokens, limit)
        self.prompt_lengths = ([P] * B if attention_mask is None else attention_mask.sum(-1).tolist())
        if min(self.prompt_lengths, default=1) == 0:
            raise ValueError("a prompt is empty: every row needs at least one token")
        self.eos = set() if self.params.ignore_eos else {int(t) for t in eos_token_ids}
        self.stop_ids = set(self.params.stop_token_ids)
        self.pad_token_id = int(pad_token_id if pad_token_id is not None else next(iter(self.eos), 0))
        self.generator = generator if generator is not None else make_generator(self.params.seed, device)
        self.prefill_chunk_size = prefill_chunk_size
        self.block_size = block_size
        self.return_logits = return_logits
        self.compact = compact
        # Full mask for prompt + everything generated, filled once; each forward takes a prefix.
        self.mask = None
        if attention_mask is not None:
            self.mask = torch.ones(B, P + self.params.max_new_tokens, dtype=torch.long, device=device)
            self.mask[:, :P] = attention_mask
        self.tokens = [[] for _ in range(B)]
        self.logprobs = [[] for _ in range(B)]
        self.finish_reasons: list = [None] * B
        self.finish_tokens: list = [None] * B
        self.step_logits: list = []
        self.rows = list(range(B))   # batch position -> original row (rows are dropped as they finish)
        self.cache = None
        # A vision-language prompt's pixel tensors (transformers' names), read by the prefill's one forward.
        self.image_inputs = {k: v.to(device) for k, v in (image_inputs or {}).items()}

    # ---- control -------------------------------------------------------------------------------------------
    def finish(self, row: int, reason: str, token: int | None = None):
        if self.finish_reasons[row] is None:
            self.finish_reasons[row] = reason
            self.finish_tokens[row] = token

    def active(self, row: int) -> bool:
        return self.finish_reasons[row] is None

    @property
    def done(self) -> bool:
        return all(r is not None for r in self.finish_reasons)

    def output(self) -> GenerationOutput:
        return GenerationOutput(self.tokens, self.logprobs, list(self.finish_reasons), list(self.finish_tokens),
                                list(self.prompt_lengths), self.step_logits if self.return_logits else None)

    # ---- the loop ------------------------------------------------------------------------------------------
    def steps(self) -> Iterator[list]:
        """Yields, per step, the new token of every row (None for rows already finished). A row's EOS or stop
        token id finishes it (and is yielded as None). At most `max_new_tokens` steps."""
        max_new = self.params.max_new_tokens
        if max_new == 0:
            for row in self.rows:
                self.finish(row, FINISH_LENGTH)
            return
        self.cache = KVCache.for_model(self.model, self.prompt_length + max_new, self.block_size)
        logits = self._prefill()
        ids, mask_width = self.input_ids, self.prompt_length
        penalties = Penalties(self.params, ids, self._mask(mask_width), logits.shape[-1]) \
            if self.params.uses_penalties else None
        for step in range(max_new):
            next_ids, unusable = sample(logits, self.params, self.generator, penalties)
            logp = torch.log_softmax(logits.float(), dim=-1).gather(-1, next_ids[:, None]).squeeze(-1)
            if self.return_logits:
                full = torch.full((self.batch_size, logits.shape[-1]), float("nan"))
                full[self.rows] = logits.float().cpu()
                self.step_logits.append(full)
            chosen, chosen_logp, failed = next_ids.tolist(), logp.tolist(), unusable.tolist()
            out = [None] * self.batch_size
            for pos, row in enumerate(self.rows):
                if not self.active(row):
                    continue
                if failed[pos]:
                    self.finish(row, FINISH_NONFINITE)
                    continue
                token = chosen[pos]
                if token in self.eos or token in self.stop_ids:
                    self.finish(row, FINISH_EOS, token)
                    continue
                self.tokens[row].append(token)
                self.logprobs[row].append(chosen_logp[pos])
                out[row] = token
            yield out
            if step == max_new - 1:
                for row in self.rows:
                    self.finish(row, FINISH_LENGTH)
            if self.done:
                return
            still = [self.active(r) for r in self.rows]
            active = None if all(still) else torch.tensor(still, device=next_ids.device)
            if penalties is not None:
                penalties.update(next_ids, active)
            if active is not None:   # finished rows are fed padding until they are dropped
                next_ids = torch.where(active, next_ids, self.pad_token_id)
                if self.compact and sum(still) <= len(self.rows) // 2:
                    next_ids, penalties = self._drop_finished(active, next_ids, penalties)
            mask_width += 1
            logits = self._forward(next_ids[:, None], self._mask(mask_width))

    # ---- pieces --------------------------------------------------------------------------------------------
    def _mask(self, width):
        return None if self.mask is None else self.mask[:, :width]

    def _forward(self, ids, mask, **image_inputs):
        keep = 1 if self.model.supports_logits_to_keep else 0
        return self.model(ids, attention_mask=mask, cache=self.cache, logits_to_keep=keep,
                          **image_inputs).logits[:, -1]

    def _prefill(self):
        B, P = self.input_ids.shape
        if self.image_inputs:  # the images' features go over the prompt's image tokens: one forward holds them all
            return self._forward(self.input_ids, self._mask(P), **self.image_inputs)
        chunk = self.prefill_chunk_size
        if chunk is None:
            chunk = P if self.model.supports_logits_to_keep else max(MIN_PREFILL_CHUNK, PREFILL_TOKEN_BUDGET // B)
        logits = None
        for start in range(0, P, chunk):
            end = min(P, start + chunk)
            logits = self._forward(self.input_ids[:, start:end], self._mask(end))
        return logits

    def _drop_finished(self, active, next_ids, penalties):
        keep = active.nonzero().squeeze(-1)
        self.rows = [self.rows[i] for i in keep.tolist()]
        self.cache.select_rows(keep)
        if self.mask is not None:
            self.mask = self.mask.index_select(0, keep)
        if penalties is not None:
            penalties.counts = penalties.counts.index_select(0, keep)
            penalties.prompt_seen = penalties.prompt_seen.index_select(0, keep)
        return next_ids.index_select(0, keep), penalties


def model_device(model) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


class _EvalMode:
    """Puts the model in eval mode for the duration; restores its training flag."""

    def __init__(self, model):
        self.model = model

    def __enter__(self):
        self.was_training = self.model.training
        self.model.eval()

    def __exit__(self, *exc):
        if self.was_training:
            self.model.train()


@torch.inference_mode()
def generate_ids(model, input_ids, attention_mask=None, params: SamplingParams | None = None, *,
                 eos_token_ids=None, pad_token_id: int | None = None, generator: torch.Generator | None = None,
                 prefill_chunk_size: int | None = None, return_logits: bool = False, **sampling) -> GenerationOutput:
    """Token-level generation, no tokenizer: `input_ids` [B, T] (left-padded, with `attention_mask`) or [T].

    `params` is a SamplingParams (default: greedy, 128 new tokens); keyword settings (`max_new_tokens=...`)
    replace its fields. `eos_token_ids` default to the model's (generation_config.json and config.json).
    Returns the generated tokens, their log-probs and why each row ended.
    """
    require_model(model, "generation")
    params = (params or SamplingParams()).replace(**sampling) if sampling else (params or SamplingParams())
    if eos_token_ids is None:
        eos_token_ids = find_eos_token_ids(model)
    elif isinstance(eos_token_ids, int):
        eos_token_ids = [eos_token_ids]
    decoder = Decoder(model, input_ids, attention_mask, params, eos_token_ids=eos_token_ids,
                      pad_token_id=pad_token_id, generator=generator, prefill_chunk_size=prefill_chunk_size,
                      return_logits=return_logits)
    with _EvalMode(model):
        for _ in decoder.steps():
            pass
    return decoder.output()


