"""4-bit (NF4, also FP4) dequantization of weights in the bitsandbytes layout, so `Linear4bit` weights and
checkpoints are read as they are.

Layout: the weight [out, in] is flattened row-major and cut into blocks of `blocksize` values (64 by default;
blocks run across row ends). Each value is a 4-bit index into a 16-entry code table (NF4: the normal-float
quantiles); two indices share a byte, the first value in the high nibble. Each block has one fp32 scale, its
absmax. With double quantization ("nested") the absmaxes are themselves stored as uint8 indices into a
256-entry code table, scaled per block of `blocksize2` absmaxes by fp32 second-level scales, plus an offset.

value = code[index] * absmax[block], computed in fp32 and then cast (as bitsandbytes does). The Triton kernel
(triton_nf4.py) is used on CUDA; on the CPU bitsandbytes' own kernel where it is exact, else the reference.
"""
from __future__ import annotations

import importlib.util

import torch

from .dispatch import use_triton
from .nf4_layout import code_table, packed_bytes

def block_scales_reference(state) -> torch.Tensor:
    """One fp32 scale per block of `state.blocksize` values; undoes double quantization when nested."""
    if not getattr(state, "nested", False):
        return state.absmax.float()
    inner = state.state2
    scales = inner.code.float()[state.absmax.long()]
    per_value = torch.arange(scales.numel(), device=scales.device) // inner.blocksize
    scales = scales * inner.absmax.float()[per_value]
    return scales + state.offset.float()


def dequantize_4bit_reference(packed: torch.Tensor, state, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Pure PyTorch: the weight of shape `state.shape` in `dtype` (default: the state's dtype)."""
    n = state.shape.numel()
    q = packed_bytes(packed)
    if q.numel() * 2 < n:
        raise ValueError(f"packed 4-bit weight holds {q.numel() * 2} values, its state says {tuple(state.shape)}")
    indices = torch.stack((q >> 4, q & 0xF), dim=-1).reshape(-1)[:n].long()
    values = code_table(state, q.device)[indices]
    block = torch.arange(n, device=q.device) // state.blocksize
    out = values * block_scales_reference(state)[block]
    return out.reshape(state.shape).to(dtype or state.dtype)


def dequantize_4bit(packed: torch.Tensor, state, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The dequantized weight: the Triton kernel on CUDA (or when forced), else the reference."""
    if state.blocksize % 2:
        raise ValueError(f"4-bit blocksize must be even, got {state.blocksize}")
    if use_triton(packed):
        from .triton_nf4 import dequantize_4bit_triton
        return dequantize_4bit_triton(packed, state, dtype)
    if _bnb_cpu_is_exact(packed, state, dtype):
        from bitsandbytes.functional import dequantize_4bit as bnb_dequantize
        return bnb_dequantize(packed, state).to(dtype or state.dtype)
    return dequantize_4bit_reference(packed, state, dtype)


def _bnb_cpu_is_exact(packed, state, dtype) -> bool:
    """bitsandbytes' CPU kernel (faster than the reference) gives the reference's bits when its blocks do not run
    across rows (0.50.2 reads blocks per row) and it rounds fp32 once to the dtype we want."""
    if packed.device.type != "cpu" or packed.dtype != torch.uint8 or getattr(state, "code", None) is None:
        return False
    if len(state.shape) == 0 or state.shape[-1] % state.blocksize:
        return False
    if (dtype or state.dtype) != state.dtype and state.dtype != torch.float32:
        return False
    return importlib.util.find_spec("bitsandbytes") is not None


def is_4bit_linear(module) -> bool:
    """A bitsandbytes Linear4bit whose weight is in the standard layout (not repacked for CPU inference)."""
    weight = getattr(module, "weight", None)
    state = getattr(weight, "quant_state", None)
    return (type(weight).__name__ == "Params4bit" and state is not None
            and not getattr(state, "packing_format_for_cpu", False))
