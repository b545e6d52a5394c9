"""vt.load / vt.save: sharded and single-file checkpoints, round trips that transformers reads back, dtypes,
tokenizers, every kind of bad input (each a clear error naming the file or model), and the generic path."""
import json
import logging

import pytest
import torch
from safetensors.torch import load_file, save_file

import velotune as vt
from hf_reference import make_checkpoint
from tiny_tokenizer import make_tokenizer
from velotune.errors import CheckpointError, UnsupportedError
from velotune.models import generic

IDS = torch.tensor([[5, 17, 42, 3, 99, 150, 7, 8, 200, 11, 12, 13]])


def rel_err(a, b):
    return ((a - b).norm() / b.norm().clamp(min=1e-30)).item()


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(ids).logits


def _edit_config(path, **changes):
    config = json.loads((path / "config.json").read_text())
    for key, value in changes.items():
        if value is _DROP:
            config.pop(key)
        else:
            config[key] = value
    (path / "config.json").write_text(json.dumps(config, indent=2))


_DROP = object()


# ---- good checkpoints ---------------------------------------------------------------------------------------
def test_sharded_checkpoint_from_transformers_loads(tmp_path):
    hf = make_checkpoint(tmp_path, "llama")[1]
    sharded = tmp_path / "sharded"
    hf.save_pretrained(str(sharded), max_shard_size="40KB")
    shards = sorted(p.name for p in sharded.glob("*.safetensors"))
    assert len(shards) > 2 and (sharded / "model.safetensors.index.json").is_file()
    ours, _ = vt.load(sharded, dtype="float32", device="cpu")
    with torch.no_grad():
        assert rel_err(logits(ours), hf(input_ids=IDS).logits) <= 1e-5


