"""The normalisation layer of the decoder families, over the fused RMSNorm op (kernels/rmsnorm.py)."""
from __future__ import annotations

import torch
from torch import nn

from ..kernels import rms_norm
from ..kernels.rmsnorm_torch import weight_first_rule


class RMSNorm(nn.Module):
    """RMSNorm with the family's weight convention: `offset=1` stores weight-1 (Gemma), else the weight itself.
    `weight_first`: the weight multiplies in fp32 before the one cast to the input dtype (Gemma, gpt-oss, OLMo 2);
    else the normalised value is cast first (Llama's order). None: as the offset's family. The same in fp32."""

    def __init__(self, dim: int, eps: float, offset: float = 0.0, weight_first: bool | None = None):
        super().__init__()
        self.eps, self.offset = eps, offset
        self.weight_first = weight_first_rule(offset, weight_first)
        self.weight = nn.Parameter(torch.zeros(dim) if offset else torch.ones(dim))

    def forward(self, x):
        return rms_norm(x, self.weight, self.eps, self.offset, self.weight_first)

    def extra_repr(self):
        return f"{self.weight.shape[0]}, eps={self.eps}, offset={self.offset}, weight_first={self.weight_first}"


def weigh_norms_first(model: nn.Module) -> None:
    """Every RMSNorm of `model` multiplies its weight before casting (the families whose transformers code does)."""
    for module in model.modules():
        if isinstance(module, RMSNorm):
            module.weight_first = True
