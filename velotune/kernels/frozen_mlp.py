"""fc2(gelu(fc1(x))) over two frozen linears, with a backward that never holds a whole [tokens, ffn] gradient.

Autograd's own graph of this block keeps the same one tensor for backward as this op, fc1's output u (the frozen
linears keep no input), but its backward holds three [tokens, ffn] tensors at once: u, the gradient at gelu's
output and the gradient at u (two 74 MB tensors for a Whisper tiny.en batch of 8 x 1500 frames, at the moment the
encoder's backward begins, where training peaks). Here backward runs over row chunks of about 8 MB:

    g = dout_rows @ W2;  g = gelu'(u_rows) * g  (aten's gelu_backward, in place of a copy);  dx_rows = g @ W1

The forward and the elementwise gradient are autograd's ops on the same tensors (bit for bit); the chunked matmuls
sum in the same order per element as the whole ones do, up to the BLAS's blocking (fp32 rounding at most).
`frozen_gelu_mlp` returns None where the op does not apply (a trainable or adapted linear, dropout, autocast,
another dtype, no autograd, VELOTUNE_KERNELS=reference): the caller then runs its modules.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .dispatch import kernel_mode

CHUNK_BYTES = 8 << 20  # the [rows, ffn] gradient one backward chunk holds


def _frozen_linear(module: nn.Module) -> bool:
    return type(module) is nn.Linear and not module.weight.requires_grad and (
        module.bias is None or not module.bias.requires_grad)


class FrozenGeluMLP(torch.autograd.Function):
    """Saves fc1's output only; the weights are frozen (no gradient), the input gets one."""

    @staticmethod
    def forward(ctx, x, w1, b1, w2, b2, approximate: str):
        u = F.linear(x, w1, b1)
        out = F.linear(F.gelu(u, approximate=approximate), w2, b2)
        ctx.approximate = approximate
        ctx.save_for_backward(u, w1, w2)
        return out

    @staticmethod
    def backward(ctx, dout):
        u, w1, w2 = ctx.saved_tensors
        u_rows, d_rows = u.reshape(-1, u.shape[-1]), dout.reshape(-1, dout.shape[-1])
        dx = d_rows.new_empty(d_rows.shape[0], w1.shape[1])
        step = max(1, CHUNK_BYTES // (u.shape[-1] * u.element_size()))
        for start in range(0, d_rows.shape[0], step):
            end = start + step
            g = torch.mm(d_rows[start:end], w2)
            g = torch.ops.aten.gelu_backward(g, u_rows[start:end], approximate=ctx.approximate)
            torch.mm(g, w1, out=dx[start:end])
        return dx.view(*dout.shape[:-1], w1.shape[1]), None, None, None, None, None


def frozen_gelu_mlp(fc1: nn.Module, fc2: nn.Module, approximate: str | None, x: torch.Tensor,
                    dropout: float = 0.0) -> torch.Tensor | None:
    """fc2(gelu(fc1(x), approximate)) through FrozenGeluMLP, or None (the caller runs its modules). `approximate`
    None: the block's activation is not a GELU. `dropout`: the rate on gelu's output while training (must be 0)."""
    if approximate not in ("none", "tanh") or dropout > 0 or not torch.is_grad_enabled() or not x.requires_grad:
        return None
    if kernel_mode() == "reference" or torch.is_autocast_enabled(x.device.type):
        return None
    if not (_frozen_linear(fc1) and _frozen_linear(fc2)) or x.dim() < 2:
        return None
    if any(t is not None and t.dtype != x.dtype for t in (fc1.weight, fc1.bias, fc2.weight, fc2.bias)):
        return None
    return FrozenGeluMLP.apply(x, fc1.weight, fc1.bias, fc2.weight, fc2.bias, approximate)


__all__ = ["FrozenGeluMLP", "frozen_gelu_mlp"]
