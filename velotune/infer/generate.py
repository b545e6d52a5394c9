"""Generation: prefill the prompt into a static KV cache, then decode one token per step.

Layers, from the bottom:
- `Decoder` / `generate_ids`: token ids in, token ids and per-step log-probs out; no tokenizer. Rows of a batch
  are left-padded and carry an `attention_mask` (1 = real token); each row stops on its own.
- `stream_batch`: text events for a batch of prompts (strings or chat messages), with stop strings and
  incremental decoding that only ever gives out complete characters.
- `generate`, `stream`, `generate_batch`: the public functions (`vt.generate`, `vt.stream`).

Everything runs under `torch.inference_mode()` with the model in eval mode (its previous mode is restored).
Only the model's forward is used (`model(ids, attention_mask=..., cache=...)`), so LoRA-wrapped and quantized
models work as they are.
"""
from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass, field
from typing import Iterator

import torch

from ..errors import VelotuneError
from .cache import DEFAULT_BLOCK_SIZE, KVCache
from .defaults import eos_token_ids as find_eos_token_ids
from .defaults import read_generation_config, resolve_sampling
from .sampling import Penalties, SamplingParams, make_generator, sample

# Prefill runs in chunks of about this many tokens (all rows together), so that the logits of a long prompt
# ([tokens, vocab]) never take much memory; models whose forward takes `logits_to_keep` prefill in one go.
PREFILL_TOKEN_BUDGET = 2048
MIN_PREFILL_CHUNK = 64

FINISH_EOS, FINISH_STOP, FINISH_LENGTH = "eos", "stop", "length"

log = logging.getLogger("velotune")


# ==== token level ===========================================================================================

@dataclass
class GenerationOutput:
    tokens: list            # per row: generated ids, without the EOS / stop token that ended the row
    logprobs: list          # per row: log-prob of each generated id under the model (raw logits, no sampling)
    finish_reasons: list    # per row: "eos" (an EOS or stop_token_ids id), "stop" (a stop string), "length"
    finish_tokens: list     # per row: the id that ended it ("eos"), else None
    prompt_lengths: list    # per row: real (unpadded) prompt tokens
    logits: list | None = None  # with return_logits: per step, [rows, vocab] raw logits (fp32, CPU)


