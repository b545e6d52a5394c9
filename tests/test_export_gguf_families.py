"""GGUF export of Gemma 3, OLMo 2, Granite, Mixtral, Qwen3-MoE and gpt-oss, read back with gguf.GGUFReader: every
tensor (experts stacked, gpt-oss's fused experts split, Q/K permutation and Gemma's norm shift undone) against our
merged LoRA model, the family's metadata under the key names llama.cpp reads, and the settings llama.cpp's graph
for the architecture cannot compute refused before anything is written. With llama-cpp-python installed, llama.cpp
loads each f32 file and its logits are compared with ours (skipped otherwise; `python tests/THIS_FILE.py` prints
the table).

Tiny checkpoints (hidden 64, 2-3 layers, 4 experts top-2) are saved by transformers from random weights, with the
byte-level BPE test tokenizer; norms, biases and routers are random so that a wrong convention shows.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import velotune as vt
from export_fixtures import EXTRA_ROWS, input_ids, load_with_lora, rel_err
from velotune.errors import UnsupportedError

gguf = pytest.importorskip("gguf")
pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")

BASE = dict(hidden_size=64, intermediate_size=112, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-6, tie_word_embeddings=False)
SLIDING, FULL = "sliding_attention", "full_attention"
# case -> (model_type, config overrides). Each is within what llama.cpp computes (see gguf_families.py).
CASES = {
    # local / global layers, two RoPE bases, linear scaling on the global ones, head_dim 24 != 64 / 4, final cap
    "gemma3": ("gemma3_text", dict(num_hidden_layers=3, head_dim=24, query_pre_attn_scalar=24, sliding_window=8,
                                   layer_types=[SLIDING, FULL, SLIDING], rope_theta=10000.0,
                                   rope_local_base_freq=100.0, rope_scaling={"rope_type": "linear", "factor": 4.0},
                                   final_logit_softcapping=30.0, tie_word_embeddings=True)),
    "olmo2": ("olmo2", dict()),
    "olmo2_tied": ("olmo2", dict(tie_word_embeddings=True)),   # llama.cpp's OLMo 2 needs an output head
    "granite": ("granite", dict(tie_word_embeddings=True, mlp_bias=True, embedding_multiplier=3.0,
                                attention_multiplier=1 / 16, residual_multiplier=0.4, logits_scaling=4.0,
                                initializer_range=0.1)),
    "mixtral": ("mixtral", dict(num_local_experts=4, num_experts_per_tok=2, head_dim=24, sliding_window=None)),
    "qwen3_moe": ("qwen3_moe", dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=48, head_dim=16,
                                    norm_topk_prob=True, tie_word_embeddings=True)),
    "gpt_oss": ("gpt_oss", dict(intermediate_size=40, head_dim=16, num_local_experts=4, num_experts_per_tok=2,
                                sliding_window=8, layer_types=[SLIDING, FULL],
                                rope_parameters=dict(rope_type="yarn", rope_theta=150000.0, factor=8.0,
                                                     beta_fast=32.0, beta_slow=1.0, truncate=False,
                                                     original_max_position_embeddings=32))),
}
GGUF_ARCH = {"gemma3_text": "gemma3", "olmo2": "olmo2", "granite": "granite", "mixtral": "llama",
             "qwen3_moe": "qwen3moe", "gpt_oss": "gpt-oss"}
# What llama.cpp cannot compute: case, overrides, the message the export is refused with.
REFUSED = [
    ("gemma3", dict(query_pre_attn_scalar=16), "query_pre_attn_scalar=16"),
    ("gemma3", dict(hidden_activation="gelu"), "tanh-approximated GELU"),
    ("gemma3", dict(rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}),
     "only linear scaling"),
    ("olmo2", dict(head_dim=24), "sizes attention by hidden_size"),
    ("qwen3_moe", dict(mlp_only_layers=[0]), r"layer\(s\) 0 have a dense MLP"),
    ("qwen3_moe", dict(decoder_sparse_step=2), r"layer\(s\) 0 have a dense MLP"),
    ("qwen3_moe", dict(norm_topk_prob=False), "always renormalises"),
    ("qwen3_moe", dict(attention_bias=True), "o_proj.bias"),
    ("gpt_oss", dict(swiglu_limit=1.5), "hard-codes 1.702 / 7.0"),
]

# Hugging Face module suffix -> llama.cpp tensor, written out here so that the test does not share the exporter's
# name map. post_attention_layernorm is the FFN's pre-norm in the pre-norm families, a post-norm in the others.
LAYER_NAMES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
               "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
               "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
               "pre_feedforward_layernorm": "ffn_norm", "post_feedforward_layernorm": "post_ffw_norm",
               "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm", "self_attn.sinks": "attn_sinks",
               "mlp.gate": "ffn_gate_inp", "block_sparse_moe.gate": "ffn_gate_inp", "mlp.router": "ffn_gate_inp",
               "mlp.experts.gate_proj": "ffn_gate_exps", "mlp.experts.up_proj": "ffn_up_exps",
               "mlp.experts.down_proj": "ffn_down_exps", "block_sparse_moe.experts.w1": "ffn_gate_exps",
               "block_sparse_moe.experts.w3": "ffn_up_exps", "block_sparse_moe.experts.w2": "ffn_down_exps"}
POST_NORM = ("gemma3_text", "olmo2", "gpt_oss")   # post_attention_layernorm -> post_attention_norm
GLOBAL_NAMES = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}


def make_case(tmp_path, case: str, **overrides):
    """(our model with random LoRA, tokenizer, model_type) from a transformers checkpoint of random weights."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from tiny_tokenizer import make_tokenizer
    model_type, extra = CASES[case]
    tok = make_tokenizer()
    ids = dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    config = AutoConfig.for_model(model_type, **{**BASE, "vocab_size": len(tok) + EXTRA_ROWS, **ids, **extra,
                                                 **overrides})
    torch.manual_seed(1234)
    hf = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="eager")
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.normal_(0.0 if model_type == "gemma3_text" else 1.0, 0.1)
            elif name.endswith(("mlp.gate.weight", "router.weight")) or (model_type == "gpt_oss"
                                                                         and "experts" in name):
                p.normal_(0.0, 0.3)  # decisive routing; gpt-oss experts large enough to reach the clamps
            elif p.dim() == 1 or name.endswith("sinks"):
                p.normal_(0.0, 0.05 if p.dim() else 1.0)
    path = tmp_path / case
    hf.save_pretrained(str(path))
    tok.save_pretrained(str(path))
    model, _ = load_with_lora(path)
    return model, tok, model_type


