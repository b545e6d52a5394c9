"""Rotary position embedding applied to q and k.

cos/sin have shape [batch, seq, rotary_dim] (halves repeated, the Hugging Face layout); only the first
rotary_dim features of each head rotate (partial rotary), the rest pass through.
"""
import torch


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


def apply_rope(q, k, cos, sin):
    return apply_rope_reference(q, k, cos, sin)
