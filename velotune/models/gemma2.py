"""Gemma 2 (model_type "gemma2"): Gemma's constants plus

- "sandwich" blocks: norms before *and after* attention and the MLP (four RMSNorms per layer);
- attention scaled by query_pre_attn_scalar**-0.5 instead of head_dim**-0.5;
- tanh soft-capping of attention scores (attn_logit_softcapping) and of the final logits
  (final_logit_softcapping);
- a sliding window on the layers `layer_types` marks "sliding_attention" (alternating, from layer 0,
  when config.json has no `layer_types`).
"""
from dataclasses import dataclass

from torch import nn

from .args import BaseArgs
from .attention import Attention
from .norms import RMSNorm
from .base import CausalLM
from .gemma import refuse_bidirectional
from .mlp import GatedMLP


@dataclass
class Args(BaseArgs):
    model_type: str = "gemma2"
    num_key_value_heads: int | None = 4
    head_dim: int | None = 256
    hidden_activation: str = "gelu_pytorch_tanh"
    max_position_embeddings: int = 8192
    tie_word_embeddings: bool = True
    pad_token_id: int | None = 0
    query_pre_attn_scalar: float = 256
    sliding_window: int | None = 4096
    final_logit_softcapping: float | None = 30.0
    attn_logit_softcapping: float | None = 50.0
    use_bidirectional_attention: bool | None = None

    def validate(self, source: str = "config.json"):
        super().validate(source)
        refuse_bidirectional(self, source)
        if self.layer_types is None:
            self.layer_types = ["sliding_attention" if i % 2 == 0 else "full_attention"
                                for i in range(self.num_hidden_layers)]


class Block(nn.Module):
    """h = x + post_attn_norm(attn(norm(x))); out = h + post_ff_norm(mlp(pre_ff_norm(h)))."""

    def __init__(self, args, layer_idx: int):
        super().__init__()
        eps = args.rms_norm_eps
        self.self_attn = Attention(args, layer_idx, scale=args.query_pre_attn_scalar ** -0.5,
                                   softcap=args.attn_logit_softcapping, norm_offset=1.0)
        self.mlp = GatedMLP(args.hidden_size, args.intermediate_size, args.hidden_activation, bias=False)
        self.input_layernorm = RMSNorm(args.hidden_size, eps, offset=1.0)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, eps, offset=1.0)
        self.pre_feedforward_layernorm = RMSNorm(args.hidden_size, eps, offset=1.0)
        self.post_feedforward_layernorm = RMSNorm(args.hidden_size, eps, offset=1.0)

    def forward(self, x, rope, mask, cache=None):
        h = x + self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), rope, mask, cache))
        return h + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(h)))


class Model(CausalLM):
    Args = Args
    norm_offset = 1.0
    scale_embeddings = True

    def __init__(self, args):
        super().__init__(args)
        self.final_logit_softcap = args.final_logit_softcapping

    @staticmethod
    def make_block(args, layer_idx):
        return Block(args, layer_idx)