def read_gguf(path):
    reader = gguf.GGUFReader(str(path))
    fields = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    tensors = {t.name: (gguf.quants.dequantize(t.data, t.tensor_type).reshape(tuple(reversed(t.shape.tolist()))),
                        t.tensor_type.name) for t in reader.tensors}
    return fields, tensors


def expected_tensors(model, model_type: str) -> dict[str, torch.Tensor]:
    """llama.cpp tensor name -> our merged tensor in Hugging Face layout (experts [E, out, in], stacked here)."""
    from velotune.lora import merged_state_dict
    state = merged_state_dict(model, torch.float32)
    args, out, experts = model.args, {}, {}
    for name, tensor in state.items():
        if name == "lm_head.weight" and args.tie_word_embeddings:
            continue
        module, _, kind = name.rpartition(".")
        if kind == "sinks":
            module, kind = name, "weight"
        if module in GLOBAL_NAMES:
            out[f"{GLOBAL_NAMES[module]}.{kind}"] = tensor
            continue
        _, _, layer, rest = module.split(".", 3)
        parts = rest.split(".")
        if len(parts) == 4 and parts[-2].isdigit():            # per-expert Linear: stacked below
            experts.setdefault((layer, ".".join(parts[:2] + parts[3:])), {})[int(parts[2])] = tensor
            continue
        if model_type == "gpt_oss" and parts == ["mlp", "experts"]:  # fused parameters, no .weight
            _gpt_oss_experts(out, layer, kind, tensor)
            continue
        base = LAYER_NAMES[rest]
        if rest == "post_attention_layernorm" and model_type in POST_NORM:
            base = "post_attention_norm"
        out[f"blk.{layer}.{base}.{kind}"] = tensor
    for (layer, rest), by_index in experts.items():
        out[f"blk.{layer}.{LAYER_NAMES[rest]}.weight"] = torch.stack([by_index[e] for e in sorted(by_index)])
    if model_type in ("olmo2", "gpt_oss") and args.tie_word_embeddings:
        out["output.weight"] = state["model.embed_tokens.weight"]
    return out


