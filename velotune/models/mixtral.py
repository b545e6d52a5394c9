"""Mixtral (model_type "mixtral"): Mistral's attention (no biases, GQA, one sliding window on every layer when
`sliding_window` is set) with a sparse mixture of SwiGLU experts in place of every MLP. The router (`gate`) takes
the softmax over all experts, keeps the top `num_experts_per_tok` and renormalises them (the same as a softmax over
the top-k logits); routing weights stay float32. Checkpoint names: `block_sparse_moe.gate` and
`block_sparse_moe.experts.N.w1` (gate) / `w3` (up) / `w2` (down); `intermediate_size` is each expert's size.
The load-balancing loss (`output_router_logits`, `router_aux_loss_coef`) is moe.MoECausalLM's."""
import re
from dataclasses import dataclass

from .args import BaseArgs
from .field_checks import check_fields, is_number
from .moe import MoEBlock, MoECausalLM, SparseMoE
from ..errors import CheckpointError


@dataclass
class Args(BaseArgs):
    model_type: str = "mixtral"
    num_key_value_heads: int | None = 8
    max_position_embeddings: int = 4096 * 32
    rms_norm_eps: float = 1e-5
    num_experts_per_tok: int = 2
    num_local_experts: int = 8
    output_router_logits: bool = False
    router_aux_loss_coef: float = 0.001
    router_jitter_noise: float = 0.0

    def validate(self, source: str = "config.json"):
        super().validate(source)
        check_fields(self, source, positive_ints=("num_local_experts", "num_experts_per_tok"),
                     flags=("output_router_logits",))
        check_routing(self, self.num_local_experts, source)
        if not is_number(self.router_jitter_noise) or not 0 <= self.router_jitter_noise < 1:
            raise CheckpointError(f"{source}: field 'router_jitter_noise' must be a number in [0, 1), "
                                  f"got {self.router_jitter_noise!r}")

    def window_for_layer(self, layer_idx: int) -> int | None:
        return self.sliding_window  # transformers' Mixtral: one mask for all layers, whatever layer_types says

    def sparse_layers(self) -> list[int]:
        return list(range(self.num_hidden_layers))

    def has_dense_mlp(self, layer_idx: int) -> bool:
        return False

    def expert_count(self) -> int:
        return self.num_local_experts


def check_routing(args, num_experts: int, source: str):
    """Shared with Qwen3-MoE: top-k no larger than the expert count, a finite non-negative loss coefficient."""
    if args.num_experts_per_tok > num_experts:
        raise CheckpointError(f"{source}: field 'num_experts_per_tok' ({args.num_experts_per_tok}) exceeds the "
                              f"number of experts ({num_experts})")
    coef = args.router_aux_loss_coef
    if not is_number(coef) or not 0 <= coef < float("inf"):
        raise CheckpointError(f"{source}: field 'router_aux_loss_coef' must be a non-negative number, got {coef!r}")


class Model(MoECausalLM):
    Args = Args
    ffn_name = "block_sparse_moe"
    expert_names = ("w1", "w3", "w2")  # (gate, up, down)

    def peft_name(self, name: str) -> str:
        """transformers 5 holds the MoE block as `mlp` in memory (the files keep `block_sparse_moe`)."""
        return name.replace(".block_sparse_moe.", ".mlp.")

    def name_from_peft(self, name: str) -> str:
        return re.sub(r"(layers\.\d+)\.mlp\.", r"\1.block_sparse_moe.", name)

    @staticmethod
    def make_block(args, layer_idx):
        moe = SparseMoE(args.hidden_size, args.intermediate_size, args.num_local_experts, args.num_experts_per_tok,
                        args.hidden_act, Model.expert_names, renormalize=True, weights_in_model_dtype=False,
                        jitter=args.router_jitter_noise)
        return MoEBlock(args, layer_idx, moe, Model.ffn_name, attn_kwargs=dict(qkv_bias=False, o_bias=False))
