"""Cross-entropy of one chunk of logits in Triton: per-row loss, and the logits overwritten by their gradient.

The GPU piece of the chunked linear cross-entropy (`cross_entropy.py` does the matmuls): for each row, one
pass over the vocabulary finds the logsumexp online (after the optional tanh soft-cap), a second pass writes
d loss / d logits = (softmax - onehot) * (1 - tanh^2 if soft-capped) * scale in place, in the logits' dtype.
Rows whose target is ignore_index get loss 0 and gradient 0.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_common import compute_dtype, next_power_of_2, tanh


@triton.jit
def _capped(x, softcap, HAS_SOFTCAP: tl.constexpr):
    if HAS_SOFTCAP:
        t = tanh(x / softcap)
        return softcap * t, t
    return x, x


@triton.jit
def _ce_rows_grad(LOGITS, TARGETS, LOSS, SCALE, scale_stride, V, stride, ignore_index, softcap,
                  HAS_SOFTCAP: tl.constexpr, WRITE_GRAD: tl.constexpr, CDT: tl.constexpr, BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    base = LOGITS + row * stride
    target = tl.load(TARGETS + row)
    valid = target != ignore_index
    cols0 = tl.arange(0, BLOCK_V)
    # pass 1: online max / sum of exp, and the target's logit
    m = tl.full([BLOCK_V], float("-inf"), CDT)
    s = tl.zeros([BLOCK_V], CDT)
    picked = tl.zeros([BLOCK_V], CDT)
    for start in range(0, V, BLOCK_V):
        cols = start + cols0
        x, _ = _capped(tl.load(base + cols, mask=cols < V, other=0.0).to(CDT), softcap, HAS_SOFTCAP)
        x = tl.where(cols < V, x, float("-inf"))
        m_new = tl.maximum(m, x)
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)  # lanes still empty: no -inf - -inf = nan
        s = s * tl.exp(m - shift) + tl.exp(x - shift)
        m = m_new
        picked += tl.where(cols == target, x, 0.0)
    m_row = tl.max(m, axis=0)
    lse = m_row + tl.log(tl.sum(s * tl.exp(m - m_row), axis=0))
    loss = tl.where(valid, lse - tl.sum(picked, axis=0), 0.0)
    tl.store(LOSS + row, loss)
    if WRITE_GRAD:
        scale = tl.where(valid, tl.load(SCALE + row * scale_stride).to(CDT), 0.0)
        # pass 2: (softmax - onehot) * d cap * scale, in place
        for start in range(0, V, BLOCK_V):
            cols = start + cols0
            mask = cols < V
            x, t = _capped(tl.load(base + cols, mask=mask, other=0.0).to(CDT), softcap, HAS_SOFTCAP)
            g = tl.exp(x - lse) - tl.where(cols == target, 1.0, 0.0)
            if HAS_SOFTCAP:
                g = g * (1.0 - t * t)
            tl.store(base + cols, (g * scale).to(LOGITS.dtype.element_ty), mask=mask)


def ce_rows_grad_(logits: torch.Tensor, targets: torch.Tensor, scale: torch.Tensor, *, softcap=None,
                  ignore_index: int = -100, write_grad: bool = True) -> torch.Tensor:
    """Per-row loss of `logits` [C, V] (pre-cap) against `targets` [C]; overwrites logits with
    d(sum scale_i * loss_i)/d logits when write_grad. `scale` is a tensor (no host sync) of one element, for
    every row, or of C elements, one per row."""
    C, V = logits.shape
    assert logits.stride(1) == 1, "logits rows must be contiguous"
    cdt = torch.float64 if logits.dtype == torch.float64 else torch.float32
    loss = torch.empty(C, dtype=cdt, device=logits.device)
    if C == 0:
        return loss
    block_v = min(next_power_of_2(V), 4096 if logits.is_cuda else 16384)
    scale_stride = 0 if scale.numel() == 1 else 1
    _ce_rows_grad[(C,)](logits, targets, loss, scale, scale_stride, V, logits.stride(0), ignore_index,
                        float(softcap) if softcap else 1.0, HAS_SOFTCAP=bool(softcap), WRITE_GRAD=write_grad,
                        CDT=compute_dtype(cdt), BLOCK_V=block_v, num_warps=8 if block_v >= 2048 else 4)
    return loss
