"""Rotary embedding in Triton: one kernel rotates q (or k), a block of (token, head) rows per program.

cos/sin are read per (batch, token), so per-row positions (packed sequences, left padding) work as they are.
The backward is the same kernel rotating by -sin (the transpose of a rotation). Features past the rotary
dims (partial rotary) are copied. Any strides: q arrives as a transposed [B, T, H, D] view in the models.
Only cos and sin are saved for backward.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_common import compute_dtype, next_power_of_2, tile_rows


@triton.jit
def _rope_kernel(X, Y, COS, SIN, T, H, HALF, D,
                 sxb, sxh, sxt, sxd, syb, syh, syt, syd, scb, sct, scr, ssb, sst, ssr,
                 BACKWARD: tl.constexpr, HAS_PASS: tl.constexpr, CDT: tl.constexpr,
                 BLOCK_R: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_PASS: tl.constexpr):
    # One program: BLOCK_R (token, head) rows of one sequence; cos/sin gathered per row's token.
    b = tl.program_id(1).to(tl.int64)
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    r_mask = (r < T * H)[:, None]
    t, h = (r // H).to(tl.int64)[:, None], (r % H).to(tl.int64)[:, None]
    i = tl.arange(0, BLOCK_HALF)[None, :]
    mask = r_mask & (i < HALF)
    c_row, s_row = COS + b * scb + t * sct, SIN + b * ssb + t * sst
    cos1 = tl.load(c_row + i * scr, mask=mask, other=0.0).to(CDT)
    cos2 = tl.load(c_row + (i + HALF) * scr, mask=mask, other=0.0).to(CDT)
    sin1 = tl.load(s_row + i * ssr, mask=mask, other=0.0).to(CDT)
    sin2 = tl.load(s_row + (i + HALF) * ssr, mask=mask, other=0.0).to(CDT)
    x_row = X + b * sxb + t * sxt + h * sxh
    y_row = Y + b * syb + t * syt + h * syh
    x1 = tl.load(x_row + i * sxd, mask=mask, other=0.0).to(CDT)
    x2 = tl.load(x_row + (i + HALF) * sxd, mask=mask, other=0.0).to(CDT)
    if BACKWARD:  # transpose of [[c1, -s1], [s2, c2]]
        y1 = x1 * cos1 + x2 * sin2
        y2 = x2 * cos2 - x1 * sin1
    else:  # x * cos + rotate_half(x) * sin, rotate_half(x) = (-x2, x1)
        y1 = x1 * cos1 - x2 * sin1
        y2 = x2 * cos2 + x1 * sin2
    tl.store(y_row + i * syd, y1.to(Y.dtype.element_ty), mask=mask)
    tl.store(y_row + (i + HALF) * syd, y2.to(Y.dtype.element_ty), mask=mask)
    if HAS_PASS:
        p = 2 * HALF + tl.arange(0, BLOCK_PASS)[None, :]
        p_mask = r_mask & (p < D)
        tl.store(y_row + p * syd, tl.load(x_row + p * sxd, mask=p_mask), mask=p_mask)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, backward: bool) -> torch.Tensor:
    B, H, T, D = x.shape
    R = cos.shape[-1]
    y = torch.empty_like(x)  # keeps x's strides (dense tensors)
    if x.numel() == 0:
        return y
    block_half = next_power_of_2(max(R // 2, 1))
    block_r = max(1, min(next_power_of_2(T * H), tile_rows(2 * block_half) * 2))
    grid = (triton.cdiv(T * H, block_r), B)  # the long axis first: grid axis 1 stops at 65535
    cdt = torch.float64 if x.dtype == torch.float64 else torch.float32
    _rope_kernel[grid](x, y, cos, sin, T, H, R // 2, D, *x.stride(), *y.stride(), *cos.stride(), *sin.stride(),
                       BACKWARD=backward, HAS_PASS=R < D, CDT=compute_dtype(cdt), BLOCK_R=block_r,
                       BLOCK_HALF=block_half, BLOCK_PASS=next_power_of_2(max(D - R, 1)), num_warps=4)
    return y


def _expand_batch(t: torch.Tensor, B: int) -> torch.Tensor:
    return t.expand(B, *t.shape[1:]) if t.shape[0] == 1 and B != 1 else t


class TritonRoPE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, cos, sin):
        cos, sin = _expand_batch(cos, q.shape[0]), _expand_batch(sin, q.shape[0])
        ctx.save_for_backward(cos, sin)
        return _rotate(q, cos, sin, False), _rotate(k, cos, sin, False)

    @staticmethod
    def backward(ctx, dq, dk):
        cos, sin = ctx.saved_tensors
        dq = None if dq is None else _rotate(dq, cos, sin, True)
        dk = None if dk is None else _rotate(dk, cos, sin, True)
        return dq, dk, None, None


def apply_rope_triton(q, k, cos, sin):
    """q: [B, Hq, T, D], k: [B, Hk, T, D]; cos, sin: [B or 1, T, R] with R <= D, R even."""
    return TritonRoPE.apply(q, k, cos, sin)
