"""Rotary embedding tables: inverse frequencies per scaling type, and cos/sin for given positions."""
from __future__ import annotations

import math

import torch
from torch import nn

from ..errors import UnsupportedError

SUPPORTED_ROPE_TYPES = ("default", "linear", "dynamic", "llama3")


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
        # Not a parameter and not saved: checkpoints never carry it, and it is rebuilt from the config.
        self.register_buffer("inv_freq", self.compute_inv_freq(), persistent=False)

    def compute_inv_freq(self) -> torch.Tensor:
        inv_freq = self._base_inv_freq(self.theta)
        if self.kind == "linear":
            inv_freq = inv_freq / self.scaling["factor"]
        elif self.kind == "llama3":
            inv_freq = llama3_inv_freq(inv_freq, self.scaling)
        return inv_freq

    def rebuild(self, device):
        """Recomputes the table for real (after a model was built on the meta device)."""
        with torch.device(device):
            self.inv_freq = self.compute_inv_freq()

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
        with torch.autocast(device_type=position_ids.device.type, enabled=False):
            freqs = position_ids[..., None].float() * inv_freq.float().to(position_ids.device)
            emb = torch.cat((freqs, freqs), dim=-1)
            return emb.cos().to(dtype), emb.sin().to(dtype)
