"""Phi-3 / Phi-3.5 / Phi-4-mini (model_type "phi3"): Llama's decoder with q, k and v fused in one `qkv_proj`,
gate and up fused in one `gate_up_proj`, no biases, optional partial rotary (`partial_rotary_factor`),
LongRoPE for the long-context variants, and `sliding_window` (when set) on every layer."""
from dataclasses import dataclass

from .args import BaseArgs
from .base import CausalLM, PreNormBlock


@dataclass
class Args(BaseArgs):
    model_type: str = "phi3"
    rms_norm_eps: float = 1e-5
    max_position_embeddings: int = 4096
    original_max_position_embeddings: int = 4096
    pad_token_id: int | None = 32000

    def _complete_rope_scaling(self):
        # Older Phi-3 configs name LongRoPE "su" (and once "yarn"); transformers reads both as longrope.
        if self.rope_scaling and self.rope_scaling.get("rope_type") in ("su", "yarn"):
            self.rope_scaling = {**self.rope_scaling, "rope_type": "longrope"}
        super()._complete_rope_scaling()

    def window_for_layer(self, layer_idx: int) -> int | None:
        return self.sliding_window


class Model(CausalLM):
    Args = Args

    @staticmethod
    def make_block(args, layer_idx):
        return PreNormBlock(args, layer_idx, attn_kwargs=dict(qkv_bias=False, o_bias=False, fused_qkv=True),
                            mlp_fused=True, mlp_bias=False)
