"""An nn.Linear (no bias) whose weight is allocated but not initialised: an adapter factor that its layer's
`reset_parameters` (or a loaded file) fills right after.

torch.nn.utils.skip_init does the same by building the layer on the meta device and then `to_empty`, which runs
through PyTorch's reference ops and imports its symbolic-shape machinery (sympy: ~35 MB resident in every process
that adds an adapter). Here the weight is a plain `torch.empty`.
"""
from __future__ import annotations

from torch import nn


class _Unfilled(nn.Linear):
    def reset_parameters(self) -> None:  # the caller fills the weight: no random draw, no global RNG consumed
        pass


def empty_linear(in_features: int, out_features: int, *, device=None, dtype=None) -> nn.Linear:
    layer = _Unfilled(in_features, out_features, bias=False, device=device, dtype=dtype)
    layer.__class__ = nn.Linear  # a plain nn.Linear from here on (printing, type checks, PEFT's names)
    return layer
