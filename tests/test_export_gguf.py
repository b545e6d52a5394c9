"""GGUF export read back with gguf.GGUFReader: every tensor (de-quantized, Q/K permutation and Gemma's norm
shift undone) against our merged model, the metadata against its config, the vocabulary against its tokenizer,
for every architecture case; quant types within their rounding bound; bad input; the Ollama Modelfile."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

import velotune as vt
from export_fixtures import EXTRA_ROWS, LLAMA_CPP_FIT, load_with_lora, make_tokenized_checkpoint
from hf_reference import SHRUNK
from velotune.errors import CheckpointError, UnsupportedError

gguf = pytest.importorskip("gguf")

# Hugging Face module suffix -> llama.cpp tensor name, written out here so the test does not share the
# exporter's name map. The Gemma 2 sandwich norms have names of their own.
LAYER_NAMES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
               "self_attn.o_proj": "attn_output", "self_attn.qkv_proj": "attn_qkv", "mlp.gate_proj": "ffn_gate",
               "mlp.up_proj": "ffn_up", "mlp.gate_up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
               "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
               "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm"}
GEMMA2_NAMES = {"post_attention_layernorm": "post_attention_norm", "pre_feedforward_layernorm": "ffn_norm",
                "post_feedforward_layernorm": "post_ffw_norm"}
GLOBAL_NAMES = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}
GGUF_ARCH = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "gemma": "gemma",
             "gemma2": "gemma2", "phi3": "phi3"}


def read_gguf(path):
    reader = gguf.GGUFReader(str(path))
    fields = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    tensors = {t.name: (gguf.quants.dequantize(t.data, t.tensor_type).reshape(tuple(reversed(t.shape.tolist()))),
                        t.tensor_type.name) for t in reader.tensors}
    return fields, tensors


def gguf_name(hf_name: str, family: str) -> str:
    module, _, kind = hf_name.rpartition(".")
    if module in GLOBAL_NAMES:
        return f"{GLOBAL_NAMES[module]}.{kind}"
    _, _, layer, rest = module.split(".", 3)
    names = {**LAYER_NAMES, **(GEMMA2_NAMES if family == "gemma2" else {})}
    return f"blk.{layer}.{names[rest]}.{kind}"


def expected_tensors(model, family: str) -> dict[str, torch.Tensor]:
    """GGUF name -> the merged tensor in Hugging Face layout, computed here from W, A and B."""
    layers = vt.lora.lora_layers(model)
    out = {}
    for name, tensor in model.state_dict().items():
        if "lora_" in name or (name == "lm_head.weight" and model.args.tie_word_embeddings):
            continue
        owner = name.replace(".base_layer", "").rpartition(".")[0]
        if owner in layers and name.endswith("base_layer.weight"):
            layer = layers[owner]
            tensor = tensor.float() + layer.scaling * layer.lora_B.weight.float() @ layer.lora_A.weight.float()
        out[gguf_name(name.replace(".base_layer", ""), family)] = tensor.float()
    return out


def to_hf_layout(name: str, array: np.ndarray, model, family: str) -> torch.Tensor:
    """Undoes what llama.cpp's layout did: Q/K row permutation (Llama family), +1 on Gemma norms."""
    t = torch.from_numpy(np.array(array, dtype=np.float32))
    args = model.args
    if family in ("llama", "mistral") and (".attn_q." in name or ".attn_k." in name):
        heads = args.num_attention_heads if ".attn_q." in name else args.num_key_value_heads
        t = t.reshape(heads, -1, 2, *t.shape[1:]).transpose(1, 2).reshape(t.shape)
    if family.startswith("gemma") and name.endswith("norm.weight"):
        t = t - 1.0
    return t


def _case_model(tmp_path, case, **overrides):
    path, tok = make_tokenized_checkpoint(tmp_path, case, **{**LLAMA_CPP_FIT.get(case, ({},))[0], **overrides})
    model, _ = load_with_lora(path)
    return path, model, tok, case.split("_")[0]


