"""gpt-oss (model_type "gpt_oss"): a pre-norm decoder with a mixture of experts in every layer. What is special:

- attention sinks: each head has a learned logit `sinks[h]` that joins the softmax's denominator (a key nobody's
  value is read from), so a head may attend to "nothing". SDPA cannot take it; the scores are computed explicitly;
- `layer_types` alternates sliding-window and full layers (sliding first when config.json has none);
- biases on q/k/v/o (`attention_bias`, true by default) and YaRN RoPE (the default when config.json gives none);
- the router (`mlp.router`, a weight *and* a bias, not a Linear: PEFT's "all-linear" leaves it alone, as we do)
  takes the top-k over the raw logits, then the softmax over those k logits only;
- each expert is a clamped SwiGLU: gate clamped above at `swiglu_limit`, up clamped to +-limit,
  out = (up + 1) * gate * sigmoid(swiglu_alpha * gate), with biases on both projections;
- experts are stored fused and transposed: `experts.gate_up_proj` [E, hidden, 2I] with the gate and up columns
  *interleaved* (gate = [..., 0::2], up = [..., 1::2]), `gate_up_proj_bias` [E, 2I], `experts.down_proj`
  [E, I, hidden], `down_proj_bias` [E, hidden]. We hold them as those four parameters, under those names, so the
  bf16 checkpoints (and transformers' save_pretrained) load and save by name. The hub's MXFP4 release
  (`*_blocks` / `*_scales` tensors) is refused with the tensor's name.

Tokens are grouped per expert as in moe.py (one matmul per expert and projection, no loop over tokens); the
load-balancing loss (`output_router_logits`, `router_aux_loss_coef`) is moe.MoECausalLM's. LoRA adapts
gate_up_proj and down_proj as PEFT's `target_parameters` do (lora/param_lora.py wraps `Experts` and passes its
per-expert low-rank updates to `Experts.forward`).
"""
from __future__ import annotations

import functools
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import CheckpointError
from ..kernels import apply_rope
from .args import BaseArgs
from .attention import Attention, AttentionMask
from .field_checks import check_fields
from .mixtral import check_routing
from .moe import MoECausalLM, load_balancing_loss, run_routed
from .norms import RMSNorm, weigh_norms_first

LAYER_TYPES = ("sliding_attention", "full_attention")
# transformers' default when config.json names no RoPE: YaRN stretching 4k pretraining positions 32 times.
DEFAULT_ROPE = {"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False,
                "original_max_position_embeddings": 4096}
_MXFP4 = re.compile(r"\.mlp\.experts\.\w+_(blocks|scales)$")


@dataclass
class Args(BaseArgs):
    model_type: str = "gpt_oss"
    num_hidden_layers: int = 36
    vocab_size: int = 201088
    hidden_size: int = 2880
    intermediate_size: int = 2880     # each expert's
    head_dim: int | None = 64
    num_attention_heads: int = 64
    num_key_value_heads: int | None = 8
    sliding_window: int | None = 128
    max_position_embeddings: int = 131072
    rms_norm_eps: float = 1e-5
    rope_theta: float = 150000.0
    attention_bias: bool = True
    num_local_experts: int = 128
    num_experts_per_tok: int = 4
    swiglu_alpha: float = 1.702
    swiglu_limit: float = 7.0
    router_aux_loss_coef: float = 0.001
    output_router_logits: bool = False

    def validate(self, source: str = "config.json"):
        if self.rope_scaling is None and not any(k in self.raw for k in ("rope_parameters", "rope_scaling")):
            self.rope_scaling = dict(DEFAULT_ROPE)
        super().validate(source)
        check_fields(self, source, positive_ints=("num_local_experts", "num_experts_per_tok"),
                     positive_floats=("swiglu_alpha", "swiglu_limit"),
                     flags=("output_router_logits", "attention_bias"))
        check_routing(self, self.num_local_experts, source)
        if self.layer_types is None:
            self.layer_types = [LAYER_TYPES[i % 2] for i in range(self.num_hidden_layers)]
        bad = [t for t in self.layer_types if t not in LAYER_TYPES]
        if bad:
            raise CheckpointError(f"{source}: field 'layer_types' holds {bad[0]!r}; each entry must be one of "
                                  f"{', '.join(LAYER_TYPES)}")

    def sparse_layers(self) -> list[int]:
        return list(range(self.num_hidden_layers))

    def has_dense_mlp(self, layer_idx: int) -> bool:
        return False

    def expert_count(self) -> int:
        return self.num_local_experts


