"""RMSNorm in Triton: forward and backward kernels and the autograd.Function that ties them.

Each program normalises a tile of BLOCK_M rows. The backward is a grid-stride loop: each program keeps its
share of the weight gradient in registers and writes one partial row, summed afterwards (no atomics, so the
result does not depend on scheduling). Only x, the weight and one rstd per row are saved for backward.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .rmsnorm_torch import weight_first_rule
from .triton_common import as_rows, compute_dtype, max_programs, next_power_of_2, num_warps_for, tile_rows


@triton.jit
def _rms_norm_fwd(X, W, Y, RSTD, M, N, stride_x, stride_y, eps, offset,
                  GEMMA: tl.constexpr, CDT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    row_mask, col_mask = rows < M, cols < N
    mask = row_mask[:, None] & col_mask[None, :]
    rows64 = rows.to(tl.int64)[:, None]
    x = tl.load(X + rows64 * stride_x + cols[None, :], mask=mask, other=0.0).to(CDT)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) / N + eps)
    tl.store(RSTD + rows, rstd, mask=row_mask)
    normed = x * rstd[:, None]
    w = tl.load(W + cols, mask=col_mask, other=0.0).to(CDT)
    if GEMMA:  # (offset + w) in the compute dtype, then one cast
        y = normed * (offset + w)[None, :]
    else:  # llama: cast the normalised value to the input dtype first, then multiply by the weight
        y = normed.to(X.dtype.element_ty).to(CDT) * w[None, :]
    tl.store(Y + rows64 * stride_y + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _rms_norm_bwd(DY, X, W, RSTD, DX, DW_PART, M, N, stride_dy, stride_x, stride_dx, offset,
                  GEMMA: tl.constexpr, CDT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid = tl.program_id(0)
    step = tl.num_programs(0) * BLOCK_M
    cols = tl.arange(0, BLOCK_N)
    col_mask = cols < N
    w = tl.load(W + cols, mask=col_mask, other=0.0).to(CDT)
    if GEMMA:
        w = w + offset
    dw = tl.zeros([BLOCK_N], dtype=CDT)
    for start in range(pid * BLOCK_M, M, step):
        rows = start + tl.arange(0, BLOCK_M)
        row_mask = rows < M
        mask = row_mask[:, None] & col_mask[None, :]
        rows64 = rows.to(tl.int64)[:, None]
        x = tl.load(X + rows64 * stride_x + cols[None, :], mask=mask, other=0.0).to(CDT)
        dy = tl.load(DY + rows64 * stride_dy + cols[None, :], mask=mask, other=0.0).to(CDT)
        rstd = tl.load(RSTD + rows, mask=row_mask, other=0.0)
        normed = x * rstd[:, None]
        if GEMMA:
            dw += tl.sum(dy * normed, axis=0)
        else:
            dw += tl.sum(dy * normed.to(X.dtype.element_ty).to(CDT), axis=0)
        dn = dy * w[None, :]
        # d/dx of x * rstd(x): rstd * (dn - normed * mean(dn * normed))
        dot = tl.sum(dn * normed, axis=1) / N
        dx = rstd[:, None] * (dn - normed * dot[:, None])
        tl.store(DX + rows64 * stride_dx + cols[None, :], dx.to(DX.dtype.element_ty), mask=mask)
    tl.store(DW_PART + pid * N + cols, dw, mask=col_mask)


def _launch_sizes(N: int):
    block_n = next_power_of_2(N)
    return block_n, tile_rows(block_n), num_warps_for(block_n)


class TritonRMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps, offset, weight_first):
        shape, N = x.shape, x.shape[-1]
        x2 = as_rows(x)
        M = x2.shape[0]
        gemma = bool(weight_first)  # the kernels' GEMMA: (offset + w) in the compute dtype, then one cast
        out_dtype = x.dtype if gemma else torch.result_type(x, weight)
        y = torch.empty((M, N), dtype=out_dtype, device=x.device)
        cdt = torch.float64 if torch.float64 in (x.dtype, weight.dtype) else torch.float32
        rstd = torch.empty(M, dtype=cdt, device=x.device)
        block_n, block_m, warps = _launch_sizes(N)
        if M:
            _rms_norm_fwd[(triton.cdiv(M, block_m),)](x2, weight, y, rstd, M, N, x2.stride(0), y.stride(0), eps,
                                                      float(offset), GEMMA=gemma, CDT=compute_dtype(cdt),
                                                      BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps)
        ctx.save_for_backward(x2, weight, rstd)
        ctx.shape, ctx.offset, ctx.weight_first = shape, float(offset), gemma
        return y.view(shape)

    @staticmethod
    def backward(ctx, dy):
        x2, weight, rstd = ctx.saved_tensors
        M, N = x2.shape
        dy2 = as_rows(dy)
        dx = torch.empty((M, N), dtype=x2.dtype, device=x2.device)
        block_n, block_m, warps = _launch_sizes(N)
        programs = max(1, min(triton.cdiv(M, block_m), max_programs(x2)))
        dw_part = torch.empty((programs, N), dtype=rstd.dtype, device=x2.device)
        _rms_norm_bwd[(programs,)](dy2, x2, weight, rstd, dx, dw_part, M, N, dy2.stride(0), x2.stride(0),
                                   dx.stride(0), ctx.offset, GEMMA=ctx.weight_first,
                                   CDT=compute_dtype(rstd.dtype), BLOCK_M=block_m, BLOCK_N=block_n,
                                   num_warps=warps)
        dw = dw_part.sum(0).to(weight.dtype) if ctx.needs_input_grad[1] else None
        return dx.view(ctx.shape), dw, None, None, None


def rms_norm_triton(x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float = 0.0,
                    weight_first: bool | None = None) -> torch.Tensor:
    return TritonRMSNorm.apply(x, weight, eps, offset, weight_first_rule(offset, weight_first))
