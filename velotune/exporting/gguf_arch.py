"""What llama.cpp expects of each architecture family: its GGUF architecture, tensor names and transforms, and
the hyperparameter metadata (`{arch}.context_length`, `{arch}.rope.*`, `{arch}.attention.*`, ...).

Tensor names come from the gguf package's own map (`gguf.get_tensor_name_map`), metadata keys from its writer
methods, so nothing here spells a GGUF name by hand. Three transforms differ between families:

- Llama-family Q/K rows are permuted: llama.cpp's Llama rotates adjacent pairs (x0, x1), Hugging Face rotates
  the two halves of each head (x_i, x_{i+d/2}); reordering the rows of q_proj/k_proj makes the two agree.
  Qwen, Gemma and Phi-3 run llama.cpp's "neox" rotation, which is the halves convention: no permutation.
- Gemma stores RMSNorm weights as w - 1 (applied as 1 + w); llama.cpp applies plain w: add 1.
- llama.cpp's Gemma and Gemma 2 always take the output head from the token embeddings.

Gemma 3, OLMo 2, Granite, Mixtral, Qwen3-MoE and gpt-oss have hooks of their own in gguf_families.py (experts
stacked, per-family checks and keys).
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch

from ..errors import UnsupportedError
from .gguf_families import check_family, family_state, write_family_hparams

log = logging.getLogger("velotune")

# tanh(x / c) * c equals x to fp32 precision for any logit |x| < 1e3 when c = 1e9 (relative error ~ (x/c)^2 / 3).
NO_SOFTCAP = 1e9


@dataclass(frozen=True)
class ArchSpec:
    gguf_arch: str                    # member name of gguf.MODEL_ARCH
    permute_qk: bool = False          # Llama-family rotary convention (see above)
    norm_shift: float = 0.0           # added to every `*norm.weight`
    tied_only: bool = False           # llama.cpp has no separate output head for this family
    extra_biases: tuple = ()          # MODEL_TENSOR names whose bias llama.cpp reads, beyond q/k/v
    windows: str = "ignored"          # "per-layer": llama.cpp applies sliding windows per layer; else ignored
    free_head_dim: bool = True        # False: llama.cpp sizes attention by hidden_size (= heads * head_dim)
    needs_output: bool = False        # llama.cpp requires an output head: a tied one is written out


# Every family reads q/k/v biases (fused or not); these are what each reads besides.
_LLAMA_BIASES = ("ATTN_OUT", "FFN_GATE", "FFN_UP", "FFN_DOWN")

SPECS = {
    "llama": ArchSpec("LLAMA", permute_qk=True, extra_biases=_LLAMA_BIASES),
    "mistral": ArchSpec("LLAMA", permute_qk=True, extra_biases=_LLAMA_BIASES),  # llama.cpp runs Mistral as Llama
    "qwen2": ArchSpec("QWEN2", extra_biases=("OUTPUT",), free_head_dim=False),
    "qwen3": ArchSpec("QWEN3"),
    "gemma": ArchSpec("GEMMA", norm_shift=1.0, tied_only=True),
    "gemma2": ArchSpec("GEMMA2", norm_shift=1.0, tied_only=True, windows="per-layer"),
    "phi3": ArchSpec("PHI3", free_head_dim=False),
    # gguf_families.py: what is special about these
    "gemma3_text": ArchSpec("GEMMA3", norm_shift=1.0, windows="per-layer"),
    "olmo2": ArchSpec("OLMO2", free_head_dim=False, needs_output=True),
    "granite": ArchSpec("GRANITE", permute_qk=True, extra_biases=_LLAMA_BIASES),
    "mixtral": ArchSpec("LLAMA", permute_qk=True),  # llama.cpp runs Mixtral as Llama with stacked experts
    "qwen3_moe": ArchSpec("QWEN3MOE"),
    "gpt_oss": ArchSpec("GPT_OSS", windows="per-layer", needs_output=True,
                        extra_biases=("ATTN_OUT", "FFN_GATE_INP", "FFN_GATE_EXP", "FFN_UP_EXP", "FFN_DOWN_EXP")),
}
_QKV_KINDS = ("ATTN_Q", "ATTN_K", "ATTN_V", "ATTN_QKV")


def arch_spec(model) -> ArchSpec:
    model_type = model.model_type
    if model.path != "native" or model_type not in SPECS:
        raise UnsupportedError(f"GGUF export: model_type {model_type!r} is not supported; supported: "
                               f"{', '.join(SPECS)} (export format='merged' works for any model)")
    spec = SPECS[model_type]
    if spec.tied_only and not model.args.tie_word_embeddings:
        raise UnsupportedError(f"GGUF export: this {model_type} model has its own lm_head (tie_word_embeddings "
                               "is false), but llama.cpp's Gemma reads the output head from the token embeddings "
                               "and would silently drop it; export format='merged' instead")
    args = model.args
    if not spec.free_head_dim and args.num_attention_heads * args.head_dim != args.hidden_size:
        raise UnsupportedError(f"GGUF export: llama.cpp's {spec.gguf_arch.lower()} sizes attention by hidden_size "
                               f"({args.hidden_size}), but this model has {args.num_attention_heads} heads of "
                               f"head_dim {args.head_dim}; export format='merged' instead")
    check_family(model)
    return spec


def gguf_arch(spec: ArchSpec):
    import gguf
    return getattr(gguf.MODEL_ARCH, spec.gguf_arch)


# ---- tensors -----------------------------------------------------------------------------------

def llama_permute(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Rows of each head reordered from halves (HF) to interleaved pairs (llama.cpp's Llama rotation)."""
    head_dim = weight.shape[0] // n_heads
    return weight.reshape(n_heads, 2, head_dim // 2, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)


def gguf_tensors(model, state: dict, spec: ArchSpec) -> list[tuple[str, torch.Tensor]]:
    """(GGUF name, fp32 tensor) for every checkpoint tensor, transformed as llama.cpp expects, plus the RoPE
    factor tensors. Raises before anything is written if a tensor has no place in llama.cpp's architecture."""
    import gguf
    args = model.args
    names = gguf.get_tensor_name_map(gguf_arch(spec), args.num_hidden_layers)
    allowed_biases = {getattr(gguf.MODEL_TENSOR, k) for k in _QKV_KINDS + spec.extra_biases}
    out, unplaced = [], []
    for hf_name, tensor in family_state(model, state, spec).items():
        if hf_name == "lm_head.weight" and args.tie_word_embeddings and not spec.needs_output:
            continue
        found = names.get_type_and_name(hf_name, try_suffixes=(".weight", ".bias"))
        if found is None or (hf_name.endswith(".bias") and found[0] not in allowed_biases):
            unplaced.append(hf_name)
            continue
        out.append((found[1], _transform(hf_name, tensor.float(), args, spec)))
    if unplaced:
        raise UnsupportedError(f"GGUF export: llama.cpp's {spec.gguf_arch.lower()} architecture has no place for "
                               f"tensor(s) {', '.join(unplaced[:4])}{' ...' if len(unplaced) > 4 else ''}; "
                               "export format='merged' instead")
    return out + rope_tensors(model)


def _transform(hf_name: str, tensor: torch.Tensor, args, spec: ArchSpec) -> torch.Tensor:
    if spec.permute_qk and hf_name.endswith(("q_proj.weight", "q_proj.bias")):
        return llama_permute(tensor, args.num_attention_heads)
    if spec.permute_qk and hf_name.endswith(("k_proj.weight", "k_proj.bias")):
        return llama_permute(tensor, args.num_key_value_heads)
    if spec.norm_shift and hf_name.endswith("norm.weight"):
        return tensor + spec.norm_shift
    return tensor


def rope_tensors(model) -> list[tuple[str, torch.Tensor]]:
    """llama3 scaling as per-frequency divisors (`rope_freqs`); LongRoPE as its two factor lists."""
    import gguf
    rope = global_rope(model)
    name = gguf.TENSOR_NAMES
    if rope.kind == "llama3":  # llama.cpp divides each unscaled frequency by its factor
        unscaled = 1.0 / (rope.theta ** (torch.arange(0, rope.dim, 2, dtype=torch.int64).float() / rope.dim))
        return [(name[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight", unscaled / rope.inv_freq.float().cpu())]
    if rope.kind == "longrope":
        return [(name[gguf.MODEL_TENSOR.ROPE_FACTORS_LONG] + ".weight",
                 torch.tensor(rope.scaling["long_factor"], dtype=torch.float32)),
                (name[gguf.MODEL_TENSOR.ROPE_FACTORS_SHORT] + ".weight",
                 torch.tensor(rope.scaling["short_factor"], dtype=torch.float32))]
    return []


# ---- metadata ----------------------------------------------------------------------------------

def write_hparams(writer, model, spec: ArchSpec):
    """The `{arch}.*` hyperparameters llama.cpp reads for this family."""
    args = model.args
    writer.add_context_length(args.max_position_embeddings)
    writer.add_embedding_length(args.hidden_size)
    writer.add_block_count(args.num_hidden_layers)
    writer.add_feed_forward_length(args.intermediate_size)
    writer.add_head_count(args.num_attention_heads)
    writer.add_head_count_kv(args.num_key_value_heads)
    writer.add_layer_norm_rms_eps(args.rms_norm_eps)
    writer.add_vocab_size(args.vocab_size)
    if args.head_dim != args.hidden_size // args.num_attention_heads:  # llama.cpp assumes hidden / heads
        writer.add_key_length(args.head_dim)
        writer.add_value_length(args.head_dim)
    _write_rope(writer, model)
    _write_windows(writer, args, spec)
    if spec.gguf_arch == "GEMMA2":
        _write_gemma2(writer, args)
    write_family_hparams(writer, model)


def global_rope(model):
    """The rotary table of the `{arch}.rope.*` keys: Gemma 3's global layers' (its local ones have
    `rope.freq_base_swa`), else the model's only one."""
    rope = model.model.rotary_emb
    return getattr(rope, "full_attention", rope)


def _write_rope(writer, model):
    import gguf
    rope = global_rope(model)
    writer.add_rope_freq_base(float(rope.theta))
    writer.add_rope_dimension_count(rope.dim)
    scaling = rope.scaling
    if rope.kind == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(scaling["factor"]))
    elif rope.kind == "yarn":
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(float(scaling.get("factor") or rope.max_position_embeddings
                                             / scaling["original_max_position_embeddings"]))
        writer.add_rope_scaling_orig_ctx_len(int(scaling["original_max_position_embeddings"]))
        for key, add in (("beta_fast", writer.add_rope_scaling_yarn_beta_fast),
                         ("beta_slow", writer.add_rope_scaling_yarn_beta_slow),
                         ("attention_factor", writer.add_rope_scaling_yarn_attn_factor)):
            if scaling.get(key) is not None:
                add(float(scaling[key]))
        if scaling.get("truncate") is False:  # gpt-oss's configs: the ramp's ends unrounded
            log.warning("GGUF export: YaRN with truncate=false, but llama.cpp rounds the ramp's correction "
                        "dimensions down / up (truncate=true): its RoPE differs slightly from this model's "
                        "(llama.cpp's own converter writes the same file)")
    elif rope.kind == "longrope":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LONGROPE)
        writer.add_rope_scaling_attn_factors(float(rope.attention_scaling))
        writer.add_rope_scaling_orig_ctx_len(int(scaling["original_max_position_embeddings"]))
    elif rope.kind == "dynamic":
        log.warning("GGUF export: llama.cpp has no dynamic (NTK) RoPE scaling; the file runs unscaled RoPE, "
                    "the same as this model up to %d tokens", rope.max_position_embeddings)


def sliding_layers(args) -> list[bool]:
    return [args.window_for_layer(i) is not None for i in range(args.num_hidden_layers)]


def _write_windows(writer, args, spec: ArchSpec):
    pattern = sliding_layers(args)
    if spec.windows == "per-layer":  # one flag per layer: a missing key would mean llama.cpp's default pattern
        writer.add_sliding_window_pattern(pattern)
    if not any(pattern):
        if spec.gguf_arch == "PHI3":
            writer.add_sliding_window(0)  # the value llama.cpp's Phi-3 reads as "no window"
        return
    writer.add_sliding_window(int(args.sliding_window))
    if spec.windows != "per-layer":
        log.warning("GGUF export: the sliding window (%d tokens) is recorded, but llama.cpp's %s attends to "
                    "every earlier token: its outputs differ from this model's past %d tokens",
                    args.sliding_window, spec.gguf_arch.lower(), args.sliding_window)


def _write_gemma2(writer, args):
    # llama.cpp's Gemma 2 always soft-caps (50 / 30 when the key is missing): "no cap" becomes a cap too wide to bite.
    writer.add_attn_logit_softcapping(float(args.attn_logit_softcapping or NO_SOFTCAP))
    writer.add_final_logit_softcapping(float(args.final_logit_softcapping or NO_SOFTCAP))
    # llama.cpp derives the attention scale from the layer count: hidden/heads for its 27B layout, else head_dim.
    implied = args.hidden_size / args.num_attention_heads if args.num_hidden_layers == 46 else args.head_dim
    if not math.isclose(args.query_pre_attn_scalar, implied):
        log.warning("GGUF export: query_pre_attn_scalar=%s but llama.cpp's Gemma 2 will scale attention by "
                    "%s**-0.5 for this shape: its outputs will differ", args.query_pre_attn_scalar, implied)
