"""Qwen 3 (model_type "qwen3"): Llama's decoder with RMSNorm on each head of q and k (before RoPE),
head_dim 128 unless set, `attention_bias` on all four projections, and Qwen 2's optional sliding window."""
from dataclasses import dataclass

from .base import CausalLM, PreNormBlock
from .qwen2 import Args as Qwen2Args


@dataclass
class Args(Qwen2Args):
    """Qwen 2's configuration keys (sliding-window rules included), with Qwen 3's defaults."""
    model_type: str = "qwen3"
    head_dim: int | None = 128


class Model(CausalLM):
    Args = Args

    @staticmethod
    def make_block(args, layer_idx):
        return PreNormBlock(args, layer_idx, attn_kwargs=dict(qk_norm=True), mlp_bias=False)
