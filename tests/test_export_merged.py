"""Merged export: transformers loads the export and computes the same logits as our LoRA model, for every
architecture case; bf16 within the measured bf16 error; an NF4 base merged once in fp32; the live model
untouched; side files, sharding, overwrite and interruption; the adapter format; the CLI."""
from __future__ import annotations

import copy
import json

import pytest
import torch

import velotune as vt
from export_fixtures import (input_ids, load_with_lora, make_tokenized_checkpoint, rel_err, same_state,
                             snapshot)
from hf_reference import SHRUNK
from velotune.errors import CheckpointError, UnsupportedError
from velotune.models.checkpoint import MANIFEST_NAME

FP32_BOUND = 1e-5
# bf16: the export computing in bf16 may be at most twice as far from the fp64 answer as our own model computing
# in bf16 (both round weights and activations to 8 bits of mantissa; the export also rounds W + BA once more).
BF16_FACTOR = 2.0


def _hf_logits(path, ids, dtype):
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, attn_implementation="eager").eval()
    with torch.no_grad():
        return model(input_ids=ids).logits, model


@pytest.mark.parametrize("case", list(SHRUNK))
def test_merged_export_reloads_in_transformers_with_same_logits(tmp_path, case):
    path, tok = make_tokenized_checkpoint(tmp_path, case)
    model, _ = load_with_lora(path)
    ids = input_ids(len(tok))
    before = snapshot(model)
    with torch.no_grad():
        ours = model(ids).logits

    out32 = vt.export(model, tok, tmp_path / "fp32", format="merged", dtype="float32")
    hf32, hf_model = _hf_logits(out32, ids, torch.float32)
    err32 = rel_err(hf32, ours)
    assert err32 <= FP32_BOUND, f"{case}: fp32 export differs from the LoRA model by {err32:.2e}"

    # fp64 reference: the fp32 export computed in fp64 (its weights differ from W + BA by fp32 rounding only).
    with torch.no_grad():
        ref64 = hf_model.double()(input_ids=ids).logits
        ours16 = copy.deepcopy(model).to(torch.bfloat16)(ids).logits
    out16 = vt.export(model, tok, tmp_path / "bf16", format="merged", dtype="bfloat16")
    hf16, _ = _hf_logits(out16, ids, torch.bfloat16)
    err16, ours_err16 = rel_err(hf16, ref64), rel_err(ours16, ref64)
    assert err16 <= BF16_FACTOR * ours_err16, (
        f"{case}: bf16 export error {err16:.2e} vs our bf16 model's {ours_err16:.2e}")
    assert same_state(model, before) and not any(m.merged for m in vt.lora.lora_layers(model).values())

    config = json.loads((out16 / "config.json").read_text())
    assert config.get("dtype", config.get("torch_dtype")) == "bfloat16"
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"):
        assert (out16 / name).is_file(), name
    print(f"\n{case:20s} fp32 rel err {err32:.2e}   bf16 export {err16:.2e} (our bf16 model {ours_err16:.2e})")


def test_nf4_base_is_dequantized_in_fp32_and_merged_once(tmp_path):
    from safetensors.torch import load_file

    from velotune.models.quantize import dequantize_weight, is_quantized_linear
    path, tok = make_tokenized_checkpoint(tmp_path, "llama")
    model, _ = load_with_lora(path, quantize="nf4")
    layers = vt.lora.lora_layers(model)
    quantized = {n: m for n, m in layers.items() if is_quantized_linear(m.base_layer)}
    assert len(quantized) >= 10  # q/k/v/o/gate/up of 2 layers (down_proj is kept: see quantize.nf4_supported)
    ids = input_ids(len(tok))
    with torch.no_grad():
        ours = model(ids).logits
    out = vt.export(model, tok, tmp_path / "merged", format="merged", dtype="float32")
    weights = load_file(str(out / "model.safetensors"))
    for name, layer in quantized.items():
        expected = dequantize_weight(layer.base_layer, torch.float32) + layer.delta_weight()
        assert torch.equal(weights[f"{name}.weight"], expected), name
        # never re-quantized: an NF4 block of 64 holds at most 16 distinct values, the merged rows far more
        assert weights[f"{name}.weight"][0, :64].unique().numel() > 16
    assert all(is_quantized_linear(m.base_layer) for m in quantized.values())  # the live model stays NF4
    hf, _ = _hf_logits(out, ids, torch.float32)
    assert rel_err(hf, ours) <= FP32_BOUND


