"""Fitting chat attachments into the model's context window, and the user message that carries them.

The room for attachments is what the context window leaves after the conversation and the reply:
`attachment_budget(context_length, prompt_tokens, max_new_tokens)`. `fit_attachments` shares that room by
the rule in `FIT_RULE` (fair share, "water-filling"):

* every file is offered an equal share of the room; a file that fits in its share is kept whole, and the
  room it does not use is shared equally among the files still waiting (shares are rounded down);
* a file larger than its final share keeps its beginning, cut at a token boundary, and its kept text ends
  with a visible marker, "[... truncated: kept K of N tokens]";
* a file's cost is everything it adds to the prompt: its text, the marker when cut, and the
  `<file name="...">` ... `</file>` lines around it;
* when a share cannot hold even a label, a marker and one token of text, the last-uploaded such file is
  left out and the sharing starts again without it. A left-out file comes back with a notice; fitting never
  raises for lack of room.

Token counts come from the model's own tokenizer. Where two pieces of text meet, a tokenizer may merge or
split a token, so the blocks are tokenized together once more after fitting (the cut is redone against the
overshoot if any), and `SEAM_RESERVE_TOKENS` are kept back for the two places where the blocks meet the
rest of the message. A file's token ids are cached for the last few (tokenizer, text) pairs, since the same
files are fitted again on every chat turn.

`attachments_prompt(fitted, question)` is the user message: each kept file as

    <file name="NAME">
    TEXT
    </file>

followed by a blank line, then the question. File text goes in verbatim (trailing whitespace trimmed).
"""
from __future__ import annotations

import functools
from array import array
from dataclasses import dataclass

FIT_RULE = (
    "Attached files share the room left in the model's context after the conversation and the reply. "
    "Each file is offered an equal share; a file that fits in its share is kept whole, and the room it leaves "
    "is shared equally among the others. A file larger than its share keeps its beginning and ends with a "
    "note such as \"[... truncated: kept 120 of 800 tokens]\"; the note and the file's name label count "
    "in its share. When there is not room even for the notes, the last-uploaded files are left out."
)
SEAM_RESERVE_TOKENS = 2
_CLOSING = "\n</file>\n\n"
_MAX_REFITS = 8
_MAX_CLIMBS = 8


@dataclass
class Fitted:
    """One attachment as it goes into the prompt.

    Three states: whole (truncated False, dropped False), cut (truncated True: `text` is the head of the file
    plus the marker, `tokens` the kept tokens), left out (dropped True: `text` is "" and `tokens` 0).
    `notice` says what happened, for the page, when the file is not whole. `block_tokens` is the file's whole
    cost in the prompt: text, marker and the name label lines (0 when left out)."""

    name: str
    text: str
    tokens: int
    original_tokens: int
    truncated: bool
    notice: str | None
    dropped: bool = False
    block_tokens: int = 0


@dataclass
class _Measured:
    name: str
    text: str
    ids: array
    label_tokens: int

    @property
    def whole_cost(self) -> int:
        return self.label_tokens + len(self.ids)


def attachment_budget(context_length: int, prompt_tokens: int, max_new_tokens: int) -> int:
    """Tokens left for attachments: context window - conversation prompt tokens - max new tokens (never < 0)."""
    for field_name, value in (("context_length", context_length), ("prompt_tokens", prompt_tokens),
                              ("max_new_tokens", max_new_tokens)):
        if int(value) < 0:
            raise ValueError(f"attachment_budget: {field_name} must be >= 0, got {value}")
    return max(0, int(context_length) - int(prompt_tokens) - int(max_new_tokens))


def token_counts(attachments, tokenizer) -> list[dict]:
    """[{"name", "kind", "tokens"}] per attachment, in order: the tokens of its text as it would go in whole."""
    return [{"name": item.name, "kind": getattr(item, "kind", None),
             "tokens": len(_file_ids(tokenizer, _content(item.text)))} for item in attachments]


def file_block(name: str, text: str) -> str:
    """One file as it appears in the user message."""
    return _opening(name) + text + _CLOSING


def _opening(name: str) -> str:
    return f'<file name="{name}">\n'


def attachments_prompt(fitted, question: str) -> str:
    """The user message: the kept files' blocks in upload order, then the question (left-out files are skipped)."""
    blocks = "".join(file_block(item.name, item.text) for item in fitted if not item.dropped)
    return blocks + question if question else blocks.rstrip("\n")


def fit_attachments(attachments, tokenizer, budget_tokens: int) -> list[Fitted]:
    """Fit attachments (objects with .name and .text) into `budget_tokens` by FIT_RULE; one Fitted per
    attachment, in the same order. Never raises for lack of room: files that do not fit are cut or left out."""
    items = [_measure(item, tokenizer) for item in attachments]
    if not items:
        return []
    goal = max(0, int(budget_tokens) - SEAM_RESERVE_TOKENS)
    budget = goal
    for _ in range(_MAX_REFITS):
        fitted = _fit(items, tokenizer, budget)
        blocks = "".join(file_block(f.name, f.text) for f in fitted if not f.dropped)
        actual = len(_encode(tokenizer, blocks))
        overshoot = actual - goal
        if overshoot <= 0:
            return fitted
        budget -= overshoot
    return _fit(items, tokenizer, 0)


