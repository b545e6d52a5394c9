"""Gated MLP activations: SwiGLU (silu(gate) * up) and GeGLU (gelu(gate) * up, exact or tanh)."""
import torch
import torch.nn.functional as F


def swiglu_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


def geglu_reference(gate: torch.Tensor, up: torch.Tensor, approximate: str = "tanh") -> torch.Tensor:
    return F.gelu(gate, approximate=approximate) * up


def swiglu(gate, up):
    return swiglu_reference(gate, up)


def geglu(gate, up, approximate: str = "tanh"):
    return geglu_reference(gate, up, approximate)
