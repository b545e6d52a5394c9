"""OLMo 2 (model_type "olmo2"): Llama's SwiGLU MLP, GQA and RoPE in post-norm blocks —

- each branch's OUTPUT is normalised before the residual add: h = x + post_attention_layernorm(attn(x)), then
  out = h + post_feedforward_layernorm(mlp(h)); a block has no input norm;
- q_norm / k_norm are RMSNorms over the WHOLE q and k projections (num_heads * head_dim and
  num_key_value_heads * head_dim wide), before the split into heads and RoPE — not per head as Qwen 3's;
- no sliding window; an untied head by default.

transformers multiplies the norm weight with the fp32 normalised value and then casts (one rounding): so do our
norms here (`weight_first`; Llama's order casts first). Since the blocks are not PreNormBlocks, a training forward
runs the last block whole (the `_target_rows_forward` shortcut is for PreNormBlock only).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .args import BaseArgs
from .attention import Attention
from .base import CausalLM
from .mlp import GatedMLP
from .norms import RMSNorm, weigh_norms_first


@dataclass
class Args(BaseArgs):
    model_type: str = "olmo2"
    vocab_size: int = 50304
    rms_norm_eps: float = 1e-5
    pad_token_id: int | None = 1
    eos_token_id: int | list | None = 50279

    def window_for_layer(self, layer_idx: int) -> int | None:
        # transformers' OLMo 2 attends over every position, whatever a stray `sliding_window` key says.
        return None


class Olmo2Attention(Attention):
    """Attention whose q and k are normalised over the full projection width, before the heads are split."""

    def __init__(self, args: Args, layer_idx: int):
        super().__init__(args, layer_idx)  # qk_norm=False: the base class's norms are per head
        self.q_norm = RMSNorm(self.n_heads * self.head_dim, args.rms_norm_eps)
        self.k_norm = RMSNorm(self.n_kv * self.head_dim, args.rms_norm_eps)

    def project(self, x: torch.Tensor):
        # Every path of Attention.forward takes q, k, v from here (LoRA's fused projections included), so the
        # norms sit where transformers has them: on [B, T, heads * head_dim], before the view into heads.
        q, k, v = super().project(x)
        return self.q_norm(q), self.k_norm(k), v

    def forward_rows(self, x, rows, rope, mask):
        # Attention.forward_rows projects q for the picked rows alone, skipping project(): the norms would be
        # missed. OLMo 2's Block never asks for it; fail loudly rather than compute something else.
        raise NotImplementedError("OLMo 2 attention runs on whole sequences (its blocks have no forward_rows)")


class Block(nn.Module):
    """h = x + post_attention_layernorm(attn(x)); out = h + post_feedforward_layernorm(mlp(h))."""

    def __init__(self, args: Args, layer_idx: int):
        super().__init__()
        self.self_attn = Olmo2Attention(args, layer_idx)
        self.mlp = GatedMLP(args.hidden_size, args.intermediate_size, args.hidden_act, bias=False)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.post_feedforward_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)

    def forward(self, x, rope, mask, cache=None):
        h = x + self.post_attention_layernorm(self.self_attn(x, rope, mask, cache))
        return h + self.post_feedforward_layernorm(self.mlp(h))


class Model(CausalLM):
    Args = Args

    def __init__(self, args):
        super().__init__(args)
        weigh_norms_first(self)

    @staticmethod
    def make_block(args, layer_idx):
        return Block(args, layer_idx)
