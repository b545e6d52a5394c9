"""RoBERTa and XLM-RoBERTa (model_type "roberta", "xlm-roberta"): BERT's blocks and names, with positions counted
from the padding token as fairseq does. A real token's position is padding_idx + its rank among the row's real
tokens; a padding token's is padding_idx, whose position row gets no gradient. The positions follow the pad token
id in input_ids, not attention_mask, exactly as transformers computes them.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ...errors import CheckpointError
from . import bert


@dataclass
class Args(bert.Args):
    pad_token_id: int | None = 1

    def validate(self, source: str):
        super().validate(source)
        if self.pad_token_id is None:
            raise CheckpointError(f"{source}: field 'pad_token_id' is needed: {self.model_type} counts positions "
                                  "from the padding token")
        if self.max_position_embeddings <= self.pad_token_id + 1:
            raise CheckpointError(f"{source}: max_position_embeddings ({self.max_position_embeddings}) leaves no "
                                  f"position after the padding offset (pad_token_id {self.pad_token_id} + 1)")


class Embeddings(bert.Embeddings):
    def __init__(self, args: Args):
        super().__init__(args)
        self.padding_idx = args.pad_token_id

    @staticmethod
    def make_position_embeddings(args):
        return nn.Embedding(args.max_position_embeddings, args.hidden_size, padding_idx=args.pad_token_id)

    def position_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        real = input_ids.ne(self.padding_idx).long()
        return torch.cumsum(real, dim=1) * real + self.padding_idx


class Model(bert.Model):
    """transformers' RobertaModel / XLMRobertaModel without the pooler."""

    Args = Args
    checkpoint_prefixes = ("roberta.",)
    embeddings_class = Embeddings

    @property
    def hf_architecture(self) -> str:
        return "XLMRobertaModel" if self.model_type == "xlm-roberta" else "RobertaModel"

    @property
    def max_positions(self) -> int:
        """Positions start after the padding index: a 514-row table holds 512 tokens."""
        return self.args.max_position_embeddings - self.args.pad_token_id - 1
