"""RMSNorm as one autograd op in plain PyTorch: the default where Triton does not run (the CPU).

The reference is a chain of elementwise ops, and autograd keeps what each of them needs: an fp32 copy of x and
the normalised value, 3x the input's bytes for a bf16 input. This twin of the Triton kernel keeps only x (in its
own dtype) and one fp32 rstd per row, recomputes the normalised value in backward, and follows the same cast
rules as the reference (see rmsnorm.py).
"""
from __future__ import annotations

import torch


def weight_first_rule(offset: float, weight_first: bool | None) -> bool:
    """Whether the weight multiplies before the one cast (rmsnorm.py's rules); None: as the family of `offset`."""
    return bool(offset) if weight_first is None else bool(weight_first)


def _compute_dtype(x: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    return torch.float64 if torch.float64 in (x.dtype, weight.dtype) else torch.float32


class TorchRMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps, offset, weight_first):
        cdt = _compute_dtype(x, weight)
        xc = x.to(cdt)
        rstd = xc.square().mean(-1, keepdim=True).add_(eps).rsqrt_()
        normed = xc.mul_(rstd) if xc is not x else xc * rstd  # in place only on our own upcast copy
        if weight_first:  # gemma, gpt-oss, OLMo 2: (offset + w) in the compute dtype, then one cast
            y = normed.mul_(weight.to(cdt) + offset).to(x.dtype)
        else:  # llama: cast the normalised value to the input dtype first, then multiply by the weight
            y = weight * normed.to(x.dtype)
        ctx.save_for_backward(x, weight, rstd)
        ctx.offset, ctx.weight_first = float(offset), weight_first
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, rstd = ctx.saved_tensors
        cdt = rstd.dtype
        normed = x.to(cdt) * rstd
        dyc = dy.to(cdt)
        dw = None
        if ctx.needs_input_grad[1]:
            seen = normed if ctx.weight_first else normed.to(x.dtype).to(cdt)
            dw = (dyc * seen).reshape(-1, x.shape[-1]).sum(0).to(weight.dtype)
        scale = weight.to(cdt) + ctx.offset
        dn = dyc.mul_(scale) if dyc is not dy else dyc * scale  # never in place on the caller's gradient
        dot = (dn * normed).mean(-1, keepdim=True)
        dx = dn.sub_(normed.mul_(dot)).mul_(rstd)
        return dx.to(x.dtype), dw, None, None, None


def rms_norm_torch(x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float = 0.0,
                   weight_first: bool | None = None) -> torch.Tensor:
    return TorchRMSNorm.apply(x, weight, eps, offset, weight_first_rule(offset, weight_first))
