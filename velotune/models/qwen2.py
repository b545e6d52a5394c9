"""Qwen 2 / 2.5 (model_type "qwen2"): Llama's decoder with biases on q/k/v (none on o_proj), and an optional
sliding window: only with `use_sliding_window`, on the layers `layer_types` marks "sliding_attention" (older
configs have no `layer_types`: then the layers from `max_window_layers` on, as transformers does)."""
from dataclasses import dataclass

from .args import BaseArgs
from .base import CausalLM, PreNormBlock


@dataclass
class Args(BaseArgs):
    model_type: str = "qwen2"
    num_key_value_heads: int | None = 32  # transformers' default when config.json leaves it out
    max_position_embeddings: int = 32768
    use_sliding_window: bool = False
    sliding_window: int | None = 4096
    max_window_layers: int = 28

    def validate(self, source: str = "config.json"):
        super().validate(source)
        self.layer_types = qwen_layer_types(self)


def qwen_layer_types(args) -> list[str]:
    """Which layers slide (shared with Qwen 3). Without `use_sliding_window` none does, whatever
    `layer_types` says: transformers then sets the window to None."""
    if not args.use_sliding_window:
        args.sliding_window = None
    if args.layer_types is not None:
        return list(args.layer_types)
    return ["sliding_attention" if args.sliding_window is not None and i >= args.max_window_layers
            else "full_attention" for i in range(args.num_hidden_layers)]


class Model(CausalLM):
    Args = Args

    @staticmethod
    def make_block(args, layer_idx):
        return PreNormBlock(args, layer_idx, attn_kwargs=dict(qkv_bias=True, o_bias=False), mlp_bias=False)
