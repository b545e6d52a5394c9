"""Our LoRA against PEFT 0.21: adapter files both ways, logits, gradients, parameter counts; adapter file errors."""
import json

import pytest
import torch

import velotune as vt
from test_lora import ckpt, load, randomize_adapters, rel_err, token_ids  # noqa: F401 (ckpt is a fixture)
from velotune.errors import CheckpointError, UnsupportedError
from velotune.lora import lora_layers, trainable_parameters

peft = pytest.importorskip("peft")
pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")

CASES = {
    "lora": dict(r=4, alpha=8),
    "rslora": dict(r=8, alpha=6, rslora=True),
    "dora": dict(r=4, alpha=8, dora=True),
    "subset": dict(r=4, alpha=16, targets=["q_proj", "v_proj"]),
    "dora_subset_save_head": dict(r=2, alpha=4, dora=True, targets=["o_proj", "mlp.up_proj"],
                                  modules_to_save=["lm_head"]),
    "embedding": dict(r=4, alpha=8, targets=["embed_tokens", "q_proj"]),  # PEFT's lora_embedding_A / _B
}


def hf_model(path):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32, attn_implementation="eager")


def peft_config(kw):
    return peft.LoraConfig(r=kw["r"], lora_alpha=kw["alpha"], target_modules=kw.get("targets", "all-linear"),
                           use_rslora=kw.get("rslora", False), use_dora=kw.get("dora", False),
                           modules_to_save=kw.get("modules_to_save"), task_type="CAUSAL_LM")


def peft_name_to_ours(name):
    name = name.removeprefix("base_model.model.")
    name = name.replace(".lora_A.default.", ".lora_A.").replace(".lora_B.default.", ".lora_B.")
    name = name.replace(".lora_magnitude_vector.default.weight", ".lora_magnitude_vector")
    name = name.replace(".lora_embedding_A.default", ".lora_embedding_A").replace(".lora_embedding_B.default",
                                                                                  ".lora_embedding_B")
    return name.replace(".modules_to_save.default.", ".")


def labels_for(ids):
    labels = ids.clone()
    labels[:, :3] = -100
    return labels