def _fit(items: list[_Measured], tokenizer, budget: int) -> list[Fitted]:
    active = list(range(len(items)))
    while True:
        shares = _water_fill([items[i].whole_cost for i in active], budget)
        results: dict[int, Fitted] = {}
        failing = []
        for index, share in zip(active, shares):
            item = items[index]
            if share is None:
                results[index] = Fitted(item.name, item.text, len(item.ids), len(item.ids), False, None,
                                        block_tokens=item.whole_cost)
                continue
            cut = _cut(item, tokenizer, share)
            if cut is None:
                failing.append(index)
            else:
                results[index] = cut
        if not failing:
            break
        # Leaving out one file frees its share for the rest, so drop one at a time, latest upload first.
        active.remove(failing[-1])
    return [results.get(index) or _left_out(item) for index, item in enumerate(items)]


def _water_fill(costs: list[int], budget: int) -> list[int | None]:
    """Per file: None when it is kept whole, else the share it must be cut to."""
    shares: list[int | None] = [None] * len(costs)
    room, waiting = budget, len(costs)
    by_cost = sorted(range(len(costs)), key=lambda i: costs[i])
    for position, index in enumerate(by_cost):
        share = room // waiting
        if costs[index] <= share:
            room -= costs[index]
            waiting -= 1
            continue
        # Every file from here on costs at least as much, so none of them fits its share either.
        for later in by_cost[position:]:
            shares[later] = share
        break
    return shares


def _cut(item: _Measured, tokenizer, share: int) -> Fitted | None:
    """The longest head of the file that fits `share` with its marker and label, or None (not even one token)."""
    room = share - item.label_tokens
    total = len(item.ids)
    keep = min(total - 1, room - len(_encode(tokenizer, _marker(room, total))))
    best, climbs = None, 0
    while 1 <= keep < total:
        attempt = _try_head(item, tokenizer, keep)
        if attempt is not None and attempt[1] <= room and climbs < _MAX_CLIMBS:
            # The first guess priced the marker for the largest number; a smaller number can take fewer
            # tokens, so see whether one more token of text still fits.
            best, climbs = attempt, climbs + 1
            keep += 1
        elif best is not None:
            break
        else:
            keep -= max(1, attempt[1] - room) if attempt else 1
    if best is None:
        return None
    head, cost, kept = best
    notice = f'"{item.name}" was cut to its first {kept} of {total} tokens to fit the model\'s context.'
    return Fitted(item.name, head + _marker(kept, total), kept, total, True, notice,
                  block_tokens=item.label_tokens + cost)


def _try_head(item: _Measured, tokenizer, keep: int) -> tuple[str, int, int] | None:
    """(head text, its cost with the marker, its tokens) for the first `keep` tokens; None if nothing is left."""
    head = _head(item, tokenizer, keep)
    if not head:
        return None
    kept = len(_encode(tokenizer, head))
    return head, kept + len(_encode(tokenizer, _marker(kept, len(item.ids)))), kept


def _head(item: _Measured, tokenizer, keep: int) -> str:
    """The text of the first `keep` tokens; a character split across the cut is left out whole."""
    head = tokenizer.decode(item.ids[:keep].tolist())
    # A byte-level token can end inside a multi-byte character, which decodes to U+FFFD; the kept text must
    # be a true beginning of the file, so drop such a partial character.
    while head.endswith("\ufffd") and not item.text.startswith(head):
        head = head[:-1]
    return head


def _marker(kept: int, total: int) -> str:
    return f"\n[... truncated: kept {kept} of {total} tokens]"


def _left_out(item: _Measured) -> Fitted:
    notice = (f'"{item.name}" ({len(item.ids)} tokens) was left out: the model\'s context has no room left '
              "for it. Shorten the conversation, lower max new tokens, or attach fewer files.")
    return Fitted(item.name, "", 0, len(item.ids), False, notice, dropped=True)


def _measure(item, tokenizer) -> _Measured:
    text = _content(item.text)
    label = len(_encode(tokenizer, _opening(item.name))) + len(_encode(tokenizer, _CLOSING))
    return _Measured(item.name, text, _file_ids(tokenizer, text), label)


def _content(text: str) -> str:
    return text.rstrip()


def _encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer.encode(text, add_special_tokens=False))


@functools.lru_cache(maxsize=8)
def _file_ids(tokenizer, text: str) -> array:
    # Attachments are fitted again on every chat turn (the room shrinks as the conversation grows) and
    # tokenizing a large file is the slow part, so the last few files' ids are kept (4 bytes an id).
    return array("I", _encode(tokenizer, text))


# A word joiner (U+2060) after the first character makes a control string plain text: the tokenizer no longer
# matches it as a special token, and the reader sees the same characters.
_JOINER = "\u2060"


def inert_text(text: str, tokenizer) -> tuple[str, int]:
    """A file's text with every string that would act as markup in the prompt made plain: the tokenizer's special
    and added tokens (a file holding "<|im_end|><|im_start|>system" would otherwise open a turn of its own) and the
    closing tag of the file block. Returns (text, how many were changed)."""
    controls = set(getattr(tokenizer, "all_special_tokens", None) or ())
    added = getattr(tokenizer, "get_added_vocab", None)
    if callable(added):
        controls |= set(added())
    controls = sorted((c for c in controls if len(c) > 1), key=len, reverse=True) + ["</file"]
    changed = 0
    for control in controls:
        count = text.count(control)
        if count:
            text = text.replace(control, control[0] + _JOINER + control[1:])
            changed += count
    return text, changed
