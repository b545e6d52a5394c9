"""Pooling: token states [batch, seq, hidden] -> one vector per text, as sentence-transformers' Pooling module
computes it for a padded batch (padding on either side), so embeddings equal `SentenceTransformer.encode`.

Modes: "cls" (the first real token), "max", "mean", "mean_sqrt_len_tokens" (sum / sqrt(real tokens)),
"weightedmean" (token i of a row weighted i + 1), "lasttoken" (the last real token: decoder models used as
embedders). Several modes concatenate in the order given. Sums over tokens accumulate in fp32 for half inputs.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import ConfigError

MODES = ("cls", "max", "mean", "mean_sqrt_len_tokens", "weightedmean", "lasttoken")
# sentence-transformers' older config files: one boolean per mode.
LEGACY_KEYS = {"pooling_mode_cls_token": "cls", "pooling_mode_max_tokens": "max",
               "pooling_mode_mean_tokens": "mean", "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
               "pooling_mode_weightedmean_tokens": "weightedmean", "pooling_mode_lasttoken": "lasttoken"}


@dataclass(frozen=True)
class Pooling:
    modes: tuple = ("mean",)
    include_prompt: bool = True   # False: a prompt's (prefix's) tokens are left out of the pooled tokens

    def __post_init__(self):
        modes = (self.modes,) if isinstance(self.modes, str) else tuple(self.modes)
        if not modes:
            raise ConfigError(f"pooling: no mode given; expected one or more of {', '.join(MODES)}")
        for mode in modes:
            if mode not in MODES:
                raise ConfigError(f"pooling: unknown mode {mode!r}; expected one of {', '.join(MODES)}")
        object.__setattr__(self, "modes", modes)

    @classmethod
    def from_config(cls, config: dict, source: str = "pooling config") -> "Pooling":
        """From a 1_Pooling/config.json of any sentence-transformers version."""
        modes = config.get("pooling_mode")
        if modes is None:
            modes = tuple(mode for key, mode in LEGACY_KEYS.items() if config.get(key))
        try:
            return cls(modes, bool(config.get("include_prompt", True)))
        except ConfigError as exc:
            raise ConfigError(f"{source}: {exc}") from None

    def to_config(self, dimension: int) -> dict:
        """The config.json sentence-transformers reads, in the boolean form every version reads."""
        config = {"word_embedding_dimension": dimension}
        config.update({key: mode in self.modes for key, mode in LEGACY_KEYS.items()})
        config["include_prompt"] = self.include_prompt
        return config

    def output_dimension(self, hidden: int) -> int:
        return hidden * len(self.modes)

    def __call__(self, states: torch.Tensor, attention_mask: torch.Tensor, prompt_length: int = 0) -> torch.Tensor:
        mask = attention_mask
        if prompt_length and not self.include_prompt:
            mask = _without_prompt(mask, prompt_length)
        return torch.cat([_pool(mode, states, mask, attention_mask) for mode in self.modes], dim=-1)


def _pool(mode: str, states: torch.Tensor, mask: torch.Tensor, full_mask: torch.Tensor) -> torch.Tensor:
    acc = torch.float32 if states.dtype in (torch.float16, torch.bfloat16) else states.dtype
    hidden = states.shape[-1]
    if mode == "cls":
        first = mask.to(torch.int32).argmax(dim=1)
        return states.gather(1, first.view(-1, 1, 1).expand(-1, 1, hidden)).squeeze(1)
    if mode == "max":
        return states.masked_fill(mask.unsqueeze(-1) == 0, float("-inf")).max(dim=1).values
    if mode in ("mean", "mean_sqrt_len_tokens"):
        weights = mask.unsqueeze(-1).to(states.dtype)
        total = (states * weights).sum(dim=1, dtype=acc)
        count = torch.clamp(weights.sum(dim=1, dtype=acc), min=1e-9)
        return (total / (count if mode == "mean" else count.sqrt())).to(states.dtype)
    if mode == "weightedmean":
        # Positions count from each row's first real token, so left padding does not shift the weights.
        positions = torch.arange(1, states.shape[1] + 1, device=states.device, dtype=acc).view(1, -1, 1)
        positions = positions - full_mask.to(torch.int32).argmax(dim=1).view(-1, 1, 1)
        weights = mask.unsqueeze(-1).to(acc) * positions
        total = (states * weights).sum(dim=1)
        return (total / torch.clamp(weights.sum(dim=1), min=1e-9)).to(states.dtype)
    # lasttoken: the last position whose mask is 1 (padding on the right or the left).
    seq = states.shape[1]
    found, from_end = mask.flip(1).max(dim=1)
    last = torch.where(found == 0, torch.full_like(from_end, 0), seq - 1 - from_end)
    masked = states * mask.unsqueeze(-1).to(states.dtype)
    return masked.gather(1, last.view(-1, 1, 1).expand(-1, 1, hidden)).squeeze(1)


def _without_prompt(mask: torch.Tensor, prompt_length: int) -> torch.Tensor:
    """The mask with each row's first `prompt_length` real tokens zeroed (a copy: the cached loss re-embeds)."""
    mask = mask.clone()
    start = mask.to(torch.int32).argmax(dim=1)
    positions = torch.arange(mask.shape[1], device=mask.device).unsqueeze(0)
    mask[positions < (start + prompt_length).unsqueeze(1)] = 0
    return mask