@pytest.mark.parametrize("case", CASES)
def test_our_adapter_loads_in_peft_with_same_logits_and_gradients(ckpt, tmp_path, case):
    kw = CASES[case]
    ours = randomize_adapters(vt.add_lora(load(ckpt), seed=0, **kw))
    if kw.get("modules_to_save"):
        with torch.no_grad():
            ours.lm_head.weight.mul_(1.5)
    vt.save_adapter(ours, tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM" and config["r"] == kw["r"]
    theirs = peft.PeftModel.from_pretrained(hf_model(ckpt), str(tmp_path / "adapter"), is_trainable=True)

    ids = token_ids()
    labels = labels_for(ids)
    our_out, their_out = ours(ids, labels=labels, return_logits=True), theirs(input_ids=ids, labels=labels)
    assert rel_err(our_out.logits, their_out.logits) <= 1e-5  # measured: see the report
    our_out.loss.backward()
    their_out.loss.backward()
    our_params = {n: p for n, p in ours.named_parameters() if p.requires_grad}
    their_params = {peft_name_to_ours(n): p for n, p in theirs.named_parameters() if p.requires_grad}
    assert set(our_params) == set(their_params)
    for name, p in our_params.items():
        assert rel_err(p.grad, their_params[name].grad) <= 1e-4, name


@pytest.mark.parametrize("case", CASES)
def test_peft_adapter_loads_in_ours_with_same_logits(ckpt, tmp_path, case):
    kw = CASES[case]
    torch.manual_seed(1)
    theirs = peft.get_peft_model(hf_model(ckpt), peft_config(kw))
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if "lora_B" in name or "lora_embedding_A" in name:  # the factor PEFT starts at zero
                p.normal_(0, 0.1)
            elif "lora_magnitude_vector" in name or "modules_to_save" in name:
                p.mul_(1.2)
    theirs.save_pretrained(str(tmp_path / "peft_adapter"))
    ours = vt.load_adapter(load(ckpt), tmp_path / "peft_adapter")
    assert ours.lora_settings.r == kw["r"] and ours.lora_settings.dora == kw.get("dora", False)
    ids = token_ids()
    theirs.eval()
    assert rel_err(ours(ids).logits, theirs(input_ids=ids).logits) <= 1e-5
    # PEFT keeps a frozen copy of each module_to_save; the trainable count is the same
    copies = sum(p.numel() for n, p in theirs.named_parameters() if ".original_module." in n)
    trainable, total = trainable_parameters(ours)
    assert (trainable, total + copies) == tuple(theirs.get_nb_trainable_parameters())


def test_dropout_in_training_matches_peft(ckpt, tmp_path):
    ours = randomize_adapters(vt.add_lora(load(ckpt), r=4, alpha=8, dropout=0.3, seed=0))
    vt.save_adapter(ours, tmp_path / "a")
    theirs = peft.PeftModel.from_pretrained(hf_model(ckpt), str(tmp_path / "a"), is_trainable=True)
    ours.train()
    theirs.train()
    ids = token_ids()
    torch.manual_seed(9)
    our_logits = ours(ids).logits
    torch.manual_seed(9)
    their_logits = theirs(input_ids=ids).logits
    assert rel_err(our_logits, their_logits) <= 1e-5  # same layers, same order: the same dropout masks
    torch.manual_seed(10)
    assert rel_err(ours(ids).logits, our_logits) > 1e-3  # and dropout is really on


def test_adapter_round_trip_and_atomic_write(ckpt, tmp_path):
    ours = randomize_adapters(vt.add_lora(load(ckpt), r=4, alpha=8, dora=True, targets=["k_proj", "gate_proj"]))
    out = vt.save_adapter(ours, tmp_path / "a")
    # (hidden files aside: atomic_dir's list of the files it wrote)
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == \
        ["adapter_config.json", "adapter_model.safetensors"]
    assert [p.name for p in tmp_path.iterdir()] == ["a"]  # no temporary directory left behind
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["target_modules"] == ["gate_proj", "k_proj"] and config["use_dora"] is True
    with pytest.raises(CheckpointError, match="already exists"):
        vt.save_adapter(ours, out)
    vt.save_adapter(ours, out, overwrite=True)
    fresh = vt.load_adapter(load(ckpt), out)
    ids = token_ids()
    assert torch.equal(fresh(ids).logits, ours(ids).logits)
    frozen = vt.load_adapter(load(ckpt), out, trainable=False)
    assert not any(p.requires_grad for p in frozen.parameters())
    reloaded = vt.load_adapter(fresh, out)  # into a model whose LoRA layers match: weights replaced
    assert torch.equal(reloaded(ids).logits, ours(ids).logits)


def test_adapter_errors(ckpt, tmp_path):
    model = load(ckpt)
    with pytest.raises(CheckpointError, match="no such adapter directory"):
        vt.load_adapter(model, tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no adapter_config.json"):
        vt.load_adapter(model, tmp_path / "empty")
    ours = randomize_adapters(vt.add_lora(load(ckpt), r=4, alpha=8))
    good = vt.save_adapter(ours, tmp_path / "good")

    no_weights = tmp_path / "no_weights"
    no_weights.mkdir()
    (no_weights / "adapter_config.json").write_text((good / "adapter_config.json").read_text())
    (no_weights / "adapter_model.bin").write_bytes(b"")
    with pytest.raises(CheckpointError, match="no adapter_model.safetensors.*only safetensors"):
        vt.load_adapter(model, no_weights)

    bad_json = tmp_path / "bad_json"
    bad_json.mkdir()
    (bad_json / "adapter_config.json").write_text('{"r": 4,\n "peft_type": }')
    with pytest.raises(CheckpointError, match="invalid JSON at line 2"):
        vt.load_adapter(model, bad_json)

    patterned = json.loads((good / "adapter_config.json").read_text())
    patterned["rank_pattern"] = {"q_proj": 8}
    (tmp_path / "patterned").mkdir()
    (tmp_path / "patterned" / "adapter_config.json").write_text(json.dumps(patterned))
    with pytest.raises(UnsupportedError, match="rank_pattern"):
        vt.load_adapter(model, tmp_path / "patterned")

    assert not lora_layers(model) and all(p.requires_grad for p in model.parameters())

    with pytest.raises(CheckpointError, match="r: model has 8, adapter has 4"):
        vt.load_adapter(vt.add_lora(load(ckpt), r=8, alpha=8), good)

    renamed = json.loads((good / "adapter_config.json").read_text())
    renamed["target_modules"] = ["query_key_value", "q_proj"]
    (tmp_path / "renamed").mkdir()
    (tmp_path / "renamed" / "adapter_config.json").write_text(json.dumps(renamed))
    (tmp_path / "renamed" / "adapter_model.safetensors").write_bytes((good / "adapter_model.safetensors").read_bytes())
    with pytest.raises(CheckpointError, match=r"renamed/adapter_config.json: LoRA targets \['query_key_value'\] "
                                              r"match no linear layer"):
        vt.load_adapter(model, tmp_path / "renamed")

    merged = vt.merge_lora(vt.load_adapter(load(ckpt), good))
    with pytest.raises(UnsupportedError, match="unmerge_lora"):
        vt.load_adapter(merged, good)


def test_adapter_for_other_shapes_is_refused_by_name(ckpt, tmp_path):
    from hf_reference import make_checkpoint
    other_path, _ = make_checkpoint(tmp_path, "llama", intermediate_size=96)
    other = vt.add_lora(load(other_path), r=4, alpha=8, targets=["up_proj", "q_proj"])
    adapter = vt.save_adapter(other, tmp_path / "other_adapter")
    model = load(ckpt)
    with pytest.raises(CheckpointError, match=r"wrong shape: base_model\.model\.model\.layers\.0\.mlp\.up_proj"
                                              r"\.lora_B\.weight \[96, 4\] \(model needs \[112, 4\]\)"):
        vt.load_adapter(model, adapter)
    assert not lora_layers(model)  # the failed load took its LoRA layers out again
    assert all(p.requires_grad for p in model.parameters())


def test_generic_path_with_biases_matches_peft(tmp_path):
    """A model_type without a file of ours (gpt_neox: fused qkv, biases everywhere) runs as the transformers
    model; DoRA's bias handling and the adapter names must still agree with PEFT."""
    from transformers import AutoConfig, AutoModelForCausalLM
    config = AutoConfig.for_model("gpt_neox", vocab_size=128, hidden_size=64, intermediate_size=128,
                                  num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=64)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(str(tmp_path / "neox"))
    ours = vt.load(tmp_path / "neox", dtype="float32", device="cpu", load_tokenizer_files=False)[0]
    randomize_adapters(vt.add_lora(ours, r=4, alpha=8, dora=True, seed=0))
    assert sorted({n.rsplit(".", 1)[-1] for n in lora_layers(ours)}) == \
        ["dense", "dense_4h_to_h", "dense_h_to_4h", "query_key_value"]
    adapter = vt.save_adapter(ours, tmp_path / "adapter")
    theirs = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(tmp_path / "neox")),
                                            str(adapter))
    ids = token_ids(vocab=128)
    assert rel_err(ours(ids).logits, theirs(input_ids=ids).logits) <= 1e-5