def sink_attention(q, k, v, dense, sinks, scale):
    """softmax over [scores, sink] per head, the sink's column then dropped: q [B, Hq, T, D], k/v [B, Hk, S, D],
    `dense` a boolean [.., T, S] mask (True = attend) or None (plain causal)."""
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    if dense is None:
        T, S = q.shape[-2], k.shape[-2]
        dense = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T)
    scores = scores.masked_fill(~dense, torch.finfo(scores.dtype).min)
    sink = sinks.to(scores.dtype).view(1, -1, 1, 1).expand(*scores.shape[:-1], 1)
    # At least float32 for the softmax (half precision rounds the small probabilities away).
    probs = torch.softmax(torch.cat([scores, sink], dim=-1), dim=-1,
                          dtype=torch.promote_types(scores.dtype, torch.float32))[..., :-1]
    return torch.matmul(probs.to(v.dtype), v)


class SinkAttention(Attention):
    """velotune's Attention (projections with biases, RoPE, KV cache, per-layer window) plus one sink per head."""

    def __init__(self, args, layer_idx: int):
        super().__init__(args, layer_idx)
        self.sinks = nn.Parameter(torch.zeros(args.num_attention_heads))
        self.scale = self.head_dim ** -0.5

    def forward(self, x, rope, mask: AttentionMask, cache=None):
        B, T, _ = x.shape
        q, k, v = self.project(x)
        q = q.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = k.view(B, T, self.n_kv, self.head_dim).transpose(1, 2)
        v = v.view(B, T, self.n_kv, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, k, *rope)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)
        out = sink_attention(q, k, v, mask.dense(self.window), self.sinks, self.scale)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))


class Router(nn.Module):
    """logits = x W^T + b; the top k logits, softmaxed among themselves (in that order, as transformers)."""

    def __init__(self, hidden: int, num_experts: int, top_k: int):
        super().__init__()
        self.top_k = top_k
        self.weight = nn.Parameter(torch.zeros(num_experts, hidden))
        self.bias = nn.Parameter(torch.zeros(num_experts))

    def forward(self, flat):
        logits = F.linear(flat, self.weight, self.bias)
        top, chosen = torch.topk(logits, self.top_k, dim=-1)
        return logits, torch.softmax(top, dim=-1), chosen


class Experts(nn.Module):
    """The fused expert weights, in the checkpoint's layout (see the module docstring)."""

    # The fused [experts, in, out] parameters LoRA may adapt (lora/param_lora.py); the biases stay frozen.
    lora_parameters = ("gate_up_proj", "down_proj")

    def __init__(self, hidden: int, intermediate: int, num_experts: int, alpha: float, limit: float):
        super().__init__()
        self.num_experts, self.alpha, self.limit = num_experts, alpha, limit
        self.gate_up_proj = nn.Parameter(torch.zeros(num_experts, hidden, 2 * intermediate))
        self.gate_up_proj_bias = nn.Parameter(torch.zeros(num_experts, 2 * intermediate))
        self.down_proj = nn.Parameter(torch.zeros(num_experts, intermediate, hidden))
        self.down_proj_bias = nn.Parameter(torch.zeros(num_experts, hidden))

    def activation(self, gate_up):
        gate = gate_up[..., 0::2].clamp(max=self.limit)   # interleaved columns, not two halves
        up = gate_up[..., 1::2].clamp(-self.limit, self.limit)
        return (up + 1) * (gate * torch.sigmoid(gate * self.alpha))

    def expert(self, e: int, x, adapters: dict | None = None):
        """Expert e on its rows; `adapters` (param name -> f(e, rows)) adds LoRA's low-rank update to a projection's
        output (lora/param_lora.py), so W + delta is never formed."""
        gate_up = x @ self.gate_up_proj[e] + self.gate_up_proj_bias[e]
        if adapters and "gate_up_proj" in adapters:
            gate_up = gate_up + adapters["gate_up_proj"](e, x)
        hidden = self.activation(gate_up)
        out = hidden @ self.down_proj[e] + self.down_proj_bias[e]
        if adapters and "down_proj" in adapters:
            out = out + adapters["down_proj"](e, hidden)
        return out

    def forward(self, flat, chosen, weights, adapters: dict | None = None):
        """sum_k weights[t, k] * expert[chosen[t, k]](flat[t]), each expert run once on its tokens (moe.py's
        grouping: assignments sorted by expert, one host sync per layer for the group sizes)."""
        # Empty groups run too (0 rows): cheap, and every parameter takes part in the graph (DDP / FSDP).
        experts = [functools.partial(self.expert, e, adapters=adapters) for e in range(self.num_experts)]
        return run_routed(experts, flat, chosen, weights)


