"""Planning an epoch: a seeded order of examples, then rows (packed or one example each), then batches.

The plan holds only indices, so it is cheap to rebuild: resuming at batch k of epoch e rebuilds the plan of
epoch e from (seed, epoch) and starts at k, with no tensors made for the skipped batches.
"""
from __future__ import annotations

import torch


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    # Distinct for every (seed, epoch) pair, unlike seed + epoch.
    return torch.Generator().manual_seed((int(seed) * 1_000_003 + int(epoch)) % (2 ** 63))


def epoch_order(n: int, *, seed: int, epoch: int, shuffle: bool = True) -> list[int]:
    if not shuffle:
        return list(range(n))
    return torch.randperm(n, generator=epoch_generator(seed, epoch)).tolist()


def first_fit(order: list[int], lengths: list[int], capacity: int) -> list[list[int]]:
    """Greedy first-fit: each example (in `order`) goes into the first row with room for it.

    A max-segment-tree over the rows' free space finds that row in O(log rows).
    """
    size = 1
    while size < max(len(order), 1):
        size *= 2
    free = [0] * (2 * size)          # leaves: free space of row i (a row not yet opened has `capacity`)
    for i in range(size):
        free[size + i] = capacity
    for node in range(size - 1, 0, -1):
        free[node] = max(free[2 * node], free[2 * node + 1])
    rows: list[list[int]] = []
    for index in order:
        need = lengths[index]
        if need > capacity:
            raise ValueError(f"example {index} has {need} tokens, more than max_seq_length={capacity}")
        node = 1
        while node < size:  # descend to the leftmost row with free >= need
            node = 2 * node if free[2 * node] >= need else 2 * node + 1
        row = node - size
        if row == len(rows):
            rows.append([])
        rows[row].append(index)
        free[node] -= need
        node //= 2
        while node:
            free[node] = max(free[2 * node], free[2 * node + 1])
            node //= 2
    return rows


def plan_epoch(lengths: list[int], *, batch_size: int, max_seq_length: int, packing: bool, seed: int, epoch: int,
               shuffle: bool = True, rank: int = 0, world_size: int = 1) -> list[list[list[int]]]:
    """Batches of rows of example indices for one epoch.

    With world_size > 1 each rank gets every world_size-th batch, cut to the same count on every rank.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    order = epoch_order(len(lengths), seed=seed, epoch=epoch, shuffle=shuffle)
    if packing:
        rows = first_fit(order, lengths, max_seq_length)
    else:
        rows = [[i] for i in order]
    batches = [rows[i:i + batch_size] for i in range(0, len(rows), batch_size)]
    if world_size > 1:
        per_rank = len(batches) // world_size
        batches = batches[rank::world_size][:per_rank]
    return batches
