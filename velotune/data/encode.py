"""Sample -> token ids and labels (Hugging Face semantics: labels align with input_ids, the model shifts).

Which tokens are trained is decided on the rendered text, never with `{% generation %}` tags: the conversation
is rendered prefix by prefix, and an assistant turn's characters are those between the prompt of that turn
(history + generation prompt) and the conversation up to and including the turn. The whole text is then
tokenized once (add_special_tokens=False) and each token is trained when its first character is. Within an
assistant turn, what follows its last end-of-turn token (a newline between turns) is not trained; a turn that
has no end-of-turn token gets an EOS, so the model learns to stop.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass, field

import torch

from .formats import Sample
from .templates import render as render_template, stop_token_ids

IGNORE_INDEX = -100


@dataclass
class Encoded:
    input_ids: torch.Tensor      # int32 [T]
    labels: torch.Tensor         # int32 [T]; IGNORE_INDEX where not trained; labels[0] is always ignored
    origin: str = ""

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def num_targets(self) -> int:
        return int((self.labels != IGNORE_INDEX).sum())


@dataclass
class DataStats:
    """Counts for one split. `samples` are the examples kept; the dropped ones are counted by reason."""
    records: int = 0                 # records read (and normalised) for this split
    samples: int = 0                 # examples kept after encoding
    truncated: int = 0               # kept, cut to max_seq_length
    dropped_too_long: int = 0        # overflow="drop"
    dropped_fully_masked: int = 0    # no trained token (after truncation)
    target_tokens: int = 0           # trained tokens of the kept examples
    total_tokens: int = 0            # all tokens of the kept examples
    dropped_bad: dict = field(default_factory=dict)  # rows that made no sample, by reason (preference data)
    eval: "DataStats | None" = field(default=None, repr=False)

    def as_dict(self) -> dict:
        out = {k: v for k, v in self.__dict__.items() if k != "eval"}
        if self.eval is not None:
            out["eval"] = self.eval.as_dict()
        return out


@dataclass
class _TokenizerInfo:
    bos_id: int | None
    eos_id: int | None
    adds_bos: bool               # tokenizer(text) starts with BOS on its own
    stop_ids: set
    fast: bool


_INFO: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _info(tokenizer) -> _TokenizerInfo:
    try:
        return _INFO[tokenizer]
    except (KeyError, TypeError):
        pass
    bos = tokenizer.bos_token_id
    probe = tokenizer("a", add_special_tokens=True)["input_ids"]
    info = _TokenizerInfo(bos_id=bos, eos_id=tokenizer.eos_token_id,
                          adds_bos=bos is not None and bool(probe) and probe[0] == bos,
                          stop_ids=stop_token_ids(tokenizer), fast=bool(getattr(tokenizer, "is_fast", False)))
    try:
        _INFO[tokenizer] = info
    except TypeError:
        pass
    return info


def encode(sample: Sample, tokenizer, template: str | None, *, train_on: str = "assistant", max_len: int,
           overflow: str = "truncate", stats: DataStats | None = None, train_from: int = 0,
           expand=None) -> Encoded | None:
    """Token ids and labels for one sample, or None when it is dropped (counted in `stats`).

    `train_from=k`: of a conversation, only the assistant turns from message k on are trained (a preference
    pair's completion after a prompt that may hold earlier assistant turns).
    `expand`: applied to each rendering of a conversation before it is tokenized (the image tokens of a vision
    sample go in after the chat template, as transformers' processors put them: a template that trims its text
    would otherwise eat the newlines around an image)."""
    if train_on not in ("assistant", "all"):
        raise ValueError(f"train_on={train_on!r}: expected 'assistant' or 'all'")
    if overflow not in ("truncate", "drop"):
        raise ValueError(f"overflow={overflow!r}: expected 'truncate' or 'drop'")
    stats = stats if stats is not None else DataStats()
    info = _info(tokenizer)
    if sample.is_chat:
        if template is None:
            raise ValueError("chat samples need a chat template")
        text, spans = _chat_spans(sample, tokenizer, template, train_on, train_from, expand)
        ids, owner = _tokenize(text, spans, tokenizer, info)
        if train_on == "assistant":
            ids, trained = _close_turns(ids, owner, info)
        else:
            trained = [o >= 0 for o in owner]
    else:
        prompt = sample.prompt or ""
        text = prompt + sample.text
        spans = [(0 if train_on == "all" else len(prompt), len(text))]
        ids, owner = _tokenize(text, spans, tokenizer, info)
        trained = [o >= 0 for o in owner]
        if info.eos_id is not None:
            ids, trained = ids + [info.eos_id], trained + [True]
    if info.adds_bos and (not ids or ids[0] != info.bos_id):
        ids, trained = [info.bos_id] + ids, [False] + trained

    truncated = len(ids) > max_len
    if truncated:
        if overflow == "drop":
            stats.dropped_too_long += 1
            return None
        ids, trained = ids[:max_len], trained[:max_len]
    labels = [i if t else IGNORE_INDEX for i, t in zip(ids, trained)]
    if labels:
        labels[0] = IGNORE_INDEX  # nothing predicts the first token; in a packed row it must not be a target
    example = Encoded(torch.tensor(ids, dtype=torch.int32), torch.tensor(labels, dtype=torch.int32), sample.origin)
    targets = example.num_targets
    if targets == 0:
        stats.dropped_fully_masked += 1
        return None
    stats.samples += 1
    stats.truncated += truncated
    stats.target_tokens += targets
    stats.total_tokens += len(example)
    return example


def _chat_spans(sample: Sample, tokenizer, template: str, train_on: str, train_from: int = 0, expand=None):
    """The rendered conversation and the character spans of its assistant turns (or all of it)."""
    messages, where = sample.messages, sample.origin or "<sample>"

    def render(*args, **kwargs):
        text = render_template(*args, **kwargs)
        return expand(text) if expand is not None else text
    full = render(tokenizer, template, messages, add_generation_prompt=False, where=where)
    if train_on == "all":
        return full, [(0, len(full))]
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant" or i == 0 or i < train_from:  # a leading assistant message: context
            continue
        head = render(tokenizer, template, messages[:i], add_generation_prompt=True, where=where)
        upto = full if i == len(messages) - 1 else render(tokenizer, template, messages[:i + 1],
                                                         add_generation_prompt=False, where=where)
        # Common prefixes rather than startswith: some templates close a conversation differently
        # (Phi-3 appends EOS to the last turn), and then only the shared part belongs to this turn.
        start, end = _common_prefix(head, full), _common_prefix(upto, full)
        if end > start:
            spans.append((start, end))
    return full, spans


def _common_prefix(a: str, b: str) -> int:
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    lo, hi = 0, n  # binary search on the first difference
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo


def _tokenize(text: str, spans, tokenizer, info: _TokenizerInfo):
    """Token ids of `text`, and per token the index of the span it starts in (-1: none)."""
    if info.fast:
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is not None:  # the Rust tokenizer directly: same ids, less overhead
            enc = backend.encode(text, add_special_tokens=False)
            ids, offsets = list(enc.ids), enc.offsets
        else:
            enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
            ids, offsets = list(enc["input_ids"]), enc["offset_mapping"]
        owner, k = [], 0
        for start, _ in offsets:
            while k < len(spans) and start >= spans[k][1]:
                k += 1
            owner.append(k if k < len(spans) and spans[k][0] <= start else -1)
        return ids, owner
    # Slow tokenizers have no offsets: tokenize the pieces between span boundaries one by one.
    ids, owner, pos = [], [], 0
    for k, (start, end) in enumerate(spans):
        for piece, who in ((text[pos:start], -1), (text[start:end], k)):
            if piece:
                piece_ids = tokenizer.encode(piece, add_special_tokens=False)
                ids += piece_ids
                owner += [who] * len(piece_ids)
        pos = end
    if pos < len(text):
        piece_ids = tokenizer.encode(text[pos:], add_special_tokens=False)
        ids += piece_ids
        owner += [-1] * len(piece_ids)
    return ids, owner


def _close_turns(ids, owner, info: _TokenizerInfo):
    """Trains each assistant turn up to its last end-of-turn token; adds EOS to a turn that has none."""
    last_token, last_stop = {}, {}
    for j, (token, who) in enumerate(zip(ids, owner)):
        if who >= 0:
            last_token[who] = j
            if token in info.stop_ids:
                last_stop[who] = j
    trained = [who >= 0 and j <= last_stop.get(who, last_token[who]) for j, who in enumerate(owner)]
    if info.eos_id is not None:
        ids = list(ids)
        for j in sorted((last_token[w] for w in last_token if w not in last_stop), reverse=True):
            ids.insert(j + 1, info.eos_id)
            trained.insert(j + 1, True)
    return ids, trained


TRAINED_OPEN, TRAINED_CLOSE = "[[", "]]"


def marked_text(example: Encoded, tokenizer) -> str:
    """The example's text with the trained tokens (those the loss is taken on) between [[ and ]]: the loss mask
    made visible in a terminal without colours."""
    trained = (example.labels != IGNORE_INDEX).tolist()
    ids = example.input_ids.tolist()
    pieces, start = [], 0
    for end in range(1, len(ids) + 1):
        if end == len(ids) or trained[end] != trained[start]:
            text = tokenizer.decode(ids[start:end], skip_special_tokens=False)
            pieces.append(f"{TRAINED_OPEN}{text}{TRAINED_CLOSE}" if trained[start] else text)
            start = end
    return "".join(pieces)