def _gpt_oss_experts(out, layer, kind, tensor):
    """gpt-oss's fused experts: x @ gate_up_proj[e] gives gate (even columns) and up (odd); x @ down_proj[e]."""
    if kind == "gate_up_proj":
        out[f"blk.{layer}.ffn_gate_exps.weight"] = tensor[:, :, 0::2].transpose(1, 2)
        out[f"blk.{layer}.ffn_up_exps.weight"] = tensor[:, :, 1::2].transpose(1, 2)
    elif kind == "gate_up_proj_bias":
        out[f"blk.{layer}.ffn_gate_exps.bias"] = tensor[:, 0::2]
        out[f"blk.{layer}.ffn_up_exps.bias"] = tensor[:, 1::2]
    elif kind == "down_proj":
        out[f"blk.{layer}.ffn_down_exps.weight"] = tensor.transpose(1, 2)
    else:
        out[f"blk.{layer}.ffn_down_exps.bias"] = tensor


def to_hf_layout(name: str, array: np.ndarray, model, model_type: str) -> torch.Tensor:
    """Undoes llama.cpp's layout: the Q/K row permutation of its Llama rotation (Granite, Mixtral), Gemma's +1."""
    t = torch.from_numpy(np.array(array, dtype=np.float32))
    args = model.args
    if model_type in ("granite", "mixtral") and (".attn_q." in name or ".attn_k." in name):
        heads = args.num_attention_heads if ".attn_q." in name else args.num_key_value_heads
        t = t.reshape(heads, -1, 2, *t.shape[1:]).transpose(1, 2).reshape(t.shape)
    if model_type == "gemma3_text" and name.endswith("norm.weight"):
        t = t - 1.0
    return t


@pytest.mark.parametrize("case", list(CASES))
def test_f32_export_reads_back_to_our_tensors_and_config(tmp_path, case):
    model, tok, model_type = make_case(tmp_path, case)
    fields, tensors = read_gguf(vt.export(model, tok, tmp_path / "g", format="gguf", quant="f32"))
    expected = expected_tensors(model, model_type)
    assert set(tensors) == set(expected)
    atol = 2e-6 if model_type == "gemma3_text" else 0  # w - 1 + 1 rounds
    for name, want in expected.items():
        got = to_hf_layout(name, tensors[name][0], model, model_type)
        assert tensors[name][1] == "F32" and got.shape == want.shape, name
        assert torch.allclose(got, want, rtol=0, atol=atol), name
    _check_hparams(fields, model, model_type)