def test_lora_on_the_token_embeddings_merges_exactly_and_is_refused_on_a_tied_table(ckpt, tmp_path):
    """LoRA on embed_tokens folds into the table (logits unchanged); a table the head shares cannot fold (the merged
    table would change the head too), and `all-linear` leaves the table alone."""
    from hf_reference import make_checkpoint
    ours = randomize_adapters(vt.add_lora(load(ckpt), r=4, alpha=8, targets=["embed_tokens"], seed=0))
    assert type(lora_layers(ours)["model.embed_tokens"]).__name__ == "LoraEmbedding"
    ids = token_ids()
    with torch.no_grad():
        adapted = ours(ids).logits
        assert rel_err(adapted, load(ckpt)(ids).logits) > 1e-3
        merged = vt.lora.merge_and_unload(ours)
        assert type(merged.model.embed_tokens) is torch.nn.Embedding
        assert rel_err(merged(ids).logits, adapted) <= 1e-6
    assert "model.embed_tokens" not in lora_layers(vt.add_lora(load(ckpt), targets="all-linear"))
    tied_path, _ = make_checkpoint(tmp_path, "llama_tied")
    tied = vt.add_lora(load(tied_path), r=4, alpha=8, targets=["embed_tokens", "q_proj"], seed=0)
    with pytest.raises(UnsupportedError, match=r"LoRA on model\.embed_tokens cannot be merged: lm_head shares"):
        vt.lora.merged_state_dict(tied)
    with pytest.raises(UnsupportedError, match="tied embeddings"):
        vt.lora.merge_lora(tied)
    assert not any(layer.merged for layer in lora_layers(tied).values())
