"""Gated MLP activations: SwiGLU (silu(gate) * up) and GeGLU (gelu(gate) * up, exact or tanh).

Triton kernels (forward, and a backward that recomputes the activation from gate): triton_activations.py.
"""
import torch
import torch.nn.functional as F

from .dispatch import use_triton


def swiglu_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


def geglu_reference(gate: torch.Tensor, up: torch.Tensor, approximate: str = "tanh") -> torch.Tensor:
    return F.gelu(gate, approximate=approximate) * up


def swiglu(gate, up):
    if use_triton(gate) and gate.shape == up.shape:
        from .triton_activations import swiglu_triton
        return swiglu_triton(gate, up)
    return swiglu_reference(gate, up)


def geglu(gate, up, approximate: str = "tanh"):
    if use_triton(gate) and gate.shape == up.shape and approximate in ("none", "tanh"):
        from .triton_activations import geglu_triton
        return geglu_triton(gate, up, approximate)
    return geglu_reference(gate, up, approximate)
