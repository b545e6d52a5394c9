"""The sparse mixture-of-experts feed-forward block shared by Mixtral and Qwen3-MoE, its decoder block, the router's
load-balancing loss, and the checks of a checkpoint's expert tensors.

A router linear (`gate`) scores each token against every expert; each token goes to its top-k experts and their
outputs are summed, weighted by the routing probabilities. The experts run grouped: the (token, expert) assignments
are sorted by expert, each expert's SwiGLU runs once on its contiguous group (one matmul per projection), and the
weighted results are put back in token order and summed (run_routed). No loop over tokens.

Experts are held as separate `nn.Linear` modules, under the hub's per-expert names (Mixtral
`block_sparse_moe.experts.N.w1/w2/w3`, Qwen3-MoE `mlp.experts.N.gate_proj/up_proj/down_proj`): these are what the
published checkpoints hold *and* what transformers' `save_pretrained` writes by default (it reverts its in-memory
fused `experts.gate_up_proj` [E, 2I, H] / `experts.down_proj` [E, H, I] to this layout), so both load by name; LoRA
and NF4/int8 quantization apply to each expert as to any linear. The fused layout (`save_original_format=False`) is
split into per-expert tensors by `split_fused` / `fused_shapes`.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import CheckpointError
from ..kernels.dispatch import use_triton
from ..kernels.grouped_mm import grouped_linear
from ..kernels.lora_ops import lora_mlp
from ..kernels.shape_buckets import bucket_length, shape_keyed_kernels
from .attention import Attention
from .base import CausalLM, CausalLMOutput
from .mlp import ACTIVATIONS, GatedMLP, gated_activation
from .norms import RMSNorm


@dataclass
class MoECausalLMOutput(CausalLMOutput):
    aux_loss: torch.Tensor | None = None   # the router load-balancing loss (unscaled), when asked for


class Expert(nn.Module):
    """One SwiGLU expert, down(act(gate(x)) * up(x)), under the family's names for its three projections."""

    def __init__(self, hidden: int, intermediate: int, act: str, names: tuple[str, str, str]):
        super().__init__()
        self.names = names  # (gate, up, down)
        for name, (n_in, n_out) in zip(names, ((hidden, intermediate), (hidden, intermediate),
                                               (intermediate, hidden))):
            setattr(self, name, nn.Linear(n_in, n_out, bias=False))
        self.act, self.act_kind = gated_activation(act), ACTIVATIONS[act]

    def forward(self, x):
        gate, up, down = (getattr(self, n) for n in self.names)
        out = lora_mlp([gate, up], down, self.act, self.act_kind, x)  # LoRA's fused op when it applies
        return out if out is not None else down(self.act(gate(x), up(x)))


class SparseMoE(nn.Module):
    """Router + experts. `renormalize`: the top-k probabilities are divided by their sum (Mixtral always;
    Qwen3-MoE when norm_topk_prob). `weights_in_model_dtype`: Qwen3-MoE casts the routing weights back to the
    model's dtype before weighting; Mixtral weighs in float32 (the same in fp32, not in bf16)."""

    def __init__(self, hidden: int, intermediate: int, num_experts: int, top_k: int, act: str,
                 names: tuple[str, str, str], *, renormalize: bool, weights_in_model_dtype: bool,
                 jitter: float = 0.0):
        super().__init__()
        self.num_experts, self.top_k = num_experts, top_k
        self.renormalize, self.weights_in_model_dtype, self.jitter = renormalize, weights_in_model_dtype, jitter
        self.gate = nn.Linear(hidden, num_experts, bias=False)
        self.experts = nn.ModuleList(Expert(hidden, intermediate, act, names) for _ in range(num_experts))
        # The last forward's router logits [tokens, experts], read by the model for the load-balancing loss (a
        # block returns its hidden states only). Not a buffer: never saved, never moved.
        self.router_logits: torch.Tensor | None = None

    def forward(self, x):
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        if self.training and self.jitter > 0:  # Mixtral's router_jitter_noise (0 in the released configs)
            flat = flat * torch.empty_like(flat).uniform_(1.0 - self.jitter, 1.0 + self.jitter)
        logits = self.gate(flat)
        self.router_logits = logits
        probs = F.softmax(logits, dim=-1, dtype=torch.float32)
        weights, chosen = torch.topk(probs, self.top_k, dim=-1)
        if self.renormalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        if self.weights_in_model_dtype:
            weights = weights.to(logits.dtype)
        return self.grouped_experts(flat, chosen, weights).reshape(shape)

    def grouped_experts(self, flat, chosen, weights):
        """sum_k weights[t, k] * expert[chosen[t, k]](flat[t]), each expert run once on all its tokens."""
        return run_routed(list(self.experts), flat, chosen, weights)