@pytest.mark.parametrize("case", list(LLAMA_CPP_FIT))
def test_gguf_refuses_what_llama_cpp_cannot_represent(tmp_path, case):
    path, tok = make_tokenized_checkpoint(tmp_path, case)
    model, _ = load_with_lora(path)
    with pytest.raises(UnsupportedError, match=LLAMA_CPP_FIT[case][1]):
        vt.export(model, tok, tmp_path / "g", format="gguf")
    assert not (tmp_path / "g").exists()


@pytest.mark.parametrize("case", list(SHRUNK))
def test_gguf_f32_reads_back_to_our_tensors_and_config(tmp_path, case):
    path, model, tok, family = _case_model(tmp_path, case)
    out = vt.export(model, tok, tmp_path / "gguf", format="gguf", quant="f32")
    fields, tensors = read_gguf(out)
    expected = expected_tensors(model, family)
    rope_tensors = {n for n in tensors if n.startswith("rope_")}
    assert set(tensors) - rope_tensors == set(expected)
    for name, want in expected.items():
        got = to_hf_layout(name, tensors[name][0], model, family)
        assert tensors[name][1] == "F32" and torch.allclose(got, want, rtol=0, atol=2e-6 if
                                                          family.startswith("gemma") else 0), name
    _check_hparams(fields, model, family, case)
    _check_rope(fields, tensors, model, family)
    _check_vocab(fields, tok, model)


def _check_hparams(fields, model, family, case):
    a, arch = model.args, GGUF_ARCH[family]
    assert fields["general.architecture"] == arch and fields["general.file_type"] == 0
    want = {"context_length": a.max_position_embeddings, "embedding_length": a.hidden_size,
            "block_count": a.num_hidden_layers, "feed_forward_length": a.intermediate_size,
            "attention.head_count": a.num_attention_heads, "attention.head_count_kv": a.num_key_value_heads,
            "vocab_size": a.vocab_size, "rope.dimension_count": int(a.head_dim * a.partial_rotary_factor)}
    for key, value in want.items():
        assert fields[f"{arch}.{key}"] == value, key
    assert math.isclose(fields[f"{arch}.attention.layer_norm_rms_epsilon"], a.rms_norm_eps, rel_tol=1e-6)
    assert math.isclose(fields[f"{arch}.rope.freq_base"], a.rope_theta, rel_tol=1e-6)
    if a.head_dim != a.hidden_size // a.num_attention_heads:
        assert fields[f"{arch}.attention.key_length"] == fields[f"{arch}.attention.value_length"] == a.head_dim
    windows = [a.window_for_layer(i) is not None for i in range(a.num_hidden_layers)]
    if any(windows):
        assert fields[f"{arch}.attention.sliding_window"] == a.sliding_window
    if family == "gemma2":
        assert [bool(x) for x in fields["gemma2.attention.sliding_window_pattern"]] == windows
        for key in ("attn_logit_softcapping", "final_logit_softcapping"):
            assert math.isclose(fields[f"gemma2.{key}"], getattr(a, key) or 1e9, rel_tol=1e-6)


def _check_rope(fields, tensors, model, family):
    """RoPE scaling against transformers' own tables (the reference model's inv_freq)."""
    from hf_reference import make_hf_model
    arch, kind = GGUF_ARCH[family], (model.args.rope_scaling or {}).get("rope_type")
    if kind == "llama3":
        hf_inv = make_hf_model("llama").model.rotary_emb.inv_freq
        base = 1.0 / model.args.rope_theta ** (torch.arange(0, model.args.head_dim, 2).float() / model.args.head_dim)
        torch.testing.assert_close(base / torch.tensor(tensors["rope_freqs.weight"][0]), hf_inv)
    elif kind == "yarn":
        assert fields[f"{arch}.rope.scaling.type"] == "yarn"
        assert fields[f"{arch}.rope.scaling.factor"] == model.args.rope_scaling["factor"]
        assert fields[f"{arch}.rope.scaling.original_context_length"] == 64
    elif kind == "longrope":
        assert fields[f"{arch}.rope.scaling.type"] == "longrope"
        scale = model.args.max_position_embeddings / 12
        assert math.isclose(fields[f"{arch}.rope.scaling.attn_factor"],
                            math.sqrt(1 + math.log(scale) / math.log(12)), rel_tol=1e-6)
        for which in ("long", "short"):
            np.testing.assert_array_equal(tensors[f"rope_factors_{which}.weight"][0],
                                          np.float32(model.args.rope_scaling[f"{which}_factor"]))
    else:
        assert not any(n.startswith("rope_") for n in tensors) and f"{arch}.rope.scaling.type" not in fields


