"""RMSNorm. Reference: compute in fp32, then each family's cast rule; Triton kernel in triton_rmsnorm.py; where
Triton does not run, one PyTorch autograd op that saves only x and rstd (rmsnorm_torch.py).

- llama family (offset 0): normalise in fp32, cast to the input dtype, then multiply by the weight.
- gemma family (offset 1): multiply by (1 + weight) in fp32, then cast.
"""
import torch

from .dispatch import kernel_mode, use_triton
from .rmsnorm_torch import rms_norm_torch


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float = 0.0) -> torch.Tensor:
    dtype = x.dtype
    x32 = x.float()
    normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    if offset:
        return (normed * (offset + weight.float())).to(dtype)
    return weight * normed.to(dtype)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float = 0.0) -> torch.Tensor:
    if weight.shape != x.shape[-1:] or kernel_mode() == "reference":
        return rms_norm_reference(x, weight, eps, offset)
    if use_triton(x):
        from .triton_rmsnorm import rms_norm_triton
        return rms_norm_triton(x, weight, eps, offset)
    return rms_norm_torch(x, weight, eps, offset)
