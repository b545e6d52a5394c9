"""4-bit dequantization in Triton (bitsandbytes layout; see nf4.py for the format).

Each program reads BLOCK packed bytes, looks both nibbles up in the 16-entry code table, scales them by their
block's absmax (undoing double quantization in the same pass: a uint8 index into a 256-entry table times a
second-level scale, plus the offset) and writes the 2 * BLOCK values contiguously. A byte's two values always
share a block (block sizes are even), so one scale is loaded per byte.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .dispatch import interpreting
from .nf4_layout import code_table, packed_bytes


@triton.jit
def _dequant_4bit(Q, CODE, ABSMAX, CODE2, ABSMAX2, OFFSET, OUT, n_bytes, n_values,
                  BLOCKSIZE: tl.constexpr, BLOCKSIZE2: tl.constexpr, NESTED: tl.constexpr, BLOCK: tl.constexpr):
    byte = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    in_range = byte < n_bytes
    q = tl.load(Q + byte, mask=in_range, other=0).to(tl.int32)
    first = tl.load(CODE + (q >> 4))
    second = tl.load(CODE + (q & 15))
    block = (byte * 2) // BLOCKSIZE
    if NESTED:
        index = tl.load(ABSMAX + block, mask=in_range, other=0).to(tl.int32)
        scale = tl.load(CODE2 + index) * tl.load(ABSMAX2 + block // BLOCKSIZE2, mask=in_range, other=0.0)
        scale = scale + tl.load(OFFSET)
    else:
        scale = tl.load(ABSMAX + block, mask=in_range, other=0.0)
    values = tl.interleave(first * scale, second * scale)
    pos = tl.program_id(0).to(tl.int64) * (2 * BLOCK) + tl.arange(0, 2 * BLOCK)
    tl.store(OUT + pos, values.to(OUT.dtype.element_ty), mask=pos < n_values)


def dequantize_4bit_triton(packed: torch.Tensor, state, dtype: torch.dtype | None = None) -> torch.Tensor:
    q = packed_bytes(packed)
    device = q.device
    n = state.shape.numel()
    out = torch.empty(state.shape, dtype=dtype or state.dtype, device=device)
    if n == 0:
        return out
    code = code_table(state, device)
    nested = bool(getattr(state, "nested", False))
    if nested:
        inner = state.state2
        code2, absmax2, blocksize2 = inner.code.to(device).float(), inner.absmax.float(), inner.blocksize
        offset = state.offset.reshape(1).to(device=device, dtype=torch.float32)
        absmax = state.absmax
    else:
        code2 = absmax2 = offset = code  # unused: any valid pointer
        blocksize2 = 1
        absmax = state.absmax.float()
    n_bytes = (n + 1) // 2
    block = 1024 if interpreting() else 512
    grid = (triton.cdiv(n_bytes, block),)
    _dequant_4bit[grid](q, code, absmax, code2, absmax2, offset, out, n_bytes, n,
                        BLOCKSIZE=state.blocksize, BLOCKSIZE2=blocksize2, NESTED=nested, BLOCK=block)
    return out
