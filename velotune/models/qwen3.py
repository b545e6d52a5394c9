"""Qwen 3 (model_type "qwen3"): Llama's decoder with RMSNorm on each head of q and k (before RoPE),
head_dim 128 unless set, `attention_bias` on all four projections, and Qwen 2's optional sliding window."""
from dataclasses import dataclass

from .args import BaseArgs
from .base import CausalLM, PreNormBlock
from .qwen2 import qwen_layer_types


@dataclass
class Args(BaseArgs):
    model_type: str = "qwen3"
    head_dim: int | None = 128
    num_key_value_heads: int | None = 32  # transformers' default when config.json leaves it out
    max_position_embeddings: int = 32768
    use_sliding_window: bool = False
    sliding_window: int | None = 4096
    max_window_layers: int = 28

    def validate(self, source: str = "config.json"):
        super().validate(source)
        self.layer_types = qwen_layer_types(self)


class Model(CausalLM):
    Args = Args

    @staticmethod
    def make_block(args, layer_idx):
        return PreNormBlock(args, layer_idx, attn_kwargs=dict(qk_norm=True), mlp_bias=False)
