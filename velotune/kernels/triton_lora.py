"""The Triton piece of the fused LoRA MLP's backward: d gate and d up of act(gate) * up, recomputing act from
gate (the gated-activation backward kernel of triton_activations.py, launched on the block's own buffers)."""
from __future__ import annotations

import torch
import triton

from .triton_activations import _GELU_KIND, SWIGLU, _gated_bwd, _launch
from .triton_common import as_rows, compute_dtype


def gated_grads_triton(gate: torch.Tensor, up: torch.Tensor, dh: torch.Tensor, kind: str, approx):
    code = SWIGLU if kind == "swiglu" else _GELU_KIND[approx]
    g2, u2, dy2 = as_rows(gate), as_rows(up), as_rows(dh)
    M, N = g2.shape
    d_gate = torch.empty((M, N), dtype=gate.dtype, device=gate.device)
    d_up = torch.empty((M, N), dtype=up.dtype, device=up.device)
    block_m, block_n, warps = _launch(N)
    if d_gate.numel():
        grid = (triton.cdiv(M, block_m), triton.cdiv(N, block_n))
        _gated_bwd[grid](dy2, g2, u2, d_gate, d_up, M, N, dy2.stride(0), g2.stride(0), u2.stride(0),
                         d_gate.stride(0), d_up.stride(0), KIND=code, CDT=compute_dtype(gate.dtype),
                         BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps)
    return d_gate.view(gate.shape), d_up.view(up.shape)