class MoEBlock(nn.Module):
    """x + attn(norm(x)), then h + ffn(norm(h)), the feed-forward a SparseMoE or a dense GatedMLP. Its own class,
    not base.PreNormBlock: the training forward then keeps the full path (the last block's router must see every
    position for the load-balancing loss)."""

    def __init__(self, args, layer_idx: int, ffn: nn.Module, ffn_name: str, attn_kwargs=None):
        super().__init__()
        self.self_attn = Attention(args, layer_idx, **(attn_kwargs or {}))
        self.ffn_name = ffn_name
        setattr(self, ffn_name, ffn)  # "block_sparse_moe" (Mixtral) or "mlp" (Qwen3-MoE), the checkpoint's name
        self.input_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)

    @property
    def ffn(self) -> nn.Module:
        return getattr(self, self.ffn_name)

    def forward(self, x, rope, mask, cache=None):
        h = x + self.self_attn(self.input_layernorm(x), rope, mask, cache)
        return h + self.ffn(self.post_attention_layernorm(h))


class MoECausalLM(CausalLM):
    """A causal LM whose blocks are MoEBlocks: forward adds the router's load-balancing loss as transformers does
    (with `output_router_logits`, from the argument or config.json: `loss += router_aux_loss_coef * aux_loss`), and
    the checkpoint hooks below check and map the expert tensors. Subclasses set the names."""

    ffn_name = "mlp"                                   # the feed-forward's module name in the checkpoint
    expert_names = ("gate_proj", "up_proj", "down_proj")

    def forward(self, input_ids=None, *, labels=None, attention_mask=None, reduction: str = "mean",
                output_router_logits: bool | None = None, **inputs) -> MoECausalLMOutput:
        """CausalLM's forward; `out.aux_loss` is the load-balancing loss when `output_router_logits` (default:
        config.json's). It is added (scaled by router_aux_loss_coef) to a "mean" loss, as transformers adds it;
        a "sum" or per-position ("none") loss is left alone: the caller adds `out.aux_loss` as its objective
        weighs it."""
        out = super().forward(input_ids, labels=labels, attention_mask=attention_mask, reduction=reduction,
                              **inputs)
        out = MoECausalLMOutput(**vars(out))
        if self.args.output_router_logits if output_router_logits is None else output_router_logits:
            out.aux_loss = self.router_aux_loss(attention_mask)
            if out.loss is not None and reduction == "mean":
                out.loss = out.loss + self.args.router_aux_loss_coef * out.aux_loss.to(out.loss.device)
        return out

    def router_aux_loss(self, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The load-balancing loss of the last forward (unscaled); `attention_mask` the one that forward had."""
        logits = collect_router_logits(self)
        if not logits:
            raise RuntimeError("no router logits: run a forward first (or the model has no sparse layer)")
        return load_balancing_loss(logits, self.args.expert_count(), self.args.num_experts_per_tok, attention_mask)

    # ---- checkpoint hooks (for the loader: see the module docstring) ----
    @classmethod
    def checkpoint_shapes(cls, args, shapes: dict, config_path) -> dict:
        """Header shapes under our names (a fused layout split per expert), the expert tensors checked."""
        shapes = fused_shapes(shapes, cls.ffn_name, cls.expert_names, args.expert_count())
        check_expert_tensors(shapes, args.sparse_layers(), args.expert_count(), cls.ffn_name,
                             cls.expert_names, config_path)
        return shapes

    @classmethod
    def checkpoint_tensors(cls, name: str, tensor: torch.Tensor):
        """(name, tensor) pairs under our names for one checkpoint tensor."""
        return split_fused(name, tensor, cls.ffn_name, cls.expert_names)


def run_routed(experts: list, flat: torch.Tensor, chosen: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """sum_k weights[t, k] * experts[chosen[t, k]](flat[t]) for every token t: the (token, expert) assignments
    sorted by expert, each expert run once on its contiguous group (run_groups), the outputs put back in
    [tokens, k] order, weighed and summed over k. `experts` are callables on rows, one per expert."""
    assignments = chosen.reshape(-1)                                # [tokens * k]
    order = torch.argsort(assignments, stable=True)                 # grouped by expert
    # One host sync per layer for the group sizes: the slices need them.
    counts = torch.bincount(assignments, minlength=len(experts)).tolist()
    grouped = flat.index_select(0, order // chosen.shape[-1])
    # Every expert runs, an empty group included: each then gets a (zero) gradient, as a fused expert tensor
    # would, and DDP/FSDP see every parameter used.
    out = run_groups(experts, grouped, counts)
    # Back in [tokens, k] order by the inverse permutation, then weighed (each term cast to the model dtype, as
    # transformers does) and summed over k. An index_add of the weighted rows gives the same sums but torch keeps
    # its [tokens * k, hidden] source for backward beside the expert outputs the weighing keeps.
    unsorted = out.index_select(0, torch.argsort(order)).view(*chosen.shape, -1)   # [tokens, k, hidden]
    return (unsorted * weights[..., None]).to(flat.dtype).sum(dim=1)


def run_groups(experts: list, grouped: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """The experts' outputs on their contiguous groups of rows, concatenated: experts[e](rows of group e).

    Where matmuls keep a compiled kernel per shape (bf16 / fp16 on the CPU: kernels/shape_buckets.py), a group
    size new at nearly every step would grow memory for hundreds of steps (measured ~90 MB a step on the MoE
    benchmark's shape): each group is padded with zero rows to a bucket size and the padding's outputs dropped
    (each row's output depends on that row alone).

    On CUDA, experts that are plain bias-free linears (no LoRA on them, not quantized) run as three grouped
    matmuls over their own weights (kernels/grouped_mm.py): one launch a projection instead of one per expert."""
    if use_triton(grouped) and _plain_experts(experts):
        gate_name, up_name, down_name = experts[0].names
        gate = grouped_linear(grouped, [getattr(e, gate_name).weight for e in experts], counts)
        up = grouped_linear(grouped, [getattr(e, up_name).weight for e in experts], counts)
        return grouped_linear(experts[0].act(gate, up), [getattr(e, down_name).weight for e in experts], counts)
    parts = grouped.split(counts)
    if not shape_keyed_kernels(grouped.device, grouped.dtype):
        return torch.cat([expert(part) for expert, part in zip(experts, parts)])
    outputs = []
    for expert, part, n in zip(experts, parts, counts):
        padded = F.pad(part, (0, 0, 0, bucket_length(n) - n)) if n else part
        outputs.append(expert(padded)[:n])
    return torch.cat(outputs)


def _plain_experts(experts: list) -> bool:
    return all(isinstance(e, Expert) for e in experts) and all(
        type(linear := getattr(e, name)) is nn.Linear and linear.bias is None for e in experts for name in e.names)


def dense_mlp(args) -> GatedMLP:
    return GatedMLP(args.hidden_size, args.intermediate_size, args.hidden_act, bias=False)


def load_balancing_loss(router_logits: list[torch.Tensor], num_experts: int, top_k: int,
                        attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Switch Transformer's auxiliary loss as transformers computes it for Mixtral and Qwen3-MoE: over all sparse
    layers' tokens (padding left out when `attention_mask` [batch, seq] is given), the fraction of assignments each
    expert gets times its mean routing probability, summed over experts, times the number of experts."""
    device = router_logits[0].device
    assigned = torch.zeros(num_experts, dtype=torch.float32, device=device)
    prob_sum = torch.zeros(num_experts, dtype=torch.float32, device=device)
    rows = torch.zeros((), dtype=torch.float32, device=device)
    keep = None if attention_mask is None else attention_mask.reshape(-1).to(device, torch.float32)
    for logits in router_logits:
        probs = F.softmax(logits, dim=-1)  # in the logits' dtype, as transformers does
        chosen = torch.topk(probs, top_k, dim=-1).indices.reshape(-1)
        counted = torch.ones_like(chosen, dtype=torch.float32) if keep is None else keep.repeat_interleave(top_k)
        assigned = assigned + torch.zeros_like(assigned).scatter_add(0, chosen, counted)
        probs = probs.float()
        prob_sum = prob_sum + (probs.sum(0) if keep is None else (probs * keep[:, None]).sum(0))
        rows = rows + (probs.shape[0] if keep is None else keep.sum())
    return torch.sum((assigned / rows) * (prob_sum / rows)) * num_experts


def collect_router_logits(model) -> list[torch.Tensor]:
    """The router logits of the last forward, one [tokens, experts] tensor per sparse layer, in layer order."""
    return [m.router_logits for m in model.modules() if isinstance(m, SparseMoE) and m.router_logits is not None]


# ---- checkpoint layouts ------------------------------------------------------------------------------------------
_FUSED = re.compile(r"^(model\.layers\.\d+)\.mlp\.experts\.(gate_up_proj|down_proj)$")


def fused_shapes(shapes: dict, ffn_name: str, names: tuple[str, str, str], num_experts: int) -> dict:
    """Header shapes with transformers' fused expert tensors replaced by the per-expert names they split into
    (each keeping its file), and Mixtral's in-memory `mlp.gate` renamed to `block_sparse_moe.gate`."""
    out = {}
    for name, (shape, file) in shapes.items():
        match = _FUSED.match(name)
        if match is None:
            out[_renamed_gate(name, ffn_name)] = (shape, file)
            continue
        if len(shape) != 3:
            raise CheckpointError(f"{file}: tensor '{name}' has shape {list(shape)}; a fused expert tensor is "
                                  "[experts, out, in]")
        if shape[0] != num_experts:
            raise CheckpointError(f"{file}: tensor '{name}' holds {shape[0]} experts but config.json says "
                                  f"{num_experts}")
        prefix, kind = f"{match[1]}.{ffn_name}.experts", match[2]
        for e in range(shape[0]):
            if kind == "gate_up_proj":
                half = (shape[1] // 2, shape[2])
                out[f"{prefix}.{e}.{names[0]}.weight"] = (half, file)
                out[f"{prefix}.{e}.{names[1]}.weight"] = (half, file)
            else:
                out[f"{prefix}.{e}.{names[2]}.weight"] = ((shape[1], shape[2]), file)
    return out


def split_fused(name: str, tensor: torch.Tensor, ffn_name: str, names: tuple[str, str, str]):
    """(name, tensor) pairs under our per-expert names for one checkpoint tensor (itself when not fused)."""
    match = _FUSED.match(name)
    if match is None:
        yield _renamed_gate(name, ffn_name), tensor
        return
    prefix = f"{match[1]}.{ffn_name}.experts"
    for e, weight in enumerate(tensor.unbind(0)):
        if match[2] == "gate_up_proj":
            gate, up = weight.chunk(2, dim=0)
            yield f"{prefix}.{e}.{names[0]}.weight", gate.contiguous()
            yield f"{prefix}.{e}.{names[1]}.weight", up.contiguous()
        else:
            yield f"{prefix}.{e}.{names[2]}.weight", weight.contiguous()


def _renamed_gate(name: str, ffn_name: str) -> str:
    if ffn_name != "mlp":
        return re.sub(r"^(model\.layers\.\d+)\.mlp\.gate\.weight$", rf"\1.{ffn_name}.gate.weight", name)
    return name


def check_expert_tensors(shapes: dict, sparse_layers: list[int], num_experts: int, ffn_name: str,
                         names: tuple[str, str, str], config_path) -> None:
    """Every sparse layer holds exactly experts 0..num_experts-1, each with its three projections, and no dense
    layer holds experts: otherwise a CheckpointError naming the tensor and its file (or, for a missing tensor, the
    file holding that layer's router). `shapes`: per-expert names (after `fused_shapes`)."""
    expert = re.compile(rf"^model\.layers\.(\d+)\.{re.escape(ffn_name)}\.experts\.(\d+)\.")
    sparse = set(sparse_layers)
    for name, (_, file) in shapes.items():
        match = expert.match(name)
        if match is None:
            continue
        layer, index = int(match[1]), int(match[2])
        if layer not in sparse:
            raise CheckpointError(f"{file}: tensor '{name}' is an expert of layer {layer}, which {config_path} "
                                  "makes a dense MLP layer (mlp_only_layers / decoder_sparse_step)")
        if index >= num_experts:
            raise CheckpointError(f"{file}: tensor '{name}' is expert {index}, but {config_path} says there are "
                                  f"{num_experts} experts")
    for layer in sorted(sparse):
        prefix = f"model.layers.{layer}.{ffn_name}"
        router = shapes.get(f"{prefix}.gate.weight")
        where = router[1] if router else "the checkpoint"
        for e in range(num_experts):
            for proj in names:
                needed = f"{prefix}.experts.{e}.{proj}.weight"
                if needed not in shapes:
                    raise CheckpointError(f"{where}: tensor '{needed}' is missing ({config_path} says layer "
                                          f"{layer} has {num_experts} experts)")
