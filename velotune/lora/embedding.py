"""LoRA on the token embedding table, the way PEFT builds it, so adapters PEFT trained with `embed_tokens` among
their target_modules load, and ours load into PEFT:

    lora_embedding_A [r, vocab] (zeros at init), lora_embedding_B [hidden, r] (normal at init)
    y = base(ids) + scaling * embedding(ids, A^T) @ B^T          (no dropout on token ids, as PEFT)

Merging adds scaling * (B @ A)^T to the table. Only the model's input token embeddings take it (a named target;
"all-linear" leaves it out): other tables (positions) are read by slicing their weight, which an adapter would miss.
A table tied to the output head keeps its adapter on the input side only, as in PEFT; merging it would change the
head too, so merge.py refuses that.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from .layers import LoraLinear


def check_adaptable(name: str, table: nn.Embedding, dora: bool) -> None:
    if dora:
        raise ConfigError(f"LoRA target {name} is an embedding table: DoRA is for linear layers only here")
    if table.max_norm is not None or table.sparse:
        raise ConfigError(f"LoRA target {name}: an embedding with max_norm or sparse gradients is not supported")


class LoraEmbedding(LoraLinear):
    """A frozen embedding table plus PEFT's low-rank pair. Merging, unmerging, switching off and saving are
    LoraLinear's, on the table's [vocab, hidden] shape; no fused kernel."""

    def __init__(self, base_layer: nn.Embedding, r: int, alpha: float, rslora: bool = False,
                 dtype: torch.dtype = torch.float32):
        nn.Module.__init__(self)
        self._adapter_state(base_layer, base_layer.num_embeddings, base_layer.embedding_dim, r, alpha, rslora,
                            False, dropout=0.0)  # no dropout on token ids, as PEFT
        device = base_layer.weight.device
        self.lora_embedding_A = nn.Parameter(torch.empty(r, self.in_features, device=device, dtype=dtype))
        self.lora_embedding_B = nn.Parameter(torch.empty(self.out_features, r, device=device, dtype=dtype))

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None):
        """As PEFT: A zeros, B standard normal (drawn on the CPU, so a seed gives the same B on any device)."""
        self.lora_embedding_A.zero_()
        self.lora_embedding_B.copy_(torch.randn(self.lora_embedding_B.shape, generator=generator))

    @property
    def weight(self) -> torch.Tensor:
        """The table's weight (a tied head and code reading `embed_tokens.weight` see the base)."""
        return self.base_layer.weight

    def adapter_view(self):
        return None

    def forward(self, ids):
        result = self.base_layer(ids)
        if self._base_alone():
            return result
        a = self.lora_embedding_A.to(result.dtype)
        b = self.lora_embedding_B.to(result.dtype)
        after_a = F.embedding(ids, a.t(), padding_idx=self.base_layer.padding_idx)
        return result + (after_a @ b.t()) * self.scaling

    def delta_weight(self) -> torch.Tensor:
        """scaling * (B @ A)^T in fp32, [vocab, hidden] like the table."""
        b, a = self.lora_embedding_B.detach().float(), self.lora_embedding_A.detach().float()
        return self.scaling * (b @ a).t()

    def extra_repr(self):
        kind = "rsLoRA" if self.use_rslora else "LoRA"
        return (f"{kind} on Embedding: vocab={self.in_features}, hidden={self.out_features}, r={self.r}, "
                f"alpha={self.alpha}, scaling={self.scaling:.4g}, merged={self.merged}")
