"""Running an encoder on its real tokens only.

A batch of texts padded to the longest one spends most of a post-norm block's work (the projections, the
feed-forward, the norms) on padding when lengths vary: a batch of sentences and paragraphs is often half padding.
`TokenLayout` keeps the real tokens as one [tokens, hidden] matrix for everything that works token by token, and
pads them back to [batch, seq, ...] only around attention, the one step that mixes tokens. The hidden states of
real tokens are those of the padded computation; padding positions come out as zeros (pooling never reads them).
"""
from __future__ import annotations

import torch


class TokenLayout:
    """Where a batch's real tokens sit: `gather` [batch, seq, ...] -> [tokens, ...]; `pad` the reverse (zeros at
    padding); `key_mask` the boolean [batch, 1, 1, seq] attention mask (True: a real key)."""

    def __init__(self, attention_mask: torch.Tensor):
        self.shape = tuple(attention_mask.shape)
        self.index = attention_mask.reshape(-1).nonzero().squeeze(1)
        self.key_mask = attention_mask.bool()[:, None, None, :]

    @property
    def tokens(self) -> int:
        return self.index.numel()

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(-1, *x.shape[2:]).index_select(0, self.index)

    def pad(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.new_zeros(self.shape[0] * self.shape[1], *x.shape[1:]).index_copy(0, self.index, x)
        return flat.view(*self.shape, *x.shape[1:])


def has_padding(attention_mask: torch.Tensor | None) -> bool:
    """Whether any position is padding (one read of the mask: a synchronisation on a GPU, once per forward)."""
    return attention_mask is not None and not bool(attention_mask.all())
