"""Rotary embedding tables: inverse frequencies per scaling type, and cos/sin for given positions.

Each scaling type follows `transformers.modeling_rope_utils` operation for operation, so the tables match
bit for bit: llama3 (Llama 3.1), linear, dynamic (NTK), yarn (Qwen 2.5 long context) and longrope (Phi-3).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ..errors import UnsupportedError

SUPPORTED_ROPE_TYPES = ("default", "linear", "dynamic", "llama3", "yarn", "longrope")


def llama3_inv_freq(inv_freq: torch.Tensor, scaling: dict) -> torch.Tensor:
    """Llama 3.1 scaling: long wavelengths divided by `factor`, short ones kept, a smooth ramp between."""
    factor = scaling["factor"]
    low, high = scaling.get("low_freq_factor", 1.0), scaling.get("high_freq_factor", 4.0)
    old_len = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return torch.where(medium, smoothed, scaled)


def yarn_inv_freq(dim: int, base: float, scaling: dict, max_position_embeddings: int):
    """YaRN: interpolate low frequencies by `factor`, keep high ones, ramp between; cos/sin scaled by mscale."""
    old_len = scaling["original_max_position_embeddings"]
    factor = scaling.get("factor") or max_position_embeddings / old_len

    def mscale(scale, m=1.0):
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention_factor = scaling.get("attention_factor")
    if attention_factor is None:
        m, m_all = scaling.get("mscale"), scaling.get("mscale_all_dim")
        attention_factor = float(mscale(factor, m) / mscale(factor, m_all)) if m and m_all else mscale(factor)
    beta_fast, beta_slow = scaling.get("beta_fast") or 32, scaling.get("beta_slow") or 1

    def correction_dim(rotations):
        return (dim * math.log(old_len / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoids a division by zero in the ramp
    pos_freqs = base ** (torch.arange(0, dim, 2).float() / dim)
    extrapolation, interpolation = 1.0 / pos_freqs, 1.0 / (factor * pos_freqs)
    keep = 1 - torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    return interpolation * (1 - keep) + extrapolation * keep, attention_factor


def longrope_inv_freq(dim: int, base: float, scaling: dict, max_position_embeddings: int, long: bool):
    """LongRoPE (Phi-3): per-frequency factors, the long set once a sequence passes the pretraining length."""
    old_len = scaling["original_max_position_embeddings"]
    factor = scaling.get("factor") or max_position_embeddings / old_len
    attention_factor = scaling.get("attention_factor")
    if attention_factor is None:
        attention_factor = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(old_len))
    factors = torch.tensor(scaling["long_factor" if long else "short_factor"], dtype=torch.float32)
    if factors.numel() != dim // 2:
        raise UnsupportedError(f"rope_scaling: {'long' if long else 'short'}_factor has {factors.numel()} "
                               f"values but the rotary dimension needs {dim // 2}")
    return 1.0 / (factors * base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim)), attention_factor


class RotaryEmbedding(nn.Module):
    """Produces cos/sin of shape [batch, seq, rotary_dim] for position ids, computed in fp32."""

    def __init__(self, head_dim: int, theta: float, scaling: dict | None = None,
                 partial_rotary_factor: float = 1.0, max_position_embeddings: int = 2048):
        super().__init__()
        self.dim = int(head_dim * partial_rotary_factor)
        self.theta = theta
        self.scaling = scaling or {}
        self.kind = self.scaling.get("rope_type", "default")
        if self.kind not in SUPPORTED_ROPE_TYPES:
            raise UnsupportedError(f"rope_scaling type '{self.kind}' is not supported; "
                                   f"supported: {', '.join(SUPPORTED_ROPE_TYPES)}")
        self.max_position_embeddings = max_position_embeddings
        self.attention_scaling = 1.0  # yarn / longrope multiply cos and sin by it
        # Not parameters and not saved: checkpoints never carry them, and they are rebuilt from the config.
        self.register_buffer("inv_freq", self.compute_inv_freq(), persistent=False)
        if self.kind == "longrope":
            self.register_buffer("long_inv_freq", self.compute_inv_freq(long=True), persistent=False)

    def compute_inv_freq(self, long: bool = False) -> torch.Tensor:
        if self.kind == "yarn":
            inv_freq, self.attention_scaling = yarn_inv_freq(self.dim, self.theta, self.scaling,
                                                             self.max_position_embeddings)
            return inv_freq
        if self.kind == "longrope":
            inv_freq, self.attention_scaling = longrope_inv_freq(self.dim, self.theta, self.scaling,
                                                                 self.max_position_embeddings, long)
            return inv_freq
        inv_freq = self._base_inv_freq(self.theta)
        if self.kind == "linear":
            inv_freq = inv_freq / self.scaling["factor"]
        elif self.kind == "llama3":
            inv_freq = llama3_inv_freq(inv_freq, self.scaling)
        return inv_freq

    def rebuild(self, device):
        """Recomputes the tables on `device` (after the model was built and its weights loaded elsewhere)."""
        with torch.device(device):
            self.inv_freq = self.compute_inv_freq()
            if self.kind == "longrope":
                self.long_inv_freq = self.compute_inv_freq(long=True)

    def _base_inv_freq(self, theta: float) -> torch.Tensor:
        return 1.0 / (theta ** (torch.arange(0, self.dim, 2, dtype=torch.int64).float() / self.dim))

    def _dynamic_inv_freq(self, seq_len: int) -> torch.Tensor:
        """NTK-aware dynamic scaling: the base grows once the sequence passes the trained length."""
        if seq_len <= self.max_position_embeddings:
            return self.inv_freq
        factor = self.scaling["factor"]
        base = self.theta * ((factor * seq_len / self.max_position_embeddings) - (factor - 1)) ** (
            self.dim / (self.dim - 2))
        return self._base_inv_freq(base).to(self.inv_freq.device)

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype):
        inv_freq = self.inv_freq
        if self.kind == "dynamic":
            inv_freq = self._dynamic_inv_freq(int(position_ids.max()) + 1)
        elif self.kind == "longrope" and int(position_ids.max()) + 1 > self.scaling["original_max_position_embeddings"]:
            # As transformers: the whole batch switches to the long factors once any position passes the limit.
            inv_freq = self.long_inv_freq
        with torch.autocast(device_type=position_ids.device.type, enabled=False):
            freqs = position_ids[..., None].float() * inv_freq.float().to(position_ids.device)
            emb = torch.cat((freqs, freqs), dim=-1)
            cos, sin = emb.cos(), emb.sin()
            if self.attention_scaling != 1.0:
                cos, sin = cos * self.attention_scaling, sin * self.attention_scaling
            return cos.to(dtype), sin.to(dtype)