class SparseFeedForward(nn.Module):
    """`mlp`: router + experts. Keeps the last forward's router logits for the load-balancing loss."""

    def __init__(self, args):
        super().__init__()
        self.router = Router(args.hidden_size, args.num_local_experts, args.num_experts_per_tok)
        self.experts = Experts(args.hidden_size, args.intermediate_size, args.num_local_experts,
                               args.swiglu_alpha, args.swiglu_limit)
        self.router_logits: torch.Tensor | None = None  # not a buffer: never saved, never moved

    def forward(self, x):
        flat = x.reshape(-1, x.shape[-1])
        self.router_logits, weights, chosen = self.router(flat)
        return self.experts(flat, chosen, weights).reshape(x.shape)


class Block(nn.Module):
    """x + attn(norm(x)), then h + moe(norm(h)). Its own class: the training forward keeps the full path (every
    position reaches the routers, which the load-balancing loss reads)."""

    def __init__(self, args, layer_idx: int):
        super().__init__()
        self.self_attn = SinkAttention(args, layer_idx)
        self.mlp = SparseFeedForward(args)
        self.input_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)

    def forward(self, x, rope, mask, cache=None):
        h = x + self.self_attn(self.input_layernorm(x), rope, mask, cache)
        return h + self.mlp(self.post_attention_layernorm(h))


class Model(MoECausalLM):
    Args = Args

    def __init__(self, args):
        super().__init__(args)
        weigh_norms_first(self)  # transformers' GptOssRMSNorm: weight * normed in fp32, then one cast

    @staticmethod
    def make_block(args, layer_idx):
        return Block(args, layer_idx)

    def router_aux_loss(self, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The load-balancing loss of the last forward (unscaled), over every layer's router logits."""
        logits = [m.router_logits for m in self.modules()
                  if isinstance(m, SparseFeedForward) and m.router_logits is not None]
        if not logits:
            raise RuntimeError("no router logits: run a forward first")
        return load_balancing_loss(logits, self.args.num_local_experts, self.args.num_experts_per_tok,
                                   attention_mask)

    # The stored names are ours (fused experts included): no splitting, unlike Mixtral / Qwen3-MoE.
    @classmethod
    def checkpoint_shapes(cls, args, shapes: dict, config_path) -> dict:
        for name, (_, file) in shapes.items():
            if _MXFP4.search(name):
                raise CheckpointError(
                    f"{file}: tensor '{name}' is an MXFP4-quantized expert weight (gpt-oss's hub release); "
                    "velotune loads the bf16 layout (mlp.experts.gate_up_proj / down_proj): use a bf16 copy of "
                    "the checkpoint, or load it in transformers with Mxfp4Config(dequantize=True) and "
                    "save_pretrained")
        return shapes

    @classmethod
    def checkpoint_tensors(cls, name: str, tensor):
        yield name, tensor
