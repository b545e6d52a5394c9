"""Qwen3-MoE (model_type "qwen3_moe"): Qwen 3's attention (RMSNorm on each head of q and k, `attention_bias` on all
four projections, head_dim hidden/heads unless set) with sparse mixture-of-experts feed-forwards. The router takes
the softmax over all `num_experts`, keeps the top `num_experts_per_tok`, renormalises them only when
`norm_topk_prob`, and casts them to the model's dtype. Layer i is sparse unless it is in `mlp_only_layers` or
(i + 1) is not a multiple of `decoder_sparse_step` (or num_experts, which transformers 5 writes
as `num_local_experts`, is 0): those keep a dense MLP of
`intermediate_size`; experts are `moe_intermediate_size` wide. With `use_sliding_window`, one window on every
layer. Names: `mlp.gate`, `mlp.experts.N.gate_proj/up_proj/down_proj`; the load-balancing loss is moe's."""
from dataclasses import dataclass

from .args import BaseArgs
from .field_checks import check_fields, is_int
from .mixtral import check_routing
from .moe import MoEBlock, MoECausalLM, SparseMoE, dense_mlp
from ..errors import CheckpointError


@dataclass
class Args(BaseArgs):
    model_type: str = "qwen3_moe"
    num_key_value_heads: int | None = 4
    max_position_embeddings: int = 32768
    use_sliding_window: bool = False
    sliding_window: int | None = 4096
    decoder_sparse_step: int = 1
    moe_intermediate_size: int = 768
    num_experts_per_tok: int = 8
    num_experts: int = 128
    num_local_experts: int | None = None  # transformers 5 writes the expert count under this name
    norm_topk_prob: bool = False
    output_router_logits: bool = False
    router_aux_loss_coef: float = 0.001
    mlp_only_layers: list | None = None

    def validate(self, source: str = "config.json"):
        super().validate(source)
        if not self.use_sliding_window:
            self.sliding_window = None  # as transformers: the window is read only with use_sliding_window
        check_fields(self, source, positive_ints=("moe_intermediate_size", "num_experts_per_tok",
                                                  "decoder_sparse_step"),
                     flags=("norm_topk_prob", "output_router_logits", "use_sliding_window"))
        if self.num_local_experts is not None:
            if "num_experts" in self.raw and self.raw["num_experts"] != self.num_local_experts:
                raise CheckpointError(f"{source}: fields 'num_experts' ({self.raw['num_experts']!r}) and "
                                      f"'num_local_experts' ({self.num_local_experts!r}) disagree")
            self.num_experts = self.num_local_experts
        if not is_int(self.num_experts) or self.num_experts < 0:
            raise CheckpointError(f"{source}: field 'num_experts' must be a non-negative integer, "
                                  f"got {self.num_experts!r}")
        if self.num_experts:
            check_routing(self, self.num_experts, source)
        self.mlp_only_layers = [] if self.mlp_only_layers is None else self.mlp_only_layers
        if not isinstance(self.mlp_only_layers, list) or not all(
                is_int(i) and 0 <= i < self.num_hidden_layers for i in self.mlp_only_layers):
            raise CheckpointError(f"{source}: field 'mlp_only_layers' must be a list of layer indices below "
                                  f"num_hidden_layers ({self.num_hidden_layers}), got {self.mlp_only_layers!r}")

    def window_for_layer(self, layer_idx: int) -> int | None:
        return self.sliding_window

    def sparse_layers(self) -> list[int]:
        return [i for i in range(self.num_hidden_layers) if is_sparse(self, i)]

    def has_dense_mlp(self, layer_idx: int) -> bool:
        return not is_sparse(self, layer_idx)

    def expert_count(self) -> int:
        return self.num_experts


def is_sparse(args, layer_idx: int) -> bool:
    return (layer_idx not in args.mlp_only_layers and args.num_experts > 0
            and (layer_idx + 1) % args.decoder_sparse_step == 0)


class Model(MoECausalLM):
    Args = Args

    @staticmethod
    def make_block(args, layer_idx):
        if is_sparse(args, layer_idx):
            ffn = SparseMoE(args.hidden_size, args.moe_intermediate_size, args.num_experts, args.num_experts_per_tok,
                            args.hidden_act, Model.expert_names, renormalize=args.norm_topk_prob,
                            weights_in_model_dtype=True)
        else:
            ffn = dense_mlp(args)
        return MoEBlock(args, layer_idx, ffn, "mlp", attn_kwargs=dict(qk_norm=True))
