"""Rotary position embedding applied to q and k.

cos/sin have shape [batch, seq, rotary_dim] (halves repeated, the Hugging Face layout); only the first
rotary_dim features of each head rotate (partial rotary), the rest pass through. Triton kernel: triton_rope.py.
"""
import torch

from .dispatch import use_triton


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope_reference(q, k, cos, sin):
    """q: [B, Hq, T, D], k: [B, Hk, T, D]; cos, sin: [B, T, R] with R <= D."""
    cos = cos.unsqueeze(1).to(q.dtype)
    sin = sin.unsqueeze(1).to(q.dtype)
    rot = cos.shape[-1]
    if rot == q.shape[-1]:
        return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
    q_rot, q_pass = q[..., :rot], q[..., rot:]
    k_rot, k_pass = k[..., :rot], k[..., rot:]
    q_rot = q_rot * cos + _rotate_half(q_rot) * sin
    k_rot = k_rot * cos + _rotate_half(k_rot) * sin
    return torch.cat((q_rot, q_pass), dim=-1), torch.cat((k_rot, k_pass), dim=-1)


def rotate(x, cos, sin):
    """One tensor rotated, x: [B, H, T, D] with cos, sin [B, T, R] (for queries at other positions than the keys)."""
    cos = cos.unsqueeze(1).to(x.dtype)
    sin = sin.unsqueeze(1).to(x.dtype)
    rot = cos.shape[-1]
    if rot == x.shape[-1]:
        return x * cos + _rotate_half(x) * sin
    x_rot, x_pass = x[..., :rot], x[..., rot:]
    return torch.cat((x_rot * cos + _rotate_half(x_rot) * sin, x_pass), dim=-1)


def _triton_fits(q, k, cos, sin) -> bool:
    rot = cos.shape[-1]
    return (q.dim() == 4 and k.dim() == 4 and cos.dim() == 3 and sin.shape == cos.shape and rot % 2 == 0
            and rot <= q.shape[-1] == k.shape[-1] and cos.shape[1] == q.shape[2] == k.shape[2]
            and cos.shape[0] in (1, q.shape[0]) and k.shape[0] == q.shape[0]
            and not (cos.requires_grad or sin.requires_grad))  # the kernel gives no gradient to cos/sin


def apply_rope(q, k, cos, sin):
    if use_triton(q) and _triton_fits(q, k, cos, sin):
        from .triton_rope import apply_rope_triton
        return apply_rope_triton(q, k, cos, sin)
    return apply_rope_reference(q, k, cos, sin)
