"""Checks of config.json fields that every model family's Args share: each raises a CheckpointError naming the
file and the field, with the same words whichever family reads it."""
from __future__ import annotations

from ..errors import CheckpointError


def is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_fields(args, source: str, *, positive_ints=(), probabilities=(), positive_floats=(), flags=(),
                 token_ids=()):
    """Each named field of `args` is of its kind; a token id is null or below args.vocab_size."""
    for name in positive_ints:
        value = getattr(args, name)
        if not is_int(value) or value <= 0:
            raise CheckpointError(f"{source}: field '{name}' must be a positive integer, got {value!r}")
    for name in probabilities:
        value = getattr(args, name)
        if not is_number(value) or not 0 <= value < 1:
            raise CheckpointError(f"{source}: field '{name}' must be a probability in [0, 1), got {value!r}")
    for name in positive_floats:
        value = getattr(args, name)
        if not is_number(value) or not 0 < value < float("inf"):
            raise CheckpointError(f"{source}: field '{name}' must be a positive number, got {value!r}")
    for name in flags:
        if not isinstance(getattr(args, name), bool):
            raise CheckpointError(f"{source}: field '{name}' must be true or false, got {getattr(args, name)!r}")
    for name in token_ids:
        value = getattr(args, name)
        if value is not None and (not is_int(value) or not 0 <= value < args.vocab_size):
            raise CheckpointError(f"{source}: field '{name}' must be null or a token id below vocab_size "
                                  f"({args.vocab_size}), got {value!r}")
