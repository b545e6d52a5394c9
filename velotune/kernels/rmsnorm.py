"""RMSNorm. Reference: compute in fp32, then each family's cast rule; Triton kernel in triton_rmsnorm.py; where
Triton does not run, one PyTorch autograd op that saves only x and rstd (rmsnorm_torch.py).

- llama family (offset 0): normalise in fp32, cast to the input dtype, then multiply by the weight.
- gemma family (offset 1): multiply by (1 + weight) in fp32, then cast.
- gpt-oss, OLMo 2 (offset 0, `weight_first`): multiply by the weight in fp32, then cast: one rounding, as
  transformers does for them (Llama's order there doubled gpt-oss's bf16 error against float64).
`weight_first` None means "as the family of `offset`": True with an offset, False without.
"""
import torch

from .dispatch import kernel_mode, use_triton
from .rmsnorm_torch import rms_norm_torch, weight_first_rule


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float = 0.0,
                       weight_first: bool | None = None) -> torch.Tensor:
    dtype = x.dtype
    x32 = x.float()
    normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    if weight_first_rule(offset, weight_first):
        return (normed * (offset + weight.float())).to(dtype)
    return weight * normed.to(dtype)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float = 0.0,
             weight_first: bool | None = None) -> torch.Tensor:
    first = weight_first_rule(offset, weight_first)
    if weight.shape != x.shape[-1:] or kernel_mode() == "reference":
        return rms_norm_reference(x, weight, eps, offset, first)
    if use_triton(x):
        from .triton_rmsnorm import rms_norm_triton
        return rms_norm_triton(x, weight, eps, offset, first)
    return rms_norm_torch(x, weight, eps, offset, first)
