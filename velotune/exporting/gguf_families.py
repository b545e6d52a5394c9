"""GGUF export of the families beyond the Llama/Qwen/Gemma/Phi-3 core: Gemma 3, OLMo 2, Granite, the mixtures of
experts (Mixtral as llama.cpp's llama, Qwen3-MoE as qwen3moe) and gpt-oss. gguf_arch.py holds their ArchSpec
entries and calls the three hooks here: `check_family` (refuse what llama.cpp's graph for the architecture cannot
compute, before anything is written), `family_state` (the state dict reshaped into the tensors llama.cpp reads) and
`write_family_hparams` (the family's own `{arch}.*` keys).

What is special, per family (checked against llama.cpp's own graph for each architecture):

- experts: we hold one nn.Linear per expert; llama.cpp reads one 3-D tensor per projection and layer,
  `ffn_{gate,up,down}_exps` = torch [experts, out, in] (GGUF dims reversed: {in, out, experts}). They are stacked
  in expert order under the per-layer name gguf's map knows (`...experts.gate_proj` / Mixtral's `...experts.w1`).
  llama.cpp's qwen3moe has experts in every layer and always renormalises the top-k weights: a dense layer
  (mlp_only_layers, decoder_sparse_step) or norm_topk_prob=false is refused.
- gpt-oss: the fused expert tensors are split (gate = the even columns of gate_up_proj, up = the odd ones) and
  transposed to [experts, out, in]; the biases come along, as do the router's bias and each head's attention sink.
  llama.cpp hard-codes the clamped SwiGLU's alpha 1.702 and limit 7.0 and always reads an output head and an
  o_proj bias: other constants are refused; a tied head or a missing o_proj bias is written out (a copy of the
  embeddings; zeros), which computes the same.
- Gemma 3: local layers rotate with `rope.freq_base_swa` and no scaling; only linear scaling on the global
  layers (what llama.cpp's Gemma 3 applies); attention scaled by head_dim**-0.5 (hidden/heads for the 62-layer
  27B), so another query_pre_attn_scalar is refused; the MLP runs tanh-GELU.
- OLMo 2 always reads an output head (a tied model writes the embeddings as it).
- Granite: its four multipliers as `{arch}.embedding_scale` / `attention.scale` / `residual_scale` /
  `logit_scale` (llama.cpp divides the logits by the last, as transformers does).
"""
from __future__ import annotations

import math
import re

import torch

from ..errors import UnsupportedError

# model_type -> how its experts are named in our state dict: (module holding `experts`, projection names)
_EXPERT_LAYOUT = {"mixtral": "block_sparse_moe", "qwen3_moe": "mlp"}
_PER_EXPERT = re.compile(r"^(model\.layers\.\d+\.(?:mlp|block_sparse_moe)\.experts)\.(\d+)\.(\w+)\.weight$")
GPT_OSS_ALPHA, GPT_OSS_LIMIT = 1.702, 7.0   # llama.cpp's constants for the clamped SwiGLU
GEMMA3_TANH_GELU = ("gelu_pytorch_tanh", "gelu_new", "gelu_fast")


def _refuse(model_type: str, why: str):
    raise UnsupportedError(f"GGUF export: {why}; llama.cpp cannot run this {model_type} model as it is, "
                           "export format='merged' instead")


def check_family(model) -> None:
    """Refuses a model whose family-specific settings llama.cpp's graph would silently compute otherwise."""
    args, model_type = model.args, model.model_type
    if model_type == "qwen3_moe":
        dense = [i for i in range(args.num_hidden_layers) if args.has_dense_mlp(i)]
        if dense:
            _refuse(model_type, f"layer(s) {', '.join(map(str, dense[:4]))} have a dense MLP (mlp_only_layers / "
                                "decoder_sparse_step / num_experts 0), but llama.cpp's qwen3moe has experts in "
                                "every layer")
        if not args.norm_topk_prob:
            _refuse(model_type, "norm_topk_prob is false, but llama.cpp's qwen3moe always renormalises the "
                                "top-k routing weights")
    elif model_type == "gpt_oss":
        if not (math.isclose(args.swiglu_alpha, GPT_OSS_ALPHA, rel_tol=1e-6)
                and math.isclose(args.swiglu_limit, GPT_OSS_LIMIT, rel_tol=1e-6)):
            _refuse(model_type, f"swiglu_alpha={args.swiglu_alpha} / swiglu_limit={args.swiglu_limit}, but "
                                f"llama.cpp's gpt-oss hard-codes {GPT_OSS_ALPHA} / {GPT_OSS_LIMIT}")
    elif model_type == "gemma3_text":
        _check_gemma3(model)


def _check_gemma3(model):
    args = model.args
    implied = (args.hidden_size / args.num_attention_heads if args.num_hidden_layers == 62 else args.head_dim)
    if not math.isclose(args.query_pre_attn_scalar, implied):
        _refuse("gemma3_text", f"query_pre_attn_scalar={args.query_pre_attn_scalar}, but llama.cpp's Gemma 3 "
                               f"scales attention by {implied:g}**-0.5 for this shape")
    kind = (args.rope_scaling or {}).get("rope_type", "default")
    if kind not in ("default", "linear"):
        _refuse("gemma3_text", f"the global layers' RoPE scaling is {kind!r}; llama.cpp's Gemma 3 applies only "
                               "linear scaling")
    if args.local_rope_scaling:
        _refuse("gemma3_text", "the local (sliding) layers have a RoPE scaling; llama.cpp's Gemma 3 rotates them "
                               "unscaled")
    if args.hidden_activation not in GEMMA3_TANH_GELU:
        _refuse("gemma3_text", f"hidden_activation is {args.hidden_activation!r}; llama.cpp's Gemma 3 runs the "
                               "tanh-approximated GELU")