@pytest.mark.parametrize("case", ["llama_tied", "gemma2", "phi3"])
def test_save_load_round_trip_is_exact_and_transformers_reads_it(tmp_path, case):
    from transformers import AutoModelForCausalLM
    path, hf = make_checkpoint(tmp_path, case)
    ours, _ = vt.load(path, dtype="float32", device="cpu")
    out = vt.save(ours, None, tmp_path / "saved", max_shard_bytes=60_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1                 # sharded on the way out too
    assert ("lm_head.weight" in index["weight_map"]) == (not hf.config.tie_word_embeddings)
    assert json.loads((out / "config.json").read_text())["model_type"] == case.split("_")[0]
    again, _ = vt.load(out, dtype="float32", device="cpu")
    assert torch.equal(logits(again), logits(ours))
    reread = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    with torch.no_grad():
        assert rel_err(reread(input_ids=IDS).logits, logits(ours)) <= 1e-5


def test_dtype_choice(tmp_path):
    path, _ = make_checkpoint(tmp_path, "qwen3")
    bf16, _ = vt.load(path, dtype="bfloat16", device="cpu")
    assert {p.dtype for p in bf16.parameters()} == {torch.bfloat16}
    assert logits(bf16).dtype == torch.bfloat16
    fp32, _ = vt.load(path, device="cpu")  # the CPU default is fp32
    assert {p.dtype for p in fp32.parameters()} == {torch.float32}
    assert rel_err(logits(bf16).float(), logits(fp32)) < 5e-2
    with pytest.raises(ValueError, match="dtype 'float8'"):
        vt.load(path, dtype="float8", device="cpu")
    out = vt.save(fp32, None, tmp_path / "as_bf16", dtype="bfloat16")
    assert {t.dtype for t in load_file(str(out / "model.safetensors")).values()} == {torch.bfloat16}
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"


@pytest.mark.parametrize("stored, native, expected", [
    ("bfloat16", "1", torch.bfloat16),   # bf16 checkpoint, CPU with bf16 dot products: stays bf16
    ("bfloat16", "0", torch.float32),    # no native bf16: fp32, emulated bf16 matmuls are slow
    ("float16", "1", torch.float32),     # fp16 matmuls on CPUs are slower still
    ("float32", "1", torch.float32),
])
def test_cpu_default_dtype_follows_bf16_checkpoints_where_native(tmp_path, monkeypatch, stored, native, expected):
    path, _ = make_checkpoint(tmp_path, "llama")
    _edit_config(path, dtype=stored)
    monkeypatch.setenv("VELOTUNE_CPU_BF16", native)
    model, _ = vt.load(path, device="cpu")
    assert {p.dtype for p in model.parameters()} == {expected}


@pytest.mark.parametrize("native, warns", [("0", True), ("1", False)])
def test_bf16_asked_for_on_a_cpu_without_bf16_instructions_warns_once(tmp_path, monkeypatch, caplog, native, warns):
    from velotune.models import dtypes
    path, _ = make_checkpoint(tmp_path, "llama")
    monkeypatch.setenv("VELOTUNE_CPU_BF16", native)
    monkeypatch.setattr(dtypes, "_warned_slow", set())
    with caplog.at_level(logging.WARNING, logger="velotune"):
        vt.load(path, dtype="bfloat16", device="cpu")
        vt.load(path, dtype="bfloat16", device="cpu")
        vt.load(path, dtype="float32", device="cpu")
    emulated = [r for r in caplog.records if "emulated" in r.getMessage()]
    assert len(emulated) == (1 if warns else 0)
    if warns:
        assert "dtype='float32'" in emulated[0].getMessage()


def test_a_load_gives_the_buffers_it_freed_back(tmp_path, monkeypatch):
    """Every load ends with one heap trim (glibc keeps freed read buffers resident otherwise), errors included."""
    import sys
    from velotune.models import heap, loader
    calls = []
    monkeypatch.setattr(loader, "release_freed_memory", lambda: calls.append(1))
    path, _ = make_checkpoint(tmp_path, "llama")
    vt.load(path, dtype="bfloat16", device="cpu")
    with pytest.raises(CheckpointError):
        vt.load(tmp_path / "missing", device="cpu")
    assert len(calls) == 2
    assert heap.release_freed_memory() is (sys.platform.startswith("linux") and heap._malloc_trim() is not None)


def test_tokenizer_loads_when_present_and_survives_save(tmp_path):
    path, _ = make_checkpoint(tmp_path, "llama_tied")
    tok = make_tokenizer()
    tok.save_pretrained(str(path))
    model, loaded = vt.load(path, dtype="float32", device="cpu")
    text = "The quick brown fox."
    assert loaded is not None and loaded("x")["input_ids"]
    assert loaded(text)["input_ids"] == tok(text)["input_ids"]
    assert loaded.decode(loaded(text)["input_ids"], skip_special_tokens=True) == text
    out = vt.save(model, loaded, tmp_path / "saved")
    assert vt.load(out, dtype="float32", device="cpu")[1](text)["input_ids"] == tok(text)["input_ids"]


def test_no_tokenizer_files_gives_none_and_a_warning(tmp_path, caplog):
    path, _ = make_checkpoint(tmp_path, "llama_tied")
    with caplog.at_level(logging.WARNING, logger="velotune"):
        _, tok = vt.load(path, dtype="float32", device="cpu")
    assert tok is None
    assert any("no tokenizer files" in r.getMessage() and str(path) in r.getMessage() for r in caplog.records)


# ---- bad input ----------------------------------------------------------------------------------------------
def test_truncated_safetensors_file(tmp_path):
    path, _ = make_checkpoint(tmp_path, "llama_tied")
    weights = path / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: cannot read safetensors .*truncated or corrupt"):
        vt.load(path, dtype="float32", device="cpu")


def test_corrupt_safetensors_header(tmp_path):
    path, _ = make_checkpoint(tmp_path, "llama_tied")
    weights = path / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[8:24] = b"this is not json"
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: cannot read safetensors"):
        vt.load(path, dtype="float32", device="cpu")


def test_shape_mismatch_names_tensor_and_file(tmp_path):
    path, _ = make_checkpoint(tmp_path, "llama_tied")
    _edit_config(path, intermediate_size=120)
    with pytest.raises(CheckpointError, match=r"model\.safetensors: tensor 'model\.layers\.0\.mlp\.\w+_proj\.weight' "
                                              r"has shape \[\d+, \d+\] but config\.json implies"):
        vt.load(path, dtype="float32", device="cpu")


def test_missing_tensors_are_listed(tmp_path):
    path, _ = make_checkpoint(tmp_path, "mistral")
    weights = path / "model.safetensors"
    state = load_file(str(weights))
    del state["model.norm.weight"], state["model.layers.1.self_attn.k_proj.weight"]
    save_file(state, str(weights), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"mistral: weights missing from the checkpoint: "
                                              r"model\.layers\.1\.self_attn\.k_proj\.weight, model\.norm\.weight$"):
        vt.load(path, dtype="float32", device="cpu")


def test_missing_shard_listed_in_index(tmp_path):
    hf = make_checkpoint(tmp_path, "llama_tied")[1]
    sharded = tmp_path / "sharded"
    hf.save_pretrained(str(sharded), max_shard_size="40KB")
    victim = sorted(sharded.glob("*.safetensors"))[-1]
    victim.unlink()
    with pytest.raises(CheckpointError, match=f"missing: {victim.name}"):
        vt.load(sharded, dtype="float32", device="cpu")


def test_missing_config_fields(tmp_path):
    path, _ = make_checkpoint(tmp_path, "qwen2")
    _edit_config(path, hidden_size=_DROP, num_attention_heads=_DROP)
    with pytest.raises(CheckpointError, match=r"config\.json: missing required field\(s\) hidden_size, "
                                              r"num_attention_heads"):
        vt.load(path, dtype="float32", device="cpu")
    _edit_config(path, hidden_size=64, num_attention_heads=4, model_type=_DROP)
    with pytest.raises(CheckpointError, match="missing field 'model_type'"):
        vt.load(path, dtype="float32", device="cpu")


def test_bad_config_values(tmp_path):
    path, _ = make_checkpoint(tmp_path, "qwen2")
    _edit_config(path, num_hidden_layers="two")
    with pytest.raises(CheckpointError, match="'num_hidden_layers' must be a positive integer, got 'two'"):
        vt.load(path, dtype="float32", device="cpu")
    _edit_config(path, num_hidden_layers=2, num_key_value_heads=3)
    with pytest.raises(CheckpointError, match=r"num_attention_heads \(4\) is not a multiple of num_key_value_heads"):
        vt.load(path, dtype="float32", device="cpu")


def test_invalid_config_json(tmp_path):
    path, _ = make_checkpoint(tmp_path, "llama_tied")
    text = (path / "config.json").read_text()
    (path / "config.json").write_text(text.replace('"hidden_size": 64,', '"hidden_size": 64,,'))
    with pytest.raises(CheckpointError, match=r"config\.json: invalid JSON at line \d+, column \d+"):
        vt.load(path, dtype="float32", device="cpu")


def test_directory_without_weights(tmp_path):
    path, _ = make_checkpoint(tmp_path, "llama_tied")
    (path / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        vt.load(path, dtype="float32", device="cpu")


def test_nonexistent_path_and_offline_hub_id(tmp_path):
    with pytest.raises(CheckpointError, match="no_such_dir"):
        vt.load(tmp_path / "no_such_dir", device="cpu")
    with pytest.raises(CheckpointError, match=r"model 'velotune-tests/no-such-model': not a local directory"
                                              r".*could not be fetched"):
        vt.load("velotune-tests/no-such-model", device="cpu")
    afile = tmp_path / "weights.bin"
    afile.write_bytes(b"x")
    with pytest.raises(CheckpointError, match="expected a model directory"):
        vt.load(afile, device="cpu")


def test_save_refuses_an_existing_directory_unless_overwrite(tmp_path):
    path, _ = make_checkpoint(tmp_path, "llama_tied")
    model, _ = vt.load(path, dtype="float32", device="cpu")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    with pytest.raises(CheckpointError, match="already exists and is not empty"):
        vt.save(model, None, out)
    assert (out / "keep.txt").read_text() == "user data"
    assert not list(tmp_path.glob(".out.tmp-*"))  # nothing half-written left beside it
    vt.save(model, None, out, overwrite=True)
    # An overwrite replaces what velotune writes and keeps the user's own files (checkpoint.atomic_dir).
    assert (out / "model.safetensors").is_file() and (out / "keep.txt").read_text() == "user data"


# ---- the generic path ---------------------------------------------------------------------------------------
def _neox_checkpoint(tmp_path, **overrides):
    from transformers import AutoConfig, AutoModelForCausalLM
    torch.manual_seed(3)
    config = AutoConfig.for_model("gpt_neox", vocab_size=211, hidden_size=64, intermediate_size=112,
                                  num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=256,
                                  rotary_pct=0.5, **overrides)
    hf = AutoModelForCausalLM.from_config(config).eval()
    out = tmp_path / "neox"
    hf.save_pretrained(str(out))
    return out, hf


def test_generic_path_matches_transformers_and_warns_once(tmp_path, caplog, monkeypatch):
    monkeypatch.setattr(generic, "_warned", False)
    path, hf = _neox_checkpoint(tmp_path)
    with caplog.at_level(logging.WARNING, logger="velotune"):
        model, _ = vt.load(path, dtype="float32", device="cpu")
        vt.load(path, dtype="float32", device="cpu")
    slow = [r for r in caplog.records if "generic path" in r.getMessage()]
    assert len(slow) == 1 and "gpt_neox" in slow[0].getMessage() and "llama" in slow[0].getMessage()
    assert model.args.model_type == "gpt_neox" and model.args.tie_word_embeddings is False
    # The transformers model's own parameter names, no wrapper prefix.
    assert [n for n, _ in model.named_parameters()] == [n for n, _ in hf.named_parameters()]

    ids, labels = IDS.repeat(2, 1), IDS.repeat(2, 1).clone()
    labels[:, :3] = -100
    ours, ref = model(ids, labels=labels, return_logits=True), hf(input_ids=ids, labels=labels)
    assert rel_err(ours.logits, ref.logits) <= 1e-6
    assert ours.loss.item() == pytest.approx(ref.loss.item(), rel=1e-6)
    assert ours.num_tokens.item() == 2 * (IDS.shape[1] - 3)
    ours.loss.backward()
    assert all(p.grad is not None for p in model.parameters())
    summed = model(ids, labels=labels, reduction="sum", return_logits=False)
    assert summed.logits is None and summed.loss.item() == pytest.approx(ref.loss.item() * 18, rel=1e-5)


def test_generic_path_cache_padding_and_save(tmp_path):
    from velotune.infer.cache import KVCache
    path, hf = _neox_checkpoint(tmp_path)
    model, _ = vt.load(path, dtype="float32", device="cpu")
    full = logits(model)
    cache = KVCache.for_model(model, capacity=32)
    with torch.no_grad():
        parts = [model(IDS[:, :7], cache=cache).logits, model(IDS[:, 7:], cache=cache).logits]
    assert cache.past_length == IDS.shape[1]
    assert rel_err(torch.cat(parts, dim=1), full) <= 1e-5
    # Left padding with a mask: real tokens get the logits they have alone, as on our own models.
    padded = torch.cat([torch.zeros(1, 4, dtype=torch.long), IDS], dim=1)
    mask = torch.cat([torch.zeros(1, 4, dtype=torch.long), torch.ones_like(IDS)], dim=1)
    with torch.no_grad():
        assert rel_err(model(padded, attention_mask=mask).logits[:, 4:], full) <= 1e-5
    # Saved under the checkpoint's own tensor names (transformers renames some on load).
    out = vt.save(model, None, tmp_path / "saved")
    assert set(load_file(str(out / "model.safetensors"))) == set(load_file(str(path / "model.safetensors")))
    assert torch.equal(logits(vt.load(out, dtype="float32", device="cpu")[0]), full)


def test_generic_path_missing_weights(tmp_path):
    path, _ = _neox_checkpoint(tmp_path)
    weights = path / "model.safetensors"
    state = load_file(str(weights))
    name = next(k for k in state if k.endswith("final_layer_norm.weight"))
    del state[name]
    save_file(state, str(weights), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="weights missing from the checkpoint: .*final_layer_norm.weight"):
        vt.load(path, dtype="float32", device="cpu")


def test_unknown_model_type_lists_supported(tmp_path):
    path, _ = make_checkpoint(tmp_path, "llama_tied")
    _edit_config(path, model_type="velotune_no_such_arch")
    with pytest.raises(UnsupportedError, match=r"model_type 'velotune_no_such_arch' is not supported.*"
                                               r"gemma, gemma2, gemma3_text, gpt_oss, granite, llama, mistral, mixtral, olmo2, phi3, qwen2, qwen3, qwen3_moe"):
        vt.load(path, dtype="float32", device="cpu")
    _edit_config(path, model_type="t5")
    with pytest.raises(UnsupportedError, match="model_type 't5' has no causal language model"):
        vt.load(path, dtype="float32", device="cpu")


@pytest.mark.parametrize("model_type", ["gemma", "gemma2"])
def test_bidirectional_gemma_config_is_refused(model_type):
    from importlib import import_module

    from velotune.errors import UnsupportedError
    args_cls = import_module(f"velotune.models.{model_type}").Args
    config = dict(model_type=model_type, vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                  num_attention_heads=2, num_key_value_heads=1, use_bidirectional_attention=True)
    with pytest.raises(UnsupportedError, match=r"x/config.json: use_bidirectional_attention"):
        args_cls.from_dict(config, source="x/config.json")


def test_a_multimodal_config_with_text_config_is_refused_clearly(tmp_path):
    """The text model's fields sit in text_config: reading only the top level would build from defaults."""
    path, _ = make_checkpoint(tmp_path, "llama")
    config = json.loads((path / "config.json").read_text())
    text = {k: config.pop(k) for k in ("hidden_size", "num_hidden_layers", "num_attention_heads")}
    config["text_config"] = text
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedError, match="holds a text_config"):
        vt.load(path, dtype="float32", device="cpu")
