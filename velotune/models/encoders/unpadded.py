"""Running an encoder on its real tokens only.

A batch of texts padded to the longest one spends most of its work on padding when lengths vary: a batch of
sentences and paragraphs is often two thirds padding, and attention's cost grows with the square of the padded
length. `TokenLayout` keeps the real tokens as one [tokens, hidden] matrix for everything that works token by token
(projections, feed-forward, norms). Attention, the one step that mixes tokens, runs on groups of rows of similar
length (sorted by length, a new group whenever a row is much shorter than its group's longest), each padded only to
its own longest row; its dropout then draws masks for those rows' keys only. The hidden states of real tokens are
those of the padded computation; padding positions come out as zeros (pooling never reads them).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

# A row joins the current group while it is at least this share of the group's longest row: the padding inside a
# group stays under about half of its attention work, and the groups stay few (about log(256) / log(1 / 0.7)).
GROUP_SHARE = 0.7


class TokenLayout:
    """Where a batch's real tokens sit: `gather` [batch, seq, ...] -> [tokens, ...]; `pad` the reverse (zeros at
    padding); `attend` attention over each row's real tokens, by groups of similar length."""

    def __init__(self, attention_mask: torch.Tensor):
        self.shape = tuple(attention_mask.shape)
        flat = attention_mask.reshape(-1).bool()
        self.index = flat.nonzero().squeeze(1)
        self.tokens = self.index.numel()
        lengths = attention_mask.bool().sum(dim=1).tolist()   # one read of the mask per forward
        self.groups, order = _groups(lengths, attention_mask.device, self.tokens)
        # Attention's outputs come back group after group; this puts them in token order in one gather.
        self.inverse = torch.empty_like(order)
        self.inverse[order] = torch.arange(order.numel(), device=order.device)

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(-1, *x.shape[2:]).index_select(0, self.index)

    def pad(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.new_zeros(self.shape[0] * self.shape[1], *x.shape[1:]).index_copy(0, self.index, x)
        return flat.view(*self.shape, *x.shape[1:])

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float) -> torch.Tensor:
        """Bidirectional attention of real tokens' projections [tokens, heads, head_dim] within their rows."""
        zero = q.new_zeros(1, *q.shape[1:])
        q, k, v = (torch.cat([t, zero]) for t in (q, k, v))   # index `tokens` is the padding slot
        outputs = []
        for index, key_mask, real in self.groups:
            out = F.scaled_dot_product_attention(*(t[index].transpose(1, 2) for t in (q, k, v)), attn_mask=key_mask,
                                                 dropout_p=dropout_p)
            outputs.append(out.transpose(1, 2)[real])
        return torch.cat(outputs).index_select(0, self.inverse)


def _groups(lengths: list[int], device, tokens: int):
    """Rows grouped by length: for each group (token index [rows, longest] with `tokens` at padding, key mask
    [rows, 1, 1, longest] or None when no row is padded, real-position mask [rows, longest]); and the tokens' order
    as the groups give them back."""
    starts, total = [], 0
    for n in lengths:
        starts.append(total)
        total += n
    rows = sorted((r for r in range(len(lengths)) if lengths[r]), key=lambda r: -lengths[r])
    grouped, current = [], []
    for r in rows:
        if current and lengths[r] < GROUP_SHARE * lengths[current[0]]:
            grouped.append(current)
            current = []
        current.append(r)
    if current:
        grouped.append(current)
    groups, order = [], []
    for members in grouped:
        longest = lengths[members[0]]
        index = [[starts[r] + j if j < lengths[r] else tokens for j in range(longest)] for r in members]
        index = torch.tensor(index, device=device)
        real = index < tokens
        key_mask = None if bool(real.all()) else real[:, None, None, :]
        groups.append((index, key_mask, real))
        order.append(index[real])
    order = torch.cat(order) if order else torch.zeros(0, dtype=torch.long, device=device)
    return groups, order


def has_padding(attention_mask: torch.Tensor | None) -> bool:
    """Whether any position is padding (one read of the mask: a synchronisation on a GPU, once per forward)."""
    return attention_mask is not None and not bool(attention_mask.all())