def test_sharded_export_writes_an_index_that_transformers_reads(tmp_path):
    path, tok = make_tokenized_checkpoint(tmp_path, "qwen2")
    model, _ = load_with_lora(path)
    ids = input_ids(len(tok))
    with torch.no_grad():
        ours = model(ids).logits
    out = vt.export(model, tok, tmp_path / "sharded", format="merged", dtype="float32", max_shard_bytes=60_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 3 and all((out / s).is_file() for s in shards)
    assert not (out / "model.safetensors").exists()
    hf, _ = _hf_logits(out, ids, torch.float32)
    assert rel_err(hf, ours) <= FP32_BOUND


@pytest.mark.parametrize("variant", [dict(dora=True), dict(rslora=True, targets=["q_proj", "v_proj", "down_proj"])])
def test_dora_and_rslora_adapters_merge_exactly(tmp_path, variant):
    path, tok = make_tokenized_checkpoint(tmp_path, "gemma2")
    model, _ = load_with_lora(path, **variant)
    ids = input_ids(len(tok))
    with torch.no_grad():
        ours = model(ids).logits
    hf, _ = _hf_logits(vt.export(model, tok, tmp_path / "m", format="merged", dtype="float32"), ids, torch.float32)
    assert rel_err(hf, ours) <= FP32_BOUND


def test_without_a_tokenizer_object_the_source_tokenizer_files_are_copied(tmp_path):
    path, tok = make_tokenized_checkpoint(tmp_path, "phi3")
    model, _ = load_with_lora(path)
    out = vt.export(model, None, tmp_path / "m", format="merged")
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        assert (out / name).read_bytes() == (path / name).read_bytes(), name
    assert json.loads((out / "config.json").read_text()).get("dtype") == "float32"


def test_generation_config_copied_or_written_with_end_of_turn_ids(tmp_path):
    path, tok = make_tokenized_checkpoint(tmp_path, "llama")
    model, _ = load_with_lora(path)
    (path / "generation_config.json").unlink()  # transformers wrote one: first export without
    written = vt.export(model, tok, tmp_path / "a", format="merged")
    config = json.loads((written / "generation_config.json").read_text())
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert config["eos_token_id"] == [tok.eos_token_id, im_end]
    assert config["bos_token_id"] == tok.bos_token_id and config["pad_token_id"] == tok.pad_token_id

    source = {"do_sample": True, "temperature": 0.3, "eos_token_id": [1, 5]}
    (path / "generation_config.json").write_text(json.dumps(source))
    copied = vt.export(model, tok, tmp_path / "b", format="merged")
    assert json.loads((copied / "generation_config.json").read_text()) == source


def test_existing_output_is_refused_unless_overwrite(tmp_path):
    path, tok = make_tokenized_checkpoint(tmp_path, "llama")
    model, _ = load_with_lora(path)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(CheckpointError, match="already exists"):
        vt.export(model, tok, out, format="merged")
    assert (out / "keep.txt").read_text() == "x"
    vt.export(model, tok, out, format="merged", overwrite=True)  # replaces what velotune wrote, keeps the rest
    assert (out / "model.safetensors").is_file() and (out / "keep.txt").read_text() == "x"


def test_interrupted_merged_export_leaves_nothing_under_the_final_name(tmp_path, monkeypatch):
    import safetensors.torch
    path, tok = make_tokenized_checkpoint(tmp_path, "llama")
    model, _ = load_with_lora(path)
    real_save, calls = safetensors.torch.save_file, []

    def failing_save(tensors, filename, metadata=None):
        calls.append(filename)
        if len(calls) == 2:  # the first shard is on disk, the second is being written
            raise KeyboardInterrupt
        return real_save(tensors, filename, metadata=metadata)

    monkeypatch.setattr(safetensors.torch, "save_file", failing_save)
    with pytest.raises(KeyboardInterrupt):
        vt.export(model, tok, tmp_path / "out", format="merged", max_shard_bytes=60_000)
    assert len(calls) == 2
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_adapter_format_writes_a_peft_adapter(tmp_path):
    path, tok = make_tokenized_checkpoint(tmp_path, "qwen3")
    model, _ = load_with_lora(path)
    ids = input_ids(len(tok))
    out = vt.export(model, tok, tmp_path / "adapter", format="adapter")
    assert {p.name for p in out.iterdir()} == {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json",
                                               "tokenizer_config.json", "chat_template.jinja", MANIFEST_NAME}
    assert (out / "chat_template.jinja").read_text() == tok.chat_template
    fresh, _ = vt.load(path, dtype="float32", device="cpu")
    vt.load_adapter(fresh, out)
    with torch.no_grad():
        assert torch.equal(fresh(ids).logits, model(ids).logits)
    plain, _ = vt.load(path, dtype="float32", device="cpu")
    with pytest.raises(UnsupportedError, match="no LoRA adapters"):
        vt.export(plain, tok, tmp_path / "none", format="adapter")
    with pytest.raises(UnsupportedError, match="supported: merged, adapter, gguf"):
        vt.export(model, tok, tmp_path / "x", format="onnx")


def test_cli_merges_an_adapter(tmp_path, capsys):
    from velotune.cli import main
    path, tok = make_tokenized_checkpoint(tmp_path, "mistral")
    model, _ = load_with_lora(path)
    vt.save_adapter(model, tmp_path / "adapter")
    out = tmp_path / "merged"
    assert main(["export", str(path), "--adapter", str(tmp_path / "adapter"), "--format", "merged",
                 "--dtype", "float32", "--out", str(out)]) == 0
    ids = input_ids(len(tok))
    with torch.no_grad():
        ours = model(ids).logits
    hf, _ = _hf_logits(out, ids, torch.float32)
    assert rel_err(hf, ours) <= FP32_BOUND
    assert main(["export", str(path), "--adapter", str(tmp_path / "adapter"), "--out", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err


def test_cli_refuses_an_adapter_that_does_not_fit_before_writing(tmp_path, capsys):
    from velotune.cli import main
    path, _ = make_tokenized_checkpoint(tmp_path, "llama")
    other, _ = make_tokenized_checkpoint(tmp_path / "other", "llama", intermediate_size=96)
    model, _ = load_with_lora(other)
    vt.save_adapter(model, tmp_path / "adapter")
    for fmt in ("merged", "gguf"):
        out = tmp_path / f"out-{fmt}"
        code = main(["export", str(path), "--adapter", str(tmp_path / "adapter"), "--format", fmt, "--out", str(out)])
        err = capsys.readouterr().err
        assert code == 2 and "does not fit this model" in err and "wrong shape" in err and "mlp.up_proj" in err
        assert not out.exists()


def test_vt_export_is_callable_whichever_import_comes_first():
    import subprocess
    import sys
    code = ("import velotune.cli, velotune as vt; velotune.cli.build_parser(); "
            "from velotune.errors import UnsupportedError\n"
            "try:\n    vt.export(None, None, 'x', format='onnx')\n"
            "except UnsupportedError as e:\n    print('refused:', e)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "refused: export format 'onnx' is not supported" in out.stdout, out.stderr
