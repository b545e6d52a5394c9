"""Grouped linear for mixture-of-experts: rows grouped contiguously by expert, each group through its own weight.

    grouped_linear(x [T, K], [W_0 .. W_{E-1}] each [N, K], counts) -> y [T, N],  y_e = x_e @ W_e^T

`counts[e]` rows of x (in order) belong to expert e; a count may be 0. The weights are the experts' own
`nn.Linear` weights, passed as a list and never stacked (stacking would copy every expert's weight at every step).

Two implementations, chosen by kernels/dispatch.py's rule: the Triton kernel (triton_grouped_mm.py) on CUDA
tensors of fp32 / fp16 / bf16, and everywhere else the PyTorch reference, one matmul per group (no loop over
tokens). The Triton path's backward:
    d x_e = d y_e @ W_e          the same kernel, the weights read un-transposed
    d W_e = d y_e^T @ x_e        one torch matmul per group whose weight needs a gradient (an empty group: zeros)
It saves x and the weights (parameters: nothing new is kept).

`counts` may be a list of ints or an integer tensor. On the GPU a device tensor costs no host sync in forward
or d x; d W reads the sizes once (its per-group slices need them). Under autocast, x and the weights are cast to
the autocast dtype first, as F.linear would be.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from ..errors import UnsupportedError
from .dispatch import use_triton

Counts = Sequence[int] | torch.Tensor
_AUTOCASTS = (torch.float32, torch.float16, torch.bfloat16)


def grouped_linear_reference(x: torch.Tensor, weights: Sequence[torch.Tensor], counts: Counts) -> torch.Tensor:
    """One F.linear per group, concatenated (autograd through plain torch ops)."""
    sizes = _sizes(counts)
    return torch.cat([F.linear(part, w) for part, w in zip(x.split(sizes), weights)])


def grouped_linear(x: torch.Tensor, weights: Sequence[torch.Tensor], counts: Counts) -> torch.Tensor:
    """y [T, N] with the rows of group e = x_e @ W_e^T. See the module docstring."""
    weights = list(weights)
    check_inputs(x, weights, counts)
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        # As autocast casts F.linear's operands: fp32 / fp16 / bf16 to the autocast dtype, float64 left alone.
        dtype = torch.get_autocast_dtype(device_type)
        x, *weights = (t.to(dtype) if t.dtype in _AUTOCASTS else t for t in (x, *weights))
    if use_triton(x) and x.dtype in _kernel_dtypes() and x.dtype == weights[0].dtype:
        with torch.autocast(device_type, enabled=False):  # everything is in its dtype already
            return _GroupedLinear.apply(x, counts, *weights)
    return grouped_linear_reference(x, weights, counts)


def check_inputs(x: torch.Tensor, weights: list[torch.Tensor], counts: Counts) -> None:
    """UnsupportedError naming the tensor that does not fit: x 2-D, E >= 1 weights of one shape [N, K] on x's
    device, in one dtype (x's, unless autocast decides), E counts, none negative, summing to x's rows (checked
    when the counts are on the host: a device tensor is not read here, that would cost a sync)."""
    if x.dim() != 2:
        raise UnsupportedError(f"grouped_linear: x must be [tokens, features], got shape {list(x.shape)}")
    if not weights:
        raise UnsupportedError("grouped_linear: no expert weights given")
    shape, dtype = weights[0].shape, weights[0].dtype
    for e, w in enumerate(weights):
        if w.dim() != 2 or w.shape != shape or w.shape[1] != x.shape[1]:
            raise UnsupportedError(f"grouped_linear: weight {e} has shape {list(w.shape)}; every expert's weight "
                                   f"must be [N, {x.shape[1]}] (x's features), all the same shape "
                                   f"(weight 0: {list(shape)})")
        if w.dtype != dtype:
            raise UnsupportedError(f"grouped_linear: weight {e} is {w.dtype}, weight 0 is {dtype}")
        if w.device != x.device:
            raise UnsupportedError(f"grouped_linear: weight {e} is on {w.device}, x on {x.device}")
    if x.dtype != dtype and not torch.is_autocast_enabled(x.device.type):
        raise UnsupportedError(f"grouped_linear: x is {x.dtype} but the weights are {dtype}")
    if isinstance(counts, torch.Tensor):
        if counts.dim() != 1 or counts.is_floating_point() or counts.is_complex():
            raise UnsupportedError(f"grouped_linear: counts must be a 1-D integer tensor, got {counts.dtype} "
                                   f"of shape {list(counts.shape)}")
        n = counts.numel()
    else:
        counts = list(counts)
        n = len(counts)
        if any(c < 0 for c in counts) or sum(counts) != x.shape[0]:
            raise UnsupportedError(f"grouped_linear: counts {counts} must be >= 0 and sum to x's {x.shape[0]} "
                                   "rows")
    if n != len(weights):
        raise UnsupportedError(f"grouped_linear: {n} counts for {len(weights)} expert weights")


def _sizes(counts: Counts) -> list[int]:
    return counts.tolist() if isinstance(counts, torch.Tensor) else list(counts)


def _kernel_dtypes():
    from .triton_grouped_mm import KERNEL_DTYPES  # imported only once chosen (dispatch.py says why)
    return KERNEL_DTYPES


class _GroupedLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, counts, *weights):
        from .triton_grouped_mm import grouped_mm
        # Kernel-ready weights: one layout for all (nn.Linear weights are contiguous: no copy then).
        if any(w.stride() != weights[0].stride() for w in weights):
            weights = tuple(w.contiguous() for w in weights)
        ctx.counts = counts
        ctx.save_for_backward(x, *weights)
        return grouped_mm(x, weights, counts, transpose=True)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):
        from .triton_grouped_mm import grouped_mm
        x, *weights = ctx.saved_tensors
        need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[2:]
        dy = dy if dy.stride(-1) == 1 else dy.contiguous()
        dx = grouped_mm(dy, weights, ctx.counts, transpose=False) if need_x else None
        dws = [None] * len(weights)
        if any(need_w):
            sizes = _sizes(ctx.counts)  # one host read when the sizes live on the GPU
            for e, (dy_e, x_e) in enumerate(zip(dy.split(sizes), x.split(sizes))):
                if need_w[e]:
                    dws[e] = dy_e.t() @ x_e  # [N, K]; zeros for an empty group
        return (dx, None, *dws)
