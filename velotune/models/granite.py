"""IBM Granite 3.x (model_type "granite"): Llama's decoder with four multipliers from config.json —

- `embedding_multiplier`: the token embeddings are multiplied by it;
- `attention_multiplier`: the attention scale, in place of head_dim**-0.5;
- `residual_multiplier`: each block's attention and MLP outputs are multiplied by it before the residual add;
- `logits_scaling`: the logits are DIVIDED by it.

The embedding scale belongs to `embed()`, as Gemma's does: `inputs_embeds` given to a forward are taken as
already scaled (what `embed()` returns; vision models splice image features into them). The logit scale lives in
`logits()`; the fused chunked loss multiplies hidden rows by the plain head weight and cannot divide, so
`head_weight()` is None when the scale is not 1 and the loss goes through `logits()` on the target rows (still only
the rows with a target, never the whole [B, T, vocab]).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .args import BaseArgs
from .base import CausalLM, PreNormBlock
from .field_checks import check_fields

MULTIPLIERS = ("embedding_multiplier", "attention_multiplier", "residual_multiplier", "logits_scaling")


@dataclass
class Args(BaseArgs):
    model_type: str = "granite"
    bos_token_id: int | None = 1
    eos_token_id: int | list | None = 2
    embedding_multiplier: float = 1.0
    attention_multiplier: float = 1.0
    residual_multiplier: float = 1.0
    logits_scaling: float = 1.0

    def validate(self, source: str = "config.json"):
        super().validate(source)
        # Each multiplies or divides activations: zero, negative, infinite or non-numbers break the model.
        check_fields(self, source, positive_floats=MULTIPLIERS)

    def window_for_layer(self, layer_idx: int) -> int | None:
        # transformers' Granite attends over every position, whatever a stray `sliding_window` key says.
        return None


class Block(PreNormBlock):
    """x + r * attn(norm(x)), then h + r * mlp(norm(h)), r = residual_multiplier; attention scaled by
    attention_multiplier. Not a PreNormBlock to the training forward (its type differs): the last block runs whole."""

    def __init__(self, args: Args, layer_idx: int):
        super().__init__(args, layer_idx, attn_kwargs=dict(scale=float(args.attention_multiplier)))
        self.residual_multiplier = args.residual_multiplier

    def forward(self, x, rope, mask, cache=None):
        h = x + self.self_attn(self.input_layernorm(x), rope, mask, cache) * self.residual_multiplier
        return h + self.mlp(self.post_attention_layernorm(h)) * self.residual_multiplier

    def forward_rows(self, x, rows, rope, mask):
        picked = x.gather(1, rows[..., None].expand(*rows.shape, x.shape[-1]))
        h = picked + self.self_attn.forward_rows(self.input_layernorm(x), rows, rope, mask) * self.residual_multiplier
        return h + self.mlp(self.post_attention_layernorm(h)) * self.residual_multiplier


class Model(CausalLM):
    Args = Args

    @staticmethod
    def make_block(args, layer_idx):
        return Block(args, layer_idx)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_tokens(input_ids) * self.args.embedding_multiplier

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return super().logits(hidden) / self.args.logits_scaling

    def head_weight(self):
        # linear_cross_entropy computes hidden @ weight.T unscaled: only a scale of 1 may take that path.
        return super().head_weight() if self.args.logits_scaling == 1 else None