def _check_vocab(fields, tok, model):
    vocab = {i: t for t, i in tok.get_vocab().items()}
    assert fields["tokenizer.ggml.model"] == "gpt2" and fields["tokenizer.ggml.pre"] == "gpt-2"
    tokens = fields["tokenizer.ggml.tokens"]
    assert len(tokens) == model.args.vocab_size == len(tok) + EXTRA_ROWS
    assert tokens[:len(tok)] == [vocab[i] for i in range(len(tok))] and tokens[-1] == f"[PAD{len(tok) + 2}]"
    types = fields["tokenizer.ggml.token_type"]
    assert types[tok.convert_tokens_to_ids("<|im_end|>")] == gguf.TokenType.CONTROL
    assert types[tok.convert_tokens_to_ids("Ġthe")] == gguf.TokenType.NORMAL
    assert types[-1] == gguf.TokenType.UNUSED
    merges = json.loads(tok.backend_tokenizer.to_str())["model"]["merges"]
    assert fields["tokenizer.ggml.merges"] == [m if isinstance(m, str) else " ".join(m) for m in merges]
    assert (fields["tokenizer.ggml.bos_token_id"], fields["tokenizer.ggml.eos_token_id"],
            fields["tokenizer.ggml.padding_token_id"]) == (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id)
    assert fields["tokenizer.ggml.eot_token_id"] == tok.convert_tokens_to_ids("<|im_end|>")
    assert fields["tokenizer.ggml.add_bos_token"] is True and fields["tokenizer.ggml.add_eos_token"] is False
    assert fields["tokenizer.chat_template"] == tok.chat_template


# Largest rounding error of one element, as a fraction of its block's largest magnitude: one quantization
# step of a 2^bits-level grid over [-amax, amax] (round-to-nearest gives half a step; the clamped end of the
# symmetric types and the fp16 block scale stay within the other half).
QUANT_STEP = {"Q8_0": 2 / 255, "Q4_0": 2 / 15, "Q4_1": 2 / 15, "Q5_0": 2 / 31, "Q5_1": 2 / 31}


@pytest.fixture(scope="module")
def llama_model(tmp_path_factory):
    return _case_model(tmp_path_factory.mktemp("llama"), "llama")


@pytest.mark.parametrize("quant", ["f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1"])
def test_gguf_quant_types_read_back_within_their_rounding(tmp_path, llama_model, quant):
    _, model, tok, family = llama_model
    _, tensors = read_gguf(vt.export(model, tok, tmp_path / "g", format="gguf", quant=quant))
    for name, want in expected_tensors(model, family).items():
        data, kind = tensors[name]
        got = to_hf_layout(name, data, model, family)
        if want.dim() == 1:
            assert kind == "F32" and torch.equal(got, want), name
        elif want.shape[1] % 32 and quant not in ("f16", "bf16"):  # ffn_down rows (112) do not split in blocks
            assert kind == "F16" and torch.equal(got, want.half().float()), name
        elif quant in ("f16", "bf16"):
            assert kind == quant.upper()
            assert torch.equal(got, want.to(torch.float16 if quant == "f16" else torch.bfloat16).float()), name
        else:
            assert kind == quant.upper(), name
            amax = want.abs().reshape(want.shape[0], -1, 32).amax(-1, keepdim=True)
            err = (got - want).abs().reshape(want.shape[0], -1, 32)
            assert (err <= QUANT_STEP[kind] * amax + 1e-7).all(), f"{name}: {(err / amax).max():.3g}"


