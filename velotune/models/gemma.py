"""Gemma (model_type "gemma"): Llama's decoder with Gemma's constants — RMSNorm weights stored as weight-1
(scaled by 1 + weight, in fp32), embeddings multiplied by sqrt(hidden_size) in the model dtype, a tanh-GeGLU
MLP, head_dim 256 unless set, tied embeddings by default."""
from dataclasses import dataclass

from ..errors import UnsupportedError
from .args import BaseArgs
from .base import CausalLM, PreNormBlock


def refuse_bidirectional(args, source: str):
    """Gemma configs may ask for bidirectional attention (an encoder variant): we build causal decoders only."""
    if args.use_bidirectional_attention:
        raise UnsupportedError(f"{source}: use_bidirectional_attention (an encoder variant) is not supported; "
                               "only causal decoders are")


@dataclass
class Args(BaseArgs):
    model_type: str = "gemma"
    num_key_value_heads: int | None = 16
    head_dim: int | None = 256
    hidden_act: str = "gelu_pytorch_tanh"
    hidden_activation: str | None = None  # some configs name the activation here
    max_position_embeddings: int = 8192
    tie_word_embeddings: bool = True
    pad_token_id: int | None = 0
    use_bidirectional_attention: bool | None = None

    def validate(self, source: str = "config.json"):
        super().validate(source)
        refuse_bidirectional(self, source)

    @property
    def activation(self) -> str:
        # The released configs say "gelu" but mean the tanh approximation; transformers reads it so too.
        act = self.hidden_activation or self.hidden_act
        return "gelu_pytorch_tanh" if act == "gelu" else act

    def window_for_layer(self, layer_idx: int) -> int | None:
        return None


class Model(CausalLM):
    Args = Args
    norm_offset = 1.0
    scale_embeddings = True

    @staticmethod
    def make_block(args, layer_idx):
        return PreNormBlock(args, layer_idx, mlp_bias=False, act=args.activation, norm_offset=1.0)