def _check_hparams(fields, model, model_type):
    a, arch = model.args, GGUF_ARCH[model_type]
    assert fields["general.architecture"] == arch and fields["general.file_type"] == 0
    want = {"context_length": a.max_position_embeddings, "embedding_length": a.hidden_size,
            "block_count": a.num_hidden_layers, "feed_forward_length": a.intermediate_size,
            "attention.head_count": a.num_attention_heads, "attention.head_count_kv": a.num_key_value_heads,
            "vocab_size": a.vocab_size, "rope.dimension_count": a.head_dim}
    if a.head_dim != a.hidden_size // a.num_attention_heads:
        want.update({"attention.key_length": a.head_dim, "attention.value_length": a.head_dim})
    if model_type in ("mixtral", "qwen3_moe", "gpt_oss"):
        want.update({"expert_count": a.expert_count(), "expert_used_count": a.num_experts_per_tok,
                     "expert_feed_forward_length": getattr(a, "moe_intermediate_size", a.intermediate_size)})
    windows = [a.window_for_layer(i) is not None for i in range(a.num_hidden_layers)]
    if any(windows):
        want["attention.sliding_window"] = a.sliding_window
    for key, value in want.items():
        assert fields[f"{arch}.{key}"] == value, key
    floats = {"attention.layer_norm_rms_epsilon": a.rms_norm_eps, "rope.freq_base": a.rope_theta}
    if model_type == "granite":
        floats.update({"embedding_scale": 3.0, "attention.scale": 1 / 16, "residual_scale": 0.4, "logit_scale": 4.0})
    if model_type == "gemma3_text":
        floats.update({"rope.freq_base_swa": 100.0, "final_logit_softcapping": 30.0, "rope.scaling.factor": 4.0})
        assert fields["gemma3.rope.scaling.type"] == "linear"
    if model_type == "gpt_oss":
        floats.update({"rope.scaling.factor": 8.0, "rope.scaling.yarn_beta_fast": 32.0,
                       "rope.scaling.yarn_beta_slow": 1.0})
        assert fields["gpt-oss.rope.scaling.type"] == "yarn"
        assert fields["gpt-oss.rope.scaling.original_context_length"] == 32
    for key, value in floats.items():
        assert math.isclose(fields[f"{arch}.{key}"], value, rel_tol=1e-6), key
    if model_type in ("gemma3_text", "gpt_oss"):  # one flag per layer: llama.cpp's default pattern differs
        assert [bool(x) for x in fields[f"{arch}.attention.sliding_window_pattern"]] == windows
    assert len(fields["tokenizer.ggml.tokens"]) == a.vocab_size


@pytest.mark.parametrize("case, overrides, message", REFUSED, ids=[f"{c}-{next(iter(o))}" for c, o, _ in REFUSED])
def test_what_llama_cpp_cannot_compute_is_refused(tmp_path, case, overrides, message):
    model, tok, _ = make_case(tmp_path, case, **overrides)
    with pytest.raises(UnsupportedError, match=message):
        vt.export(model, tok, tmp_path / "g", format="gguf")
    assert not (tmp_path / "g").exists()


def test_q8_0_experts_quantize_per_row_block(tmp_path):
    """Stacked 3-D expert tensors go through gguf's quantizer like matrices: within one Q8_0 step of each
    32-wide block's largest magnitude; rows that do not split into blocks (down, 48 wide) fall back to F16."""
    model, tok, model_type = make_case(tmp_path, "qwen3_moe")
    _, tensors = read_gguf(vt.export(model, tok, tmp_path / "g", format="gguf", quant="q8_0"))
    want = expected_tensors(model, model_type)
    data, kind = tensors["blk.1.ffn_gate_exps.weight"]
    assert kind == "Q8_0"
    got, ref = torch.from_numpy(np.array(data, dtype=np.float32)), want["blk.1.ffn_gate_exps.weight"]
    amax = ref.abs().reshape(*ref.shape[:2], -1, 32).amax(-1, keepdim=True)
    assert ((got - ref).abs().reshape(*ref.shape[:2], -1, 32) <= 2 / 255 * amax + 1e-7).all()
    assert tensors["blk.1.ffn_gate_inp.weight"][1] == "F32"  # routers stay F32, as llama.cpp's converter keeps them
    data, kind = tensors["blk.1.ffn_down_exps.weight"]
    assert kind == "F16"
    assert torch.equal(torch.from_numpy(np.array(data, dtype=np.float32)),
                       want["blk.1.ffn_down_exps.weight"].half().float())