def test_spm_vocabulary_with_byte_tokens(tmp_path):
    from export_fixtures import make_spm_tokenizer
    path, tok = make_tokenized_checkpoint(tmp_path, "gemma_tied", tokenizer=make_spm_tokenizer())
    model, _ = load_with_lora(path)
    fields, _ = read_gguf(vt.export(model, tok, tmp_path / "g", format="gguf"))
    assert fields["tokenizer.ggml.model"] == "llama" and "tokenizer.ggml.merges" not in fields
    tokens, types = fields["tokenizer.ggml.tokens"], fields["tokenizer.ggml.token_type"]
    assert tokens[3:259] == [f"<0x{b:02X}>" for b in range(256)]
    assert set(types[3:259]) == {gguf.TokenType.BYTE}
    assert (types[0], types[1], types[2]) == (gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL)
    first = 259
    assert types[first] == gguf.TokenType.NORMAL and fields["tokenizer.ggml.scores"][first] == -first
    assert fields["tokenizer.ggml.add_space_prefix"] is True and fields["tokenizer.ggml.unknown_token_id"] == 0
    assert fields["tokenizer.ggml.add_bos_token"] is True


def test_spm_vocabulary_without_byte_tokens_is_refused(tmp_path):
    from export_fixtures import make_spm_tokenizer
    path, tok = make_tokenized_checkpoint(tmp_path, "llama_tied", tokenizer=make_spm_tokenizer(byte_tokens=False))
    model, _ = load_with_lora(path)
    with pytest.raises(UnsupportedError, match="lacks byte token"):
        vt.export(model, tok, tmp_path / "g", format="gguf")
    assert not (tmp_path / "g").exists()


def test_pre_tokenizer_names():
    from velotune.exporting.gguf_vocab import pre_tokenizer_name
    llama3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
              r"\s*[\r\n]+|\s+(?!\S)|\s+")
    split = {"type": "Sequence", "pretokenizers": [{"type": "Split", "pattern": {"Regex": llama3}},
                                                   {"type": "ByteLevel", "use_regex": False}]}
    assert pre_tokenizer_name({"pre_tokenizer": split}) == "llama-bpe"
    split["pretokenizers"][0]["pattern"]["Regex"] = llama3.replace(r"\p{N}{1,3}", r"\p{N}")
    assert pre_tokenizer_name({"pre_tokenizer": split}) == "qwen2"
    assert pre_tokenizer_name({"pre_tokenizer": {"type": "ByteLevel", "use_regex": True}}) == "gpt-2"
    assert pre_tokenizer_name({"pre_tokenizer": {"type": "Whitespace"}}) == "default"


