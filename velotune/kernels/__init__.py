"""Fused ops. Each module holds a plain PyTorch reference and, where written, a Triton kernel; `dispatch` picks."""
from .rmsnorm import rms_norm
from .rope import apply_rope
from .activations import swiglu, geglu
from .cross_entropy import linear_cross_entropy

__all__ = ["rms_norm", "apply_rope", "swiglu", "geglu", "linear_cross_entropy"]