class Decoder:
    """One request: a batch of left-padded prompts decoded together. Iterate `steps()`; between steps the
    caller may `finish(row, reason)` rows (e.g. on a stop string)."""

    def __init__(self, model, input_ids, attention_mask=None, params: SamplingParams | None = None, *,
                 eos_token_ids=(), pad_token_id: int | None = None, generator: torch.Generator | None = None,
                 prefill_chunk_size: int | None = None, block_size: int = DEFAULT_BLOCK_SIZE,
                 return_logits: bool = False, compact: bool = True):
        self.model = model
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
        limit = getattr(model, "max_seq_length", None)
        if isinstance(limit, int) and P + self.params.max_new_tokens > limit:
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
            next_ids = sample(logits, self.params, self.generator, penalties)
            logp = torch.log_softmax(logits.float(), dim=-1).gather(-1, next_ids[:, None]).squeeze(-1)
            if self.return_logits:
                full = torch.full((self.batch_size, logits.shape[-1]), float("nan"))
                full[self.rows] = logits.float().cpu()
                self.step_logits.append(full)
            chosen, chosen_logp = next_ids.tolist(), logp.tolist()
            out = [None] * self.batch_size
            for pos, row in enumerate(self.rows):
                if not self.active(row):
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

    def _forward(self, ids, mask):
        kwargs = {"logits_to_keep": 1} if _takes_logits_to_keep(self.model) else {}
        out = self.model(ids, attention_mask=mask, cache=self.cache, **kwargs)
        logits = out.logits if hasattr(out, "logits") else out[0]
        return logits[:, -1]

    def _prefill(self):
        B, P = self.input_ids.shape
        chunk = self.prefill_chunk_size
        if chunk is None:
            chunk = P if _takes_logits_to_keep(self.model) else max(MIN_PREFILL_CHUNK, PREFILL_TOKEN_BUDGET // B)
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


_LOGITS_TO_KEEP: dict = {}


def _takes_logits_to_keep(model) -> bool:
    key = type(model)
    if key not in _LOGITS_TO_KEEP:
        try:
            _LOGITS_TO_KEEP[key] = "logits_to_keep" in inspect.signature(model.forward).parameters
        except (TypeError, ValueError):
            _LOGITS_TO_KEEP[key] = False
    return _LOGITS_TO_KEEP[key]


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


# ==== text level =============================================================================================

class IncrementalDetokenizer:
    """Turns tokens into text as they come, only ever giving out complete characters.

    It decodes a short window (a few tokens of context plus the new ones) and gives out what the new tokens add,
    once that no longer ends in U+FFFD (a multi-byte character split across tokens). The context tokens keep the
    decoder's word-boundary handling (e.g. SentencePiece's leading space) right.
    """

    CONTEXT = 5

    def __init__(self, tokenizer, prompt_ids=(), skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids = list(prompt_ids)[-self.CONTEXT:]
        self.prefix_offset = 0
        self.read_offset = len(self.ids)

    def _decode(self, ids):
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def _delta(self):
        prefix = self._decode(self.ids[self.prefix_offset:self.read_offset])
        full = self._decode(self.ids[self.prefix_offset:])
        return full[len(prefix):] if len(full) > len(prefix) else ""

    def add(self, token: int) -> str:
        self.ids.append(int(token))
        delta = self._delta()
        if not delta or delta.endswith("\ufffd"):
            return ""
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return delta

    def flush(self) -> str:
        """Whatever is still held back (at the end: even an incomplete character, as U+FFFD)."""
        delta = self._delta()
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return delta


class _TextRow:
    """One row's text: decoded pieces, stop strings, and how much is safe to give out."""

    def __init__(self, tokenizer, prompt_ids, stop, skip_special_tokens):
        self.detok = IncrementalDetokenizer(tokenizer, prompt_ids, skip_special_tokens)
        self.stop = stop
        self.max_stop = max((len(s) for s in stop), default=0)
        self.text = ""
        self.emitted = 0
        self.stopped = False

    def push(self, piece: str) -> bool:
        """Adds decoded text; True when a stop string appeared (the text is cut before it)."""
        if not piece or self.stopped:
            return self.stopped
        search_from = max(0, len(self.text) - self.max_stop + 1)
        self.text += piece
        if self.stop:
            hits = [i for i in (self.text.find(s, search_from) for s in self.stop) if i >= 0]
            if hits:
                self.text = self.text[:min(hits)]
                self.stopped = True
        return self.stopped

    def ready(self, final: bool = False) -> str:
        """The text that can be given out now: all of it at the end; otherwise all but a tail that could still
        turn out to be the start of a stop string."""
        end = len(self.text)
        if not final and not self.stopped and self.stop:
            end -= self._held_back()
        piece = self.text[self.emitted:end]
        self.emitted = max(self.emitted, end)
        return piece

    def _held_back(self) -> int:
        for n in range(min(self.max_stop - 1, len(self.text)), 0, -1):
            tail = self.text[-n:]
            if any(s.startswith(tail) for s in self.stop):
                return n
        return 0


@dataclass
class TextEvent:
    row: int
    text: str                      # new text ("" on the final event when nothing is left)
    finished: bool = False
    finish_reason: str | None = None


@dataclass
class Completion:
    text: str
    token_ids: list
    logprobs: list
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    settings: dict = field(default_factory=dict)   # the resolved sampling values
    sources: dict = field(default_factory=dict)    # where each came from


def encode_prompt(tokenizer, prompt) -> list[int]:
    """A string as the tokenizer encodes it (with the special tokens it adds); chat messages through the
    tokenizer's chat template with the generation prompt; token ids as they are."""
    if isinstance(prompt, str):
        return list(tokenizer(prompt).input_ids)
    if torch.is_tensor(prompt):
        return [int(t) for t in prompt.reshape(-1).tolist()]
    if isinstance(prompt, (list, tuple)) and prompt and all(isinstance(m, dict) for m in prompt):
        if getattr(tokenizer, "chat_template", None) is None:
            raise VelotuneError("the tokenizer has no chat template: pass a plain string prompt, or set "
                                "tokenizer.chat_template")
        text = tokenizer.apply_chat_template(list(prompt), add_generation_prompt=True, tokenize=False)
        return list(tokenizer(text, add_special_tokens=False).input_ids)
    if isinstance(prompt, (list, tuple)) and prompt and all(isinstance(t, int) for t in prompt):
        return list(prompt)
    raise TypeError("a prompt is a string, a list of chat messages ({'role': ..., 'content': ...}) or a list "
                    f"of token ids; got {type(prompt).__name__}"
                    + (" (for several prompts use generate_batch)" if isinstance(prompt, (list, tuple)) else ""))


def left_pad(rows: list, pad_token_id: int):
    """Token id lists -> (input_ids [B, T], attention_mask [B, T]), padded on the left."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            ids[i, width - len(r):] = torch.tensor(r, dtype=torch.long)
            mask[i, width - len(r):] = 1
    return ids, mask


ENGINE_OPTIONS = ("prefill_chunk_size", "skip_special_tokens", "eos_token_ids", "block_size")


def _split_options(sampling: dict):
    options = {k: sampling.pop(k) for k in list(sampling) if k in ENGINE_OPTIONS}
    request = {k: v for k, v in sampling.items() if v is not None}
    return request, options


def _pad_id(tokenizer, eos_ids):
    pad = getattr(tokenizer, "pad_token_id", None)
    if pad is None:
        pad = eos_ids[0] if eos_ids else 0
    return int(pad)


class TextGeneration:
    """One text request over a batch of prompts: resolves the settings, encodes and left-pads the prompts, then
    `events()` decodes them; afterwards `completions()` has the details of each row."""

    def __init__(self, model, tokenizer, prompts, max_new_tokens=128, temperature=0.0, *, config=None,
                 **sampling):
        self.model, self.tokenizer = model, tokenizer
        request, options = _split_options(dict(sampling, max_new_tokens=max_new_tokens, temperature=temperature))
        self.resolved = resolve_sampling(request, config, model)
        self.params = self.resolved.params()
        extra_eos = options.get("eos_token_ids") or ()
        extra_eos = [extra_eos] if isinstance(extra_eos, int) else list(extra_eos)
        self.eos_token_ids = find_eos_token_ids(model, tokenizer, read_generation_config(model), extra=extra_eos)
        self.encoded = [encode_prompt(tokenizer, p) for p in prompts]
        self.pad_token_id = _pad_id(tokenizer, self.eos_token_ids)
        self.options = options
        self.decoder: Decoder | None = None
        self.texts: list = []

    @torch.inference_mode()
    def events(self) -> Iterator[TextEvent]:
        """`TextEvent(row, text)` with new complete text as it decodes, and one `finished=True` event per row
        (with its last text and why it ended)."""
        if not self.encoded:
            return
        input_ids, attention_mask = left_pad(self.encoded, self.pad_token_id)
        decoder = self.decoder = Decoder(
            self.model, input_ids, attention_mask, self.params, eos_token_ids=self.eos_token_ids,
            pad_token_id=self.pad_token_id, prefill_chunk_size=self.options.get("prefill_chunk_size"),
            block_size=self.options.get("block_size") or DEFAULT_BLOCK_SIZE)
        skip_special = self.options.get("skip_special_tokens", True)
        texts = self.texts = [_TextRow(self.tokenizer, ids, self.params.stop, skip_special) for ids in self.encoded]
        announced = [False] * len(texts)
        with _EvalMode(self.model):
            for new_tokens in decoder.steps():
                for row, token in enumerate(new_tokens):
                    if token is None:
                        continue
                    if texts[row].push(texts[row].detok.add(token)):
                        decoder.finish(row, FINISH_STOP)
                    piece = texts[row].ready()
                    if piece:
                        yield TextEvent(row, piece)
                for row in range(len(texts)):
                    if not announced[row] and not decoder.active(row):
                        announced[row] = True
                        yield self._final_event(row)
        for row in range(len(texts)):   # rows that ran to max_new_tokens (or max_new_tokens == 0)
            if not announced[row]:
                announced[row] = True
                yield self._final_event(row)

    def _final_event(self, row):
        text_row, decoder = self.texts[row], self.decoder
        if not text_row.stopped and text_row.push(text_row.detok.flush()):
            decoder.finish_reasons[row] = FINISH_STOP
        return TextEvent(row, text_row.ready(final=True), True, decoder.finish_reasons[row])

    def completions(self) -> list:
        d = self.decoder
        if d is None:
            return []
        return [Completion(t.text, d.tokens[i], d.logprobs[i], d.finish_reasons[i], d.prompt_lengths[i],
                           len(d.tokens[i]), dict(self.resolved.values), dict(self.resolved.sources))
                for i, t in enumerate(self.texts)]


def stream_batch(model, tokenizer, prompts, max_new_tokens=128, temperature=0.0, *, config=None,
                 **sampling) -> Iterator[TextEvent]:
    """Text events for a batch of prompts as they decode (see `TextGeneration.events`)."""
    return TextGeneration(model, tokenizer, list(prompts), max_new_tokens, temperature, config=config,
                          **sampling).events()


def generate_batch(model, tokenizer, prompts, max_new_tokens=128, temperature=0.0, *, config=None,
                   return_details: bool = False, **sampling):
    """Several prompts (strings or chat message lists, of any lengths) decoded together with left padding.
    Returns their texts, or `Completion`s (text, token ids, log-probs, finish reason, token counts, resolved
    settings) with `return_details=True`."""
    run = TextGeneration(model, tokenizer, list(prompts), max_new_tokens, temperature, config=config, **sampling)
    texts = [""] * len(run.encoded)
    for event in run.events():
        texts[event.row] += event.text
    return run.completions() if return_details else texts


def generate(model, tokenizer, prompt_or_messages, max_new_tokens=128, temperature=0.0, *, config=None,
             **sampling) -> str:
    """The model's continuation of one prompt (a string, used as is) or chat (a list of messages, through the
    tokenizer's chat template with the generation prompt).

    Sampling settings: `temperature` (0 = greedy), `top_k`, `top_p`, `min_p`, `repetition_penalty`,
    `presence_penalty`, `frequency_penalty`, `seed`, `stop` (strings; not included in the text),
    `stop_token_ids`, `ignore_eos`. Settings not given (or given as None, `max_new_tokens` and `temperature`
    included) come from `config`, then the model's generation_config.json, then velotune's family and global
    defaults (see velotune.infer.defaults; `resolve_sampling(...).values` can be passed back as keywords).
    Generation ends on any EOS id (tokenizer, generation_config.json, config.json), a stop string, or
    `max_new_tokens`.
    """
    return generate_batch(model, tokenizer, [prompt_or_messages], max_new_tokens, temperature, config=config,
                          **sampling)[0]


def stream(model, tokenizer, prompt_or_messages, max_new_tokens=128, temperature=0.0, *, config=None,
           **sampling) -> Iterator[str]:
    """Like `generate`, yielding the text in pieces as it decodes (only complete characters; never any part
    of a stop string)."""
    for event in stream_batch(model, tokenizer, [prompt_or_messages], max_new_tokens, temperature, config=config,
                              **sampling):
        if event.text:
            yield event.text