def test_unknown_architecture_is_refused_with_the_supported_list(tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM

    from tiny_tokenizer import make_tokenizer
    tok = make_tokenizer()
    config = AutoConfig.for_model("gpt2", n_layer=1, n_embd=32, n_head=2, vocab_size=len(tok), n_positions=64)
    AutoModelForCausalLM.from_config(config).save_pretrained(str(tmp_path / "gpt2"))
    model, _ = vt.load(tmp_path / "gpt2", dtype="float32", device="cpu")
    with pytest.raises(UnsupportedError, match="'gpt2' is not supported; supported: llama, mistral, qwen2, qwen3, "
                                               "gemma, gemma2, phi3"):
        vt.export(model, tok, tmp_path / "g", format="gguf")
    assert not (tmp_path / "g").exists()


def test_quant_type_the_package_cannot_write_is_refused(tmp_path, llama_model):
    _, model, tok, _ = llama_model
    with pytest.raises(UnsupportedError, match="'q4_k_m'.*supported: f32, f16, bf16, q8_0, q4_0, q4_1, q5_0, q5_1"):
        vt.export(model, tok, tmp_path / "g", format="gguf", quant="q4_k_m")
    with pytest.raises(UnsupportedError, match="quant applies to format='gguf'"):
        vt.export(model, tok, tmp_path / "m", format="merged", quant="q8_0")
    assert not (tmp_path / "g").exists() and not (tmp_path / "m").exists()


def test_single_file_output_existing_paths_and_overwrite(tmp_path):
    _, model, tok, _ = _case_model(tmp_path, "phi3")
    target = tmp_path / "out" / "tuned.gguf"
    path = vt.export(model, tok, target, format="gguf", quant="q8_0")
    assert path == target and (tmp_path / "out" / "tuned.Modelfile").read_text().startswith("FROM ./tuned.gguf\n")
    before = target.read_bytes()
    with pytest.raises(CheckpointError, match="tuned.gguf: already exists"):
        vt.export(model, tok, target, format="gguf", quant="f16")
    assert target.read_bytes() == before
    (tmp_path / "out2").mkdir()
    (tmp_path / "out2" / "a.Modelfile").write_text("mine")
    with pytest.raises(CheckpointError, match="a.Modelfile: already exists"):
        vt.export(model, tok, tmp_path / "out2" / "a.gguf", format="gguf")
    assert not (tmp_path / "out2" / "a.gguf").exists()
    vt.export(model, tok, target, format="gguf", quant="f16", overwrite=True)
    assert read_gguf(target)[0]["general.file_type"] == gguf.LlamaFileType.MOSTLY_F16


def test_interrupted_gguf_write_leaves_no_file_under_the_final_name(tmp_path, monkeypatch):
    _, model, tok, _ = _case_model(tmp_path, "qwen2")
    target = tmp_path / "m.gguf"
    vt.export(model, tok, target, format="gguf", quant="f32")
    before = target.read_bytes()
    real_padding, calls = gguf.GGUFWriter.write_padding, []

    def failing_padding(self, fp, n, align=None):
        calls.append(n)
        if len(calls) == 5:  # header, metadata and some tensors are in the temporary file
            raise OSError("disk full")
        return real_padding(self, fp, n, align)

    monkeypatch.setattr(gguf.GGUFWriter, "write_padding", failing_padding)
    with pytest.raises(OSError, match="disk full"):
        vt.export(model, tok, target, format="gguf", quant="q8_0", overwrite=True)
    assert target.read_bytes() == before  # the old file, whole
    calls.clear()
    with pytest.raises(OSError, match="disk full"):
        vt.export(model, tok, tmp_path / "dir", format="gguf", quant="q8_0")
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "qwen2") == ["m.Modelfile", "m.gguf"]


@pytest.mark.parametrize("template_name, marker", [("chatml", "<|im_start|>{{ .Role }}"),
                                                    ("llama-3", "<|start_header_id|>{{ .Role }}<|end_header_id|>"),
                                                    ("gemma", "<start_of_turn>model\n"), ("phi-3", "<|{{ .Role }}|>"),
                                                    ("mistral", "[INST] {{ .Content }}[/INST]"),
                                                    ("alpaca", "### Instruction:\n{{ .Content }}\n\n")])