def test_gpt_oss_biases_stay_f32_and_truncate_false_is_flagged(tmp_path, caplog):
    """gpt-oss's expert biases are 2-D, yet stay F32 (ggml adds only F32 tensors); its configs' YaRN
    truncate=false, which llama.cpp cannot follow, is logged."""
    model, tok, _ = make_case(tmp_path, "gpt_oss")
    with caplog.at_level("WARNING", logger="velotune"):
        _, tensors = read_gguf(vt.export(model, tok, tmp_path / "g", format="gguf", quant="q8_0"))
    assert "truncate=false" in caplog.text
    for name in ("ffn_gate_exps.bias", "ffn_up_exps.bias", "ffn_down_exps.bias", "ffn_gate_inp.bias",
                 "attn_output.bias", "attn_sinks.weight", "ffn_gate_inp.weight"):
        assert tensors[f"blk.0.{name}"][1] == "F32", name
    assert tensors["blk.0.ffn_up_exps.weight"][1] == "Q8_0"


# ---- end to end: llama.cpp's logits ----------------------------------------------------------------------------

# f32 files: llama.cpp's own arithmetic (Gemma 3's tanh-GELU runs through ggml's fp16 table: a looser bound).
LLAMA_CPP_BOUND = {"gemma3": 1e-3}
# llama.cpp always rounds YaRN's correction dimensions (truncate=true); with gpt-oss's truncate=false it measured
# 5.2e-3 on this config. The check runs the truncating variant, which llama.cpp represents exactly.
LLAMA_CPP_OVERRIDES = {"gpt_oss": dict(rope_parameters={**CASES["gpt_oss"][1]["rope_parameters"], "truncate": True})}
# Longer than the windows (8) of Gemma 3 and gpt-oss, whose llama.cpp graphs apply them per layer; the MoE cases
# above have no window (llama.cpp's Llama and qwen3moe would attend past it).
SEQ_LEN = 19


def llama_cpp_error(tmp_path, case: str, quant: str = "f32") -> float:
    from llama_cpp import Llama
    model, tok, _ = make_case(tmp_path, case, **LLAMA_CPP_OVERRIDES.get(case, {}))
    ids = input_ids(len(tok), length=SEQ_LEN, batch=1)
    with torch.no_grad():
        ours = model(ids).logits[0]
    out = vt.export(model, tok, tmp_path / f"{case}.gguf", format="gguf", quant=quant)
    llm = Llama(model_path=str(out), n_ctx=64, n_batch=64, logits_all=True, verbose=False, n_threads=1,
                type_k=0, type_v=0, flash_attn=False)  # GGML type 0 = F32 KV cache
    llm.eval(ids[0].tolist())
    theirs = torch.from_numpy(np.array(llm.scores[:SEQ_LEN], dtype=np.float64))
    return rel_err(theirs, ours)


@pytest.mark.llamacpp
@pytest.mark.parametrize("case", list(CASES))
def test_llama_cpp_logits_match_ours(tmp_path, case):
    pytest.importorskip("llama_cpp")
    err = llama_cpp_error(tmp_path, case)
    bound = LLAMA_CPP_BOUND.get(case, 1e-5)
    assert err <= bound, f"{case}: llama.cpp's logits differ from ours by {err:.2e} (bound {bound:.0e})"


if __name__ == "__main__":
    import logging
    import os
    import sys
    import tempfile
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    logging.disable(logging.WARNING)
    torch.set_num_threads(1)
    quants = sys.argv[1:] or ["f32", "q8_0"]
    print(f"{'case':12}" + "".join(f"{q:>10}" for q in quants))
    for name in CASES:
        errs = []
        for q in quants:
            with tempfile.TemporaryDirectory() as tmp:
                errs.append(llama_cpp_error(Path(tmp), name, q))
        print(f"{name:12}" + "".join(f"{e:10.2e}" for e in errs))
