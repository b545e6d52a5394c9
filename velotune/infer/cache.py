"""A static key/value cache for decoding: one buffer pair per layer, allocated once per request.

The model's attention calls `cache.update(layer_idx, k, v)` with the new keys and values of the step
(shape [batch, kv_heads, new_tokens, head_dim], RoPE already applied) and attends to what it returns: every
key and value so far, as a view of the buffer. `past_length` is the number of positions already cached; the
model reads it once, before the first layer, to place the new tokens.

Buffers are allocated on a layer's first update, with that layer's head count, head size, dtype and device
(so nothing about the model needs to be known in advance), and `capacity` positions rounded up to a multiple
of `block_size`. Going past the capacity grows the buffer by whole blocks (one copy); a request that asked for
the right capacity never reallocates. Sliding-window layers keep every position too: the attention mask
hides what falls outside the window.
"""
from __future__ import annotations

import torch

DEFAULT_BLOCK_SIZE = 256


def round_up(n: int, block: int) -> int:
    return max(block, -(-n // block) * block)


class KVCache:
    def __init__(self, capacity: int = 0, block_size: int = DEFAULT_BLOCK_SIZE, num_layers: int | None = None):
        if block_size <= 0:
            raise ValueError(f"block_size must be positive, got {block_size}")
        self.block_size = block_size
        self.capacity = round_up(max(int(capacity), 1), block_size)
        self.keys: dict[int, torch.Tensor] = {}
        self.values: dict[int, torch.Tensor] = {}
        self._lengths: dict[int, int] = {i: 0 for i in range(num_layers)} if num_layers else {}
        self.reallocations = 0  # growths past the first allocation (a test and a tuning aid)
        # What a model keeps about its prompt beyond keys and values: Qwen2-VL's offset of text positions past
        # the prompt's images ([batch, 1]), set at prefill and read at each decoding step. None otherwise.
        self.rope_deltas: torch.Tensor | None = None

    @classmethod
    def for_model(cls, model, capacity: int, block_size: int = DEFAULT_BLOCK_SIZE) -> "KVCache":
        """A cache with one entry per decoder block of `model` (a models.interface.LanguageModel)."""
        return cls(capacity, block_size, num_layers=len(model.blocks()))

    # ---- what the model uses -----------------------------------------------------------------------------
    @property
    def past_length(self) -> int:
        """Positions cached in every layer (layers are updated in order within a forward)."""
        return min(self._lengths.values()) if self._lengths else 0

    def update(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor):
        """Appends k, v ([B, H_kv, T_new, D]) for one layer; returns all keys and values so far (views)."""
        start = self._lengths.get(layer_idx, 0)
        end = start + k.shape[2]
        buf_k = self.keys.get(layer_idx)
        if buf_k is None:
            self._allocate(layer_idx, k, v, max(self.capacity, round_up(end, self.block_size)))
        elif buf_k.shape[0] != k.shape[0]:
            raise ValueError(f"KVCache: batch size changed from {buf_k.shape[0]} to {k.shape[0]}")
        elif end > buf_k.shape[2]:
            self._grow(layer_idx, round_up(end, self.block_size))
        buf_k, buf_v = self.keys[layer_idx], self.values[layer_idx]
        buf_k[:, :, start:end] = k
        buf_v[:, :, start:end] = v
        self._lengths[layer_idx] = end
        return buf_k[:, :, :end], buf_v[:, :, :end]

    # ---- bookkeeping -----------------------------------------------------------------------------------
    def _allocate(self, layer_idx, k, v, capacity):
        B, H, _, D = k.shape
        self.keys[layer_idx] = torch.empty(B, H, capacity, D, dtype=k.dtype, device=k.device)
        self.values[layer_idx] = torch.empty(B, v.shape[1], capacity, v.shape[3], dtype=v.dtype, device=v.device)

    def _grow(self, layer_idx, capacity):
        length = self._lengths.get(layer_idx, 0)
        for store in (self.keys, self.values):
            old = store[layer_idx]
            new = old.new_empty(old.shape[0], old.shape[1], capacity, old.shape[3])
            new[:, :, :length] = old[:, :, :length]
            store[layer_idx] = new
        self.capacity = max(self.capacity, capacity)
        self.reallocations += 1

    def select_rows(self, rows: torch.Tensor):
        """Keeps only the batch rows `rows` (indices), e.g. to drop finished sequences."""
        for store in (self.keys, self.values):
            for layer_idx, buf in store.items():
                store[layer_idx] = buf.index_select(0, rows.to(buf.device))
        if self.rope_deltas is not None:
            self.rope_deltas = self.rope_deltas.index_select(0, rows.to(self.rope_deltas.device))

    def memory_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for store in (self.keys, self.values) for t in store.values())

    def __repr__(self):
        return (f"KVCache(layers={len(self.keys)}, past_length={self.past_length}, capacity={self.capacity}, "
                f"block_size={self.block_size})")