def test_modelfile_template_stops_and_sampling(tmp_path, template_name, marker):
    from velotune.data.templates import BUILTIN_TEMPLATES, END_OF_TURN
    path, tok = make_tokenized_checkpoint(tmp_path, "llama", chat_template=BUILTIN_TEMPLATES[template_name])
    (path / "generation_config.json").write_text(json.dumps(
        {"do_sample": True, "temperature": 0.6, "top_p": 0.9, "top_k": 20, "repetition_penalty": 1.1,
         "eos_token_id": [tok.eos_token_id, tok.convert_tokens_to_ids("<|eot_id|>")]}))
    model, _ = load_with_lora(path)
    out = vt.export(model, tok, tmp_path / "g", format="gguf", quant="q8_0")
    text = (out.parent / "Modelfile").read_text()
    lines = text.splitlines()
    assert lines[0] == "FROM ./model.gguf"
    assert f"# chat format: {template_name}" in lines and marker in text and "bos" not in text.lower()
    stops = [line for line in lines if line.startswith("PARAMETER stop")]
    want = ["<|eos|>", "<|eot_id|>"] + ([END_OF_TURN[template_name]] if END_OF_TURN[template_name] not in
                                        (None, "<|eot_id|>") else [])
    assert stops == [f'PARAMETER stop "{t}"' for t in want]
    for param in ("PARAMETER temperature 0.6", "PARAMETER top_p 0.9", "PARAMETER top_k 20",
                  "PARAMETER repeat_penalty 1.1"):
        assert param in lines
    fields, _ = read_gguf(out)
    assert math.isclose(fields["general.sampling.temp"], 0.6, rel_tol=1e-6)
    assert math.isclose(fields["general.sampling.top_p"], 0.9, rel_tol=1e-6)
    assert fields["general.sampling.top_k"] == 20
    assert math.isclose(fields["general.sampling.penalty_repeat"], 1.1, rel_tol=1e-6)


def test_cli_gguf_export_and_quant_refused_before_loading(tmp_path, capsys):
    from velotune.cli import main
    path, tok = make_tokenized_checkpoint(tmp_path, "qwen2")
    model, _ = load_with_lora(path)
    vt.save_adapter(model, tmp_path / "adapter")
    out = tmp_path / "gguf"
    args = ["export", str(path), "--adapter", str(tmp_path / "adapter"), "--format", "gguf", "--out", str(out)]
    assert main(args + ["--quant", "q4_k_m"]) == 2
    assert "supported: f32, f16" in capsys.readouterr().err and not out.exists()
    assert main(args + ["--quant", "q8_0"]) == 0
    assert {p.name for p in out.iterdir()} == {"model.gguf", "Modelfile", ".velotune-files.json"}
    fields, tensors = read_gguf(out / "model.gguf")
    assert fields["general.file_type"] == gguf.LlamaFileType.MOSTLY_Q8_0
    merged = expected_tensors(model, "qwen2")["blk.0.attn_q.weight"]
    assert (torch.tensor(tensors["blk.0.attn_q.weight"][0]) - merged).abs().max() <= merged.abs().max() / 127


def test_gguf_from_an_nf4_base_holds_the_dequantized_merge(tmp_path):
    from velotune.models.quantize import dequantize_weight, is_quantized_linear
    path, tok = make_tokenized_checkpoint(tmp_path, "qwen3")
    model, _ = load_with_lora(path, quantize="nf4")
    _, tensors = read_gguf(vt.export(model, tok, tmp_path / "g", format="gguf", quant="f32"))
    checked = 0
    for name, layer in vt.lora.lora_layers(model).items():
        if is_quantized_linear(layer.base_layer):
            want = dequantize_weight(layer.base_layer, torch.float32) + layer.delta_weight()
            got = torch.tensor(tensors[gguf_name(name + ".weight", "qwen3")][0])
            assert torch.equal(got, want), name
            checked += 1
    assert checked >= 10


def test_modelfile_leaves_an_unknown_template_to_ollama(tmp_path):
    from velotune.data.templates import ALPACA
    from velotune.exporting.modelfile import chat_format
    variant = ALPACA.replace("Below is an instruction", "Here is an instruction")  # alpaca-like, another preamble
    assert chat_format(variant) is None and chat_format(ALPACA, "</s>")[0] == "alpaca"
    path, tok = make_tokenized_checkpoint(tmp_path, "llama", chat_template=variant)
    model, _ = load_with_lora(path)
    text = (vt.export(model, tok, tmp_path / "g", format="gguf", quant="f16").parent / "Modelfile").read_text()
    assert "TEMPLATE" not in text and "Ollama derives the format from the GGUF's tokenizer.chat_template" in text
