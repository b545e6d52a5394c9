"""Batches of LongTensors from encoded examples.

Packed: each row holds several examples; `document_ids` number them within the row (0, 1, ...), which is how the
model knows where a document begins (no attention across examples), and `position_ids` restart at 0 for each (the
positions each has alone, for RoPE); the row's tail padding is a document of its own with labels -100. Not packed:
one example per row, right padding, `attention_mask` 1 for real tokens.
Rows are as long as the longest row of their batch, rounded up to one of a few bucket lengths (at most
max_seq_length): a run then meets few distinct widths, and the CPU's per-shape kernel caches stop growing
(kernels/shape_buckets.py).
"""
from __future__ import annotations

from typing import Iterator

import torch

from ..kernels.shape_buckets import bucket_length
from .encode import IGNORE_INDEX, Encoded
from .packing import plan_epoch


def plan_for(examples: list[Encoded], *, batch_size: int, max_seq_length: int, packing: bool, seed: int,
             epoch: int, shuffle: bool = True, rank: int = 0, world_size: int = 1):
    return plan_epoch([len(e) for e in examples], batch_size=batch_size, max_seq_length=max_seq_length,
                      packing=packing, seed=seed, epoch=epoch, shuffle=shuffle, rank=rank, world_size=world_size)


def num_batches(examples: list[Encoded], *, batch_size: int, max_seq_length: int, packing: bool, seed: int = 0,
                epoch: int = 0, shuffle: bool = True, rank: int = 0, world_size: int = 1, pad_id=None) -> int:
    """Batches in epoch `epoch`. With packing the count depends on the epoch's order (first-fit), so it is
    planned, and may differ by a batch or two between epochs. `pad_id` is accepted (and unused) so that the
    keyword arguments of `batch_iterator` can be passed as they are."""
    if not packing:
        total = -(-len(examples) // batch_size)
        return total // world_size if world_size > 1 else total
    return len(plan_for(examples, batch_size=batch_size, max_seq_length=max_seq_length, packing=True, seed=seed,
                        epoch=epoch, shuffle=shuffle, rank=rank, world_size=world_size))


def batch_iterator(examples: list[Encoded], *, batch_size: int, max_seq_length: int, packing: bool, pad_id: int,
                   seed: int, epoch: int, shuffle: bool = True, start_batch: int = 0, rank: int = 0,
                   world_size: int = 1) -> Iterator[dict]:
    """The batches of one epoch, in a fixed order for (seed, epoch); `start_batch=k` skips the first k."""
    if pad_id is None:
        raise ValueError("pad_id is None: set the tokenizer's pad token (velotune uses EOS when it has none)")
    plan = plan_for(examples, batch_size=batch_size, max_seq_length=max_seq_length, packing=packing, seed=seed,
                    epoch=epoch, shuffle=shuffle, rank=rank, world_size=world_size)
    for rows in plan[start_batch:]:
        yield collate([[examples[i] for i in row] for row in rows], pad_id=pad_id, packing=packing,
                      max_width=max_seq_length)


def collate(rows: list[list[Encoded]], *, pad_id: int, packing: bool, max_width: int | None = None,
            bucket: bool = True, padding_free: bool = False) -> dict:
    """A batch from rows of examples (one example per row when not packing), as wide as its longest row rounded
    up to a bucket length (`bucket`; else exactly as wide), but no wider than `max_width` (the run's
    max_seq_length) when given.

    `padding_free` (without packing): the same samples, in their order, as rows of documents laid out to hold the
    fewest positions (`fewest_positions`), so the linears run on little or no padding (padding to a batch's
    longest sample costs ~10-60% of a chat batch's positions) while attention stays within each sample, exactly as
    in its own row. Rows stay within `max_width` (max_seq_length), as packed rows do: attention paths that fall
    back to a dense [T, T] mask (a transformers model, soft-capped scores) cost no more than with packing."""
    if padding_free and not packing and len(rows) > 1:
        rows, packing = fewest_positions([example for row in rows for example in row], max_width), True
    longest = max(sum(len(e) for e in row) for row in rows)
    width = bucket_length(longest, cap=max_width) if bucket else longest
    B = len(rows)
    input_ids = torch.full((B, width), pad_id, dtype=torch.long)
    labels = torch.full((B, width), IGNORE_INDEX, dtype=torch.long)
    if packing:
        position_ids = torch.zeros((B, width), dtype=torch.long)
        document_ids = torch.zeros((B, width), dtype=torch.long)
        for b, row in enumerate(rows):
            at = 0
            for doc, example in enumerate(row):
                n = len(example)
                input_ids[b, at:at + n] = example.input_ids
                labels[b, at:at + n] = example.labels
                position_ids[b, at:at + n] = torch.arange(n)
                document_ids[b, at:at + n] = doc
                at += n
            position_ids[b, at:] = torch.arange(width - at)  # the tail padding: a document of its own
            document_ids[b, at:] = len(row)
        return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids, "document_ids": document_ids}
    attention_mask = torch.zeros((B, width), dtype=torch.long)
    for b, row in enumerate(rows):
        if len(row) != 1:
            raise ValueError("without packing each row holds one example")
        n = len(row[0])
        input_ids[b, :n] = row[0].input_ids
        labels[b, :n] = row[0].labels
        attention_mask[b, :n] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


def fewest_positions(examples: list[Encoded], cap: int | None) -> list[list[Encoded]]:
    """Consecutive examples as rows (order kept) with the fewest rows x widest row: one row per example, or rows
    filled up to a width between the longest example and `cap` (the widths that would give 1, 2, ... rows)."""
    lengths = [len(e) for e in examples]
    longest, total = max(lengths), sum(lengths)
    best, best_cost = [[e] for e in examples], len(examples) * longest
    widths = {max(longest, -(-total // r)) for r in range(1, len(examples))} | ({cap} if cap else set())
    for width in sorted(w for w in widths if cap is None or w <= cap):
        rows = _next_fit(examples, width)
        cost = len(rows) * max(sum(len(e) for e in row) for row in rows)
        if cost < best_cost:
            best, best_cost = rows, cost
    return best


def _next_fit(examples: list[Encoded], capacity: int | None) -> list[list[Encoded]]:
    """Consecutive examples gathered into rows of at most `capacity` tokens (None: one row), order kept: the
    images of a vision batch follow its samples' order."""
    rows, room = [], 0
    for example in examples:
        if rows and (capacity is None or len(example) <= room):
            rows[-1].append(example)
            room -= len(example)
        else:
            rows.append([example])
            room = capacity - len(example) if capacity is not None else 0
    return rows


def count_target_tokens(batch: dict) -> int:
    """Tokens the loss is taken on: labels != -100 after the shift (position t predicts token t+1)."""
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
