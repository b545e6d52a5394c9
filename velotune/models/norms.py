"""The normalisation layer of the decoder families, over the fused RMSNorm op (kernels/rmsnorm.py)."""
from __future__ import annotations

import torch
from torch import nn

from ..kernels import rms_norm


class RMSNorm(nn.Module):
    """RMSNorm with the family's weight convention: `offset=1` stores weight-1 (Gemma), else the weight itself."""

    def __init__(self, dim: int, eps: float, offset: float = 0.0):
        super().__init__()
        self.eps, self.offset = eps, offset
        self.weight = nn.Parameter(torch.zeros(dim) if offset else torch.ones(dim))

    def forward(self, x):
        return rms_norm(x, self.weight, self.eps, self.offset)

    def extra_repr(self):
        return f"{self.weight.shape[0]}, eps={self.eps}, offset={self.offset}"