# ---- tensors -------------------------------------------------------------------------------------------------

def family_state(model, state: dict, spec) -> dict:
    """The state dict in the layout llama.cpp reads for this family: experts stacked (or gpt-oss's split), an
    output head written where llama.cpp requires one. Names stay Hugging Face's, for gguf's name map."""
    model_type, args = model.model_type, model.args
    if model_type in _EXPERT_LAYOUT:
        state = stack_experts(state, args.expert_count())
    elif model_type == "gpt_oss":
        state = gpt_oss_state(state, args)
    if spec.needs_output and args.tie_word_embeddings:
        state = {**state, "lm_head.weight": state["model.embed_tokens.weight"]}
    return state


def stack_experts(state: dict, num_experts: int) -> dict:
    """Per-expert `...experts.E.proj.weight` [out, in] -> `...experts.proj.weight` [experts, out, in], placed
    where expert 0 was (the file keeps the layer order)."""
    groups: dict[str, dict[int, torch.Tensor]] = {}
    out = {}
    for name, tensor in state.items():
        match = _PER_EXPERT.match(name)
        if match is None:
            out[name] = tensor
            continue
        stacked = f"{match[1]}.{match[3]}.weight"
        if stacked not in groups:
            groups[stacked] = {}
            out[stacked] = None  # a placeholder keeps the position
        groups[stacked][int(match[2])] = tensor
    for stacked, experts in groups.items():
        if sorted(experts) != list(range(num_experts)):  # the loader checked the checkpoint: this is a bug guard
            raise UnsupportedError(f"GGUF export: '{stacked}' has experts {sorted(experts)}, expected "
                                   f"0..{num_experts - 1}")
        out[stacked] = torch.stack([experts[e] for e in range(num_experts)])
    return out


def gpt_oss_state(state: dict, args) -> dict:
    """gpt-oss's fused, transposed, interleaved experts as llama.cpp's [experts, out, in] gate / up / down (and
    [experts, out] biases); the attention sinks as `...sinks.weight`; a zero o_proj bias where there is none."""
    out = {}
    for name, tensor in state.items():
        prefix, _, kind = name.rpartition(".")
        if kind == "gate_up_proj":        # [E, hidden, 2I], gate / up interleaved
            out[f"{prefix}.gate_proj.weight"] = tensor[..., 0::2].transpose(1, 2).contiguous()
            out[f"{prefix}.up_proj.weight"] = tensor[..., 1::2].transpose(1, 2).contiguous()
        elif kind == "gate_up_proj_bias":  # [E, 2I]
            out[f"{prefix}.gate_proj.bias"] = tensor[..., 0::2].contiguous()
            out[f"{prefix}.up_proj.bias"] = tensor[..., 1::2].contiguous()
        elif kind == "down_proj" and prefix.endswith(".experts"):  # [E, I, hidden]
            out[f"{prefix}.down_proj.weight"] = tensor.transpose(1, 2).contiguous()
        elif kind == "down_proj_bias":
            out[f"{prefix}.down_proj.bias"] = tensor
        elif kind == "sinks":
            out[f"{name}.weight"] = tensor
        else:
            out[name] = tensor
        if name.endswith("self_attn.o_proj.weight") and f"{prefix}.bias" not in state:
            out[f"{prefix}.bias"] = tensor.new_zeros(tensor.shape[0])
    return out


# ---- metadata ------------------------------------------------------------------------------------------------

def write_family_hparams(writer, model) -> None:
    """The `{arch}.*` keys this family adds to the common ones (gguf_arch.write_hparams)."""
    args, model_type = model.args, model.model_type
    if model_type in _EXPERT_LAYOUT or model_type == "gpt_oss":
        writer.add_expert_count(args.expert_count())
        writer.add_expert_used_count(args.num_experts_per_tok)
        width = args.moe_intermediate_size if model_type == "qwen3_moe" else args.intermediate_size
        writer.add_expert_feed_forward_length(width)
    if model_type == "gpt_oss" and not any(args.window_for_layer(i) for i in range(args.num_hidden_layers)):
        writer.add_sliding_window(0)  # llama.cpp's gpt-oss requires the key; the per-layer flags are all off
    if model_type == "granite":
        writer.add_embedding_scale(float(args.embedding_multiplier))
        writer.add_attention_scale(float(args.attention_multiplier))
        writer.add_residual_scale(float(args.residual_multiplier))
        writer.add_logit_scale(float(args.logits_scaling))
    elif model_type == "gemma3_text":
        writer.add_rope_freq_base_swa(float(args.rope_local_base_freq))
        if args.final_logit_softcapping:  # llama.cpp's Gemma 3 reads 0 / no key as "no cap"
            writer.add_final_logit_softcapping(float(args.final_logit_softcapping))
