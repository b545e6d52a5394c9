"""Gated activations in Triton: act(gate) * up, for SwiGLU (silu) and GeGLU (exact erf or tanh gelu).

Forward and backward are one kernel each over a 2-D tile of [rows, features]; gate and up may be row-strided
views (a fused gate_up projection split in two). Backward recomputes act(gate) and act'(gate) from gate, so
only gate and up are saved.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_common import as_rows, compute_dtype, next_power_of_2, num_warps_for, tanh, tile_rows

SWIGLU, GELU_ERF, GELU_TANH = 0, 1, 2
_GELU_KIND = {"none": GELU_ERF, "tanh": GELU_TANH}


@triton.jit
def _sigmoid(x):
    # exp of a non-positive number only: no overflow for large |x|.
    e = tl.exp(-tl.abs(x))
    return tl.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


@triton.jit
def _act_and_grad(g, KIND: tl.constexpr):
    """act(g) and d act / d g, in g's (compute) dtype."""
    if KIND == 0:
        s = _sigmoid(g)
        act = g * s
        grad = s * (1.0 + g * (1.0 - s))
    elif KIND == 1:
        cdf = 0.5 * (1.0 + tl.erf(g * 0.7071067811865476))
        act = g * cdf
        grad = cdf + g * 0.3989422804014327 * tl.exp(-0.5 * g * g)
    else:
        inner = 0.7978845608028654 * (g + 0.044715 * g * g * g)
        th = tanh(inner)
        act = 0.5 * g * (1.0 + th)
        grad = 0.5 * (1.0 + th) + 0.5 * g * (1.0 - th * th) * 0.7978845608028654 * (1.0 + 0.134145 * g * g)
    return act, grad


@triton.jit
def _gated_fwd(G, U, Y, M, N, stride_g, stride_u, stride_y,
               KIND: tl.constexpr, CDT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    rows = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)[:, None]
    cols = (tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N))[None, :]
    mask = (rows < M) & (cols < N)
    g = tl.load(G + rows * stride_g + cols, mask=mask, other=0.0).to(CDT)
    u = tl.load(U + rows * stride_u + cols, mask=mask, other=0.0).to(CDT)
    act, _ = _act_and_grad(g, KIND)
    tl.store(Y + rows * stride_y + cols, (act * u).to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _gated_bwd(DY, G, U, DG, DU, M, N, stride_dy, stride_g, stride_u, stride_dg, stride_du,
               KIND: tl.constexpr, CDT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    rows = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)[:, None]
    cols = (tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N))[None, :]
    mask = (rows < M) & (cols < N)
    dy = tl.load(DY + rows * stride_dy + cols, mask=mask, other=0.0).to(CDT)
    g = tl.load(G + rows * stride_g + cols, mask=mask, other=0.0).to(CDT)
    u = tl.load(U + rows * stride_u + cols, mask=mask, other=0.0).to(CDT)
    act, grad = _act_and_grad(g, KIND)
    tl.store(DG + rows * stride_dg + cols, (dy * u * grad).to(DG.dtype.element_ty), mask=mask)
    tl.store(DU + rows * stride_du + cols, (dy * act).to(DU.dtype.element_ty), mask=mask)


def _launch(N: int):
    block_n = min(next_power_of_2(N), 4096)
    block_m = tile_rows(block_n)
    return block_m, block_n, num_warps_for(block_m * block_n)


class TritonGated(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up, kind):
        if gate.shape != up.shape:
            raise ValueError(f"gate {tuple(gate.shape)} and up {tuple(up.shape)} must have one shape")
        g2, u2 = as_rows(gate), as_rows(up)
        M, N = g2.shape
        y = torch.empty((M, N), dtype=torch.result_type(gate, up), device=gate.device)
        cdt = compute_dtype(y.dtype)
        block_m, block_n, warps = _launch(N)
        if y.numel():
            grid = (triton.cdiv(M, block_m), triton.cdiv(N, block_n))
            _gated_fwd[grid](g2, u2, y, M, N, g2.stride(0), u2.stride(0), y.stride(0), KIND=kind, CDT=cdt,
                             BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps)
        ctx.save_for_backward(g2, u2)
        ctx.kind, ctx.shape = kind, gate.shape
        return y.view(gate.shape)

    @staticmethod
    def backward(ctx, dy):
        g2, u2 = ctx.saved_tensors
        dg, du = _gated_bwd_rows(g2, u2, as_rows(dy), ctx.kind)
        return dg.view(ctx.shape), du.view(ctx.shape), None


def _gated_bwd_rows(g2, u2, dy2, kind: int):
    """d gate, d up of act(gate) * up for [rows, N] operands, act recomputed from gate."""
    M, N = g2.shape
    dg = torch.empty((M, N), dtype=g2.dtype, device=g2.device)
    du = torch.empty((M, N), dtype=u2.dtype, device=u2.device)
    block_m, block_n, warps = _launch(N)
    if dg.numel():
        grid = (triton.cdiv(M, block_m), triton.cdiv(N, block_n))
        _gated_bwd[grid](dy2, g2, u2, dg, du, M, N, dy2.stride(0), g2.stride(0), u2.stride(0), dg.stride(0),
                         du.stride(0), KIND=kind, CDT=compute_dtype(torch.result_type(g2, u2)), BLOCK_M=block_m,
                         BLOCK_N=block_n, num_warps=warps)
    return dg, du


def gated_grads(gate: torch.Tensor, up: torch.Tensor, dh: torch.Tensor, kind: str, approx=None):
    """d gate and d up of act(gate) * up given dh, any leading shape: the backward kernel on the caller's own
    buffers (the fused LoRA MLP keeps gate and up itself). kind "swiglu", or "geglu" with approx "none" | "tanh"."""
    code = SWIGLU if kind == "swiglu" else _GELU_KIND[approx]
    dg, du = _gated_bwd_rows(as_rows(gate), as_rows(up), as_rows(dh), code)
    return dg.view(gate.shape), du.view(up.shape)


def swiglu_triton(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return TritonGated.apply(gate, up, SWIGLU)


def geglu_triton(gate: torch.Tensor, up: torch.Tensor, approximate: str = "tanh") -> torch.Tensor:
    if approximate not in _GELU_KIND:
        raise ValueError(f"approximate must be 'none' or 'tanh', got {approximate!r}")
    return TritonGated.apply(gate, up, _GELU_KIND[approximate])
