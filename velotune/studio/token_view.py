"""Token ids as the pieces a page shows: each token's text and whether the loss trains on it."""
from __future__ import annotations


def token_pieces(tokenizer, ids, trained=None) -> list[dict]:
    """[{"id", "text", "trained"}] for `ids`; `trained` holds one bool per id (None: nothing is marked trained).

    Each piece is decoded on its own, so a token that is part of a multi-byte character shows as the
    replacement character; joining the pieces of whole characters gives back the text."""
    ids = [int(i) for i in ids]
    flags = [False] * len(ids) if trained is None else [bool(t) for t in trained]
    if len(flags) != len(ids):
        raise ValueError(f"token_pieces: {len(ids)} ids but {len(flags)} trained flags")
    special = set(getattr(tokenizer, "all_special_ids", None) or ())
    return [{"id": i, "text": tokenizer.decode([i], skip_special_tokens=False), "trained": flag,
             "special": i in special} for i, flag in zip(ids, flags)]


def trained_flags(labels, ignore_index: int = -100) -> list[bool]:
    """Per position: whether a label is set (the loss trains on predicting this token)."""
    return [int(label) != ignore_index for label in labels]
