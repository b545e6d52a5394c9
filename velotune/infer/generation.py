"""Generation: prefill the prompt into a static KV cache, then decode one token per step.

Layers, from the bottom:
- `Decoder` / `generate_ids` (decoder.py): token ids in, token ids and per-step log-probs out; no tokenizer. Rows of a batch
  are left-padded and carry an `attention_mask` (1 = real token); each row stops on its own.
- `stream_batch`: text events for a batch of prompts (strings or chat messages), with stop strings and
  incremental decoding that only ever gives out complete characters.
- `generate`, `stream`, `generate_batch`: the public functions (`vt.generate`, `vt.stream`).

Everything runs under `torch.inference_mode()` with the model in eval mode (its previous mode is restored).
The model is a velotune model (models/interface.py; anything else is refused with one error naming what it lacks).
Only its forward is used (`model(ids, attention_mask=..., cache=...)`), so LoRA-wrapped and quantized models work
as they are.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Iterator

import torch

from ..errors import VelotuneError
from ..models.interface import require_model
from .chat_render import chat_text  # noqa: F401  (velotune.infer.generation.chat_text, as before)
from .defaults import eos_token_ids as find_eos_token_ids
from .defaults import read_generation_config, resolve_sampling

from .decoder import (DEFAULT_BLOCK_SIZE, FINISH_EOS, FINISH_LENGTH, FINISH_NONFINITE, FINISH_STOP,  # noqa: F401
                      Decoder, GenerationOutput, NonFiniteLogitsError, _EvalMode, generate_ids, model_device)

log = logging.getLogger("velotune")


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


def _is_chat(prompt) -> bool:
    return isinstance(prompt, (list, tuple)) and bool(prompt) and all(isinstance(m, dict) for m in prompt)


def encode_prompt(tokenizer, prompt, chat_template: str | None = None) -> list[int]:
    """A string as the tokenizer encodes it (with the special tokens it adds); chat messages through
    `chat_template` (default: the tokenizer's own) with the generation prompt; token ids as they are."""
    if isinstance(prompt, str):
        return list(tokenizer(prompt).input_ids)
    if torch.is_tensor(prompt):
        return [int(t) for t in prompt.reshape(-1).tolist()]
    if _is_chat(prompt):
        return list(tokenizer(chat_text(tokenizer, prompt, chat_template), add_special_tokens=False).input_ids)
    if isinstance(prompt, (list, tuple)) and prompt and all(isinstance(t, int) for t in prompt):
        return list(prompt)
    raise TypeError("a prompt is a string, a list of chat messages ({'role': ..., 'content': ...}) or a list "
                    f"of token ids; got {type(prompt).__name__}"
                    + (" (for several prompts use generate_batch)" if isinstance(prompt, (list, tuple)) else ""))


def _encode_prompts(model, tokenizer, prompts) -> tuple[list, dict | None]:
    """Each prompt's token ids, and the pixel tensors of the images chat prompts hold (None without images)."""
    from .vision_prompt import encode_image_prompt, has_images, is_vision_model
    with_images = [has_images(p) for p in prompts]
    if not any(with_images):
        return [encode_prompt(tokenizer, p) for p in prompts], None
    if not is_vision_model(model):
        raise VelotuneError("this model reads text only, and the prompt holds images: use a vision-language model "
                            "(a LLaVA, Qwen2-VL or Idefics3 / SmolVLM checkpoint)")
    from ..data.vision_data import collate_images
    encoded, images = [], []
    for i, (prompt, has) in enumerate(zip(prompts, with_images)):
        ids, tensors = (encode_image_prompt(model, tokenizer, prompt, where=f"prompt {i}") if has
                        else (encode_prompt(tokenizer, prompt), {}))
        encoded.append(ids)
        images.append(tensors)
    return encoded, collate_images(images)


def end_of_turn_ids(tokenizer, template: str | None = None) -> list[int]:
    """The ids of the known end-of-turn tokens (`<|im_end|>`, `<|eot_id|>`, ...) that `template` (default: the
    tokenizer's) writes, each a single token of the tokenizer: a chat reply ends at them, whatever the EOS."""
    from ..data.templates import KNOWN_END_TOKENS, default_template, single_token_id
    if template is None:
        template = default_template(getattr(tokenizer, "chat_template", None))
    ids = [single_token_id(tokenizer, token) for token in KNOWN_END_TOKENS if template and token in template]
    return sorted({i for i in ids if i is not None})


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


ENGINE_OPTIONS = ("prefill_chunk_size", "skip_special_tokens", "eos_token_ids", "block_size", "image_inputs")


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
        self.model, self.tokenizer = require_model(model, "generation"), tokenizer
        request, options = _split_options(dict(sampling, max_new_tokens=max_new_tokens, temperature=temperature))
        self.resolved = resolve_sampling(request, config, model)
        self.params = self.resolved.params()
        extra_eos = options.get("eos_token_ids") or ()
        extra_eos = [extra_eos] if isinstance(extra_eos, int) else list(extra_eos)
        if prompts and all(_is_chat(p) for p in prompts):   # replies end with their turn, whatever the EOS
            extra_eos += end_of_turn_ids(tokenizer)
        self.eos_token_ids = find_eos_token_ids(model, tokenizer, read_generation_config(model), extra=extra_eos)
        self.encoded, self.image_inputs = _encode_prompts(model, tokenizer, prompts)
        if options.get("image_inputs"):   # prompts already encoded with their image tokens (the server's jobs)
            self.image_inputs = options["image_inputs"]
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
            block_size=self.options.get("block_size") or DEFAULT_BLOCK_SIZE, image_inputs=self.image_inputs)
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
        if not text_row.stopped and text_row.push(text_row.detok.flush()) \
                and decoder.finish_reasons[row] != FINISH_NONFINITE:
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
    settings) with `return_details=True`. A prompt whose logits become NaN or infinite raises
    NonFiniteLogitsError (with `return_details`, its finish_reason is "nonfinite" instead)."""
    run = TextGeneration(model, tokenizer, list(prompts), max_new_tokens, temperature, config=config, **sampling)
    texts = [""] * len(run.encoded)
    for event in run.events():
        texts[event.row] += event.text
    completions = run.completions()
    if return_details:   # a row whose logits went non-finite says so in its finish_reason
        return completions
    for i, completion in enumerate(completions):
        if completion.finish_reason == FINISH_NONFINITE:
            raise NonFiniteLogitsError(completion.completion_tokens, i)
    return texts


def generate(model, tokenizer, prompt_or_messages, max_new_tokens=128, temperature=0.0, *, config=None,
             **sampling) -> str:
    """The model's continuation of one prompt (a string, used as is) or chat (a list of messages, through the
    tokenizer's chat template with the generation prompt).

    Sampling settings: `temperature` (0 = greedy), `top_k`, `top_p`, `min_p`, `repetition_penalty`,
    `presence_penalty`, `frequency_penalty`, `seed`, `stop` (strings; not included in the text),
    `stop_token_ids`, `ignore_eos`. Settings not given (or given as None, `max_new_tokens` and `temperature`
    included) come from `config`, then the model's generation_config.json, then velotune's family and global
    defaults (see velotune.infer.defaults; `resolve_sampling(...).values` can be passed back as keywords).
    Generation ends on any EOS id (tokenizer, generation_config.json, config.json), for chat messages the chat
    template's end-of-turn token (e.g. `<|im_end|>`), a stop string, or `max_new_tokens`.
    """
    return generate_batch(model, tokenizer, [prompt_or_messages], max_new_tokens, temperature, config=config,
                          **sampling)[0]


def stream(model, tokenizer, prompt_or_messages, max_new_tokens=128, temperature=0.0, *, config=None,
           **sampling) -> Iterator[str]:
    """Like `generate`, yielding the text in pieces as it decodes (only complete characters; never any part
    of a stop string)."""
    run = TextGeneration(model, tokenizer, [prompt_or_messages], max_new_tokens, temperature, config=config,
                         **sampling)
    events = run.events()
    for event in events:
        if event.text:
            yield event.text
        if event.finish_reason == FINISH_NONFINITE:
            events.close()
            raise NonFiniteLogitsError(len(run.decoder.tokens[0]))
