"""Mistral (model_type "mistral"): Llama's decoder with no biases anywhere and, when `sliding_window` is set,
the same sliding window on every layer (transformers' Mistral ignores `layer_types`)."""
from dataclasses import dataclass

from .args import BaseArgs
from .base import CausalLM, PreNormBlock


@dataclass
class Args(BaseArgs):
    model_type: str = "mistral"
    num_key_value_heads: int | None = 8
    max_position_embeddings: int = 4096 * 32
    sliding_window: int | None = 4096  # transformers' default when config.json leaves the key out

    def window_for_layer(self, layer_idx: int) -> int | None:
        return self.sliding_window


class Model(CausalLM):
    Args = Args

    @staticmethod
    def make_block(args, layer_idx):
        return PreNormBlock(args, layer_idx, attn_kwargs=dict(qkv_bias=False, o_bias=False), mlp_bias=False)
