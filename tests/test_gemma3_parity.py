"""Gemma 3 text (velotune/models/gemma3.py) against transformers' Gemma3ForCausalLM, fp32, on tiny checkpoints that
transformers saved: logits, loss and every parameter's gradient; padded batches; LoRA against PEFT; greedy
generation with the KV cache; config guards; the multimodal "gemma3" config refused by name.

What the tiny configs exercise: local and global layers mixed (from `layer_types`, or from the older
`sliding_window_pattern`), a window (8) shorter than the inputs (19), two rotary tables (global: linear x4 on
its own base; local: another base, unscaled), head_dim 24 != hidden / heads, GQA, q/k norms and every RMSNorm
random around Gemma's 0, query_pre_attn_scalar, a pad token, tied and untied heads, optional soft-capping.
"""
import json

import pytest
import torch

import velotune as vt
from velotune.errors import CheckpointError, UnsupportedError
from velotune.infer import generate_ids
from velotune.infer.generation import left_pad
from velotune.models.gemma3 import Args

BASE = dict(vocab_size=211, hidden_size=64, intermediate_size=112, num_attention_heads=4, num_key_value_heads=2,
            head_dim=24, max_position_embeddings=256, rms_norm_eps=1e-6, sliding_window=8, query_pre_attn_scalar=16,
            rope_theta=10000.0, rope_local_base_freq=100.0, rope_scaling={"rope_type": "linear", "factor": 4.0},
            pad_token_id=3, eos_token_id=1, bos_token_id=2)
CASES = {
    # every 3rd layer global (S S F S S), as older configs say it; saved in transformers 5's shape
    "tied": dict(num_hidden_layers=5, sliding_window_pattern=3),
    # the same, with config.json rewritten the way the released checkpoints spell it (see _legacy_config)
    "legacy": dict(num_hidden_layers=5, sliding_window_pattern=3),
    # explicit layer_types, untied head, final soft-capping on (None in Gemma 3, optional in the config); the
    # attention soft-cap is set too: transformers reads it and never applies it, nor do we
    "untied_softcap": dict(num_hidden_layers=4, tie_word_embeddings=False, initializer_range=0.1,
                           layer_types=["full_attention", "sliding_attention", "sliding_attention", "full_attention"],
                           attn_logit_softcapping=1.0, final_logit_softcapping=2.0),
}
SEQ = 19


def rel_err(a, b):
    return ((a - b).norm() / b.norm().clamp(min=1e-30)).item()


def make_hf(case="tied", **overrides):
    from transformers import AutoModelForCausalLM, Gemma3TextConfig
    torch.manual_seed(1234)
    config = Gemma3TextConfig(**{**BASE, **CASES[case], **overrides})
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="eager")
    with torch.no_grad():  # zeros (Gemma's init) would hide a wrong (1 + weight) convention
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(0.0, 0.1)
    return model.eval()


def _legacy_config(config: dict):
    """The older config.json: rope_theta + rope_local_base_freq + rope_scaling, no layer_types (the pattern)."""
    ropes = config.pop("rope_parameters")
    config.pop("layer_types")
    full, local = dict(ropes["full_attention"]), ropes["sliding_attention"]
    config["rope_theta"] = full.pop("rope_theta")
    config["rope_local_base_freq"] = local["rope_theta"]
    config["rope_scaling"] = full


def checkpoint(tmp_path, case="tied", **overrides):
    hf = make_hf(case, **overrides)
    path = tmp_path / case
    hf.save_pretrained(str(path))
    if case == "legacy":
        file = path / "config.json"
        config = json.loads(file.read_text())
        _legacy_config(config)
        file.write_text(json.dumps(config))
        from transformers import AutoConfig
        again = AutoConfig.from_pretrained(str(path))  # transformers reads the old shape into the same model
        assert again.layer_types == hf.config.layer_types and again.rope_parameters == hf.config.rope_parameters
    return path, hf


def load(path):
    return vt.load(path, dtype="float32", device="cpu")[0]


def inputs(batch=2, seq=SEQ, seed=7):
    ids = torch.randint(0, BASE["vocab_size"], (batch, seq), generator=torch.Generator().manual_seed(seed))
    ids[:, 5] = BASE["pad_token_id"]  # transformers gives the pad row no gradient: so must we
    labels = ids.clone()
    labels[:, :4] = -100
    return ids, labels


def grads_match(ours, hf, bound=1e-5):
    theirs = dict(hf.named_parameters())
    mine = {n: p for n, p in ours.named_parameters() if p.requires_grad}
    assert set(mine) == {n for n, p in theirs.items() if p.requires_grad}
    worst = 0.0
    for name, p in mine.items():
        assert p.grad is not None, name
        err = rel_err(p.grad, theirs[name].grad)
        assert err <= bound, (name, err)
        worst = max(worst, err)
    return worst


@pytest.mark.parametrize("case", CASES)
def test_logits_loss_and_gradients_match_transformers(tmp_path, case):
    path, hf = checkpoint(tmp_path, case)
    ours = load(path)
    assert [layer.layer_type for layer in ours.model.layers] == hf.config.layer_types
    assert len(set(hf.config.layer_types)) == 2  # both kinds of layer, both tables
    ids, labels = inputs()
    theirs = hf(input_ids=ids, labels=labels)
    out = ours(ids, labels=labels, return_logits=True)
    logits_err = rel_err(out.logits, theirs.logits)
    loss_err = abs(out.loss.item() - theirs.loss.item()) / theirs.loss.item()
    assert logits_err <= 1e-5 and loss_err <= 1e-5
    theirs.loss.backward()
    out.loss.backward()
    print(f"{case}: logits {logits_err:.1e} loss {loss_err:.1e} max grad {grads_match(ours, hf):.1e}")


@pytest.mark.parametrize("case", ["tied", "untied_softcap"])
def test_fused_loss_without_logits_matches_transformers(tmp_path, case):
    # return_logits=False: the chunked linear + cross-entropy (with the final soft-cap inside when set)
    path, hf = checkpoint(tmp_path, case)
    ours = load(path)
    ids, labels = inputs()
    theirs = hf(input_ids=ids, labels=labels).loss
    out = ours(ids, labels=labels, return_logits=False)
    assert out.logits is None
    assert abs(out.loss.item() - theirs.item()) <= 1e-5 * theirs.item()
    theirs.backward()
    out.loss.backward()
    grads_match(ours, hf)


def test_each_feature_moves_the_logits(tmp_path):
    """A model ignoring one of these would fail the 1e-5 bound above by far."""
    ids, _ = inputs()
    with torch.no_grad():
        ref = make_hf()(input_ids=ids).logits
        for off in (dict(rope_scaling=None), dict(rope_local_base_freq=10000.0), dict(sliding_window=64),
                    dict(query_pre_attn_scalar=24)):
            assert rel_err(make_hf(**off)(input_ids=ids).logits, ref) > 1e-3, off


def test_attention_softcap_is_ignored_as_transformers_ignores_it(tmp_path, caplog):
    ids, _ = inputs()
    with torch.no_grad():
        capped = make_hf("untied_softcap")(input_ids=ids).logits
        assert torch.equal(make_hf("untied_softcap", attn_logit_softcapping=None)(input_ids=ids).logits, capped)
        assert rel_err(make_hf("untied_softcap", final_logit_softcapping=None)(input_ids=ids).logits, capped) > 1e-3
    path, _ = checkpoint(tmp_path, "untied_softcap")
    ours = load(path)
    assert "attn_logit_softcapping=1.0 is ignored" in caplog.text
    assert all(layer.self_attn.softcap is None for layer in ours.model.layers) and ours.final_logit_softcap == 2.0


def test_padded_batches_match_transformers(tmp_path):
    path, hf = checkpoint(tmp_path)
    ours = load(path)
    ids, labels = inputs()
    # right padding (a training batch): the same mask and labels give transformers' loss and gradients
    mask = torch.ones_like(ids)
    mask[1, 13:] = 0
    labels[1, 13:] = -100
    theirs = hf(input_ids=ids, attention_mask=mask, labels=labels)
    out = ours(ids, attention_mask=mask, labels=labels, return_logits=True)
    assert rel_err(out.logits[0], theirs.logits[0]) <= 1e-5
    assert rel_err(out.logits[1, :13], theirs.logits[1, :13]) <= 1e-5
    assert abs(out.loss.item() - theirs.loss.item()) <= 1e-5 * theirs.loss.item()
    theirs.loss.backward()
    out.loss.backward()
    grads_match(ours, hf)
    # left padding (generation prompts): each row as transformers computes it alone
    short = ids[1:, :11]
    batch = torch.cat([ids[:1], torch.cat([torch.full((1, SEQ - 11), 3), short], dim=1)])
    mask = torch.ones_like(batch)
    mask[1, :SEQ - 11] = 0
    with torch.no_grad():
        padded = ours(batch, attention_mask=mask).logits
        assert rel_err(padded[:1], hf(input_ids=ids[:1]).logits) <= 1e-5
        assert rel_err(padded[1:, SEQ - 11:], hf(input_ids=short).logits) <= 1e-5
        assert torch.isfinite(padded).all()


def test_packed_rows_with_windows_match_separate_samples(tmp_path):
    path, hf = checkpoint(tmp_path)
    ours = load(path)
    ids, _ = inputs(batch=1, seq=23)
    a, b = ids[:, :11], ids[:, 11:]  # both longer than the window
    documents = torch.tensor([[0] * 11 + [1] * 12])
    with torch.no_grad():
        packed = ours(ids, document_ids=documents).logits
        assert rel_err(packed[:, :11], hf(input_ids=a).logits) <= 1e-5
        assert rel_err(packed[:, 11:], hf(input_ids=b).logits) <= 1e-5


def test_gradient_checkpointing_gives_the_same_gradients(tmp_path):
    path, hf = checkpoint(tmp_path)
    ours = load(path)
    ours.set_gradient_checkpointing(True)
    ours.train()
    ids, labels = inputs()
    hf(input_ids=ids, labels=labels).loss.backward()
    ours(ids, labels=labels).loss.backward()
    grads_match(ours, hf)


def test_lora_matches_peft(tmp_path):
    peft = pytest.importorskip("peft")
    path, hf = checkpoint(tmp_path, "untied_softcap")
    ours = vt.add_lora(load(path), r=4, alpha=8, seed=0)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():  # B = 0 at init would hide most mistakes
        for name, p in ours.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    vt.save_adapter(ours, tmp_path / "adapter")
    theirs = peft.PeftModel.from_pretrained(hf, str(tmp_path / "adapter"), is_trainable=True)
    ids, labels = inputs()
    mine, their = ours(ids, labels=labels, return_logits=True), theirs(input_ids=ids, labels=labels)
    assert rel_err(mine.logits, their.logits) <= 1e-5
    mine.loss.backward()
    their.loss.backward()
    our_params = {n: p for n, p in ours.named_parameters() if p.requires_grad}
    their_params = {n.removeprefix("base_model.model.").replace(".default.", "."): p
                    for n, p in theirs.named_parameters() if p.requires_grad}
    assert set(our_params) == set(their_params) and len(our_params) == 4 * 7 * 2
    for name, p in our_params.items():
        assert rel_err(p.grad, their_params[name].grad) <= 1e-5, name


def test_greedy_generation_with_the_cache_matches_transformers(tmp_path):
    path, hf = checkpoint(tmp_path)
    ours = load(path)
    hf.generation_config.eos_token_id = None
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(4, BASE["vocab_size"], (n,), generator=g).tolist() for n in (11, 6)]  # no pad token
    new = 10  # decoding past the window (8): the cache keeps every position, the mask hides the old ones
    ids, mask = left_pad(prompts, pad_token_id=3)
    out = generate_ids(ours, ids, mask, max_new_tokens=new, eos_token_ids=[], return_logits=True)
    for row, prompt in enumerate(prompts):
        with torch.no_grad():
            ref = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                              max_new_tokens=new, do_sample=False, output_logits=True,
                              return_dict_in_generate=True, pad_token_id=3)
        assert out.tokens[row] == ref.sequences[0, len(prompt):].tolist()
        steps = torch.stack([step[row] for step in out.logits])
        assert rel_err(steps, torch.cat(ref.logits)) <= 1e-5


def test_saved_checkpoint_loads_in_transformers(tmp_path):
    path, hf = checkpoint(tmp_path)
    vt.save(load(path), None, tmp_path / "saved")
    from transformers import AutoModelForCausalLM
    again = AutoModelForCausalLM.from_pretrained(str(tmp_path / "saved"), dtype=torch.float32,
                                                 attn_implementation="eager")
    assert json.loads((tmp_path / "saved" / "config.json").read_text())["model_type"] == "gemma3_text"
    ids, _ = inputs()
    with torch.no_grad():
        assert torch.equal(again(input_ids=ids).logits, hf(input_ids=ids).logits)


# ---- config guards --------------------------------------------------------------------------------------------

def _config(**edits):
    from transformers import Gemma3TextConfig
    config = Gemma3TextConfig(**BASE, **CASES["tied"]).to_dict()
    config.update(edits)
    return {k: v for k, v in config.items() if v is not _DROP}


_DROP = object()
GUARDS = [
    (dict(layer_types=["sliding_attention", "chunked_attention", "full_attention", "sliding_attention",
                       "sliding_attention"]), CheckpointError, r"field 'layer_types' holds chunked_attention"),
    (dict(rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}), CheckpointError,
     r"field 'rope_parameters' must be keyed by layer type"),
    (dict(rope_parameters={"full_attention": {"rope_type": "mrope", "rope_theta": 1e4}}), UnsupportedError,
     r"field 'rope_parameters.full_attention' asks for rope type 'mrope'"),
    (dict(layer_types=_DROP, sliding_window_pattern=0), CheckpointError, r"field 'sliding_window_pattern'"),
    (dict(query_pre_attn_scalar=0), CheckpointError, r"field 'query_pre_attn_scalar'"),
    (dict(rope_parameters=_DROP, rope_local_base_freq=-1.0), CheckpointError, r"field 'rope_local_base_freq'"),
    (dict(attn_logit_softcapping="50"), CheckpointError, r"field 'attn_logit_softcapping'"),
    (dict(hidden_activation="relu2"), UnsupportedError, r"field 'hidden_activation'"),
    (dict(use_bidirectional_attention=True), UnsupportedError, r"use_bidirectional_attention"),
    (dict(sliding_window=-8), CheckpointError, r"field 'sliding_window'"),
]


@pytest.mark.parametrize("edits, error, words", GUARDS)
def test_bad_config_fields_are_named(edits, error, words):
    with pytest.raises(error, match=r"/ckpt/config\.json: .*" + words):
        Args.from_dict(_config(**edits), source="/ckpt/config.json")


def test_older_configs_read_as_transformers_reads_them():
    # no layer_types: every 6th layer global by default; rope_scaling on the global layers only
    args = Args.from_dict(_config(layer_types=_DROP, rope_parameters=_DROP, num_hidden_layers=7, rope_theta=5e5,
                                  rope_local_base_freq=333.0, rope_scaling={"rope_type": "linear", "factor": 8.0},
                                  sliding_window_pattern=_DROP))
    assert args.layer_types == ["sliding_attention"] * 5 + ["full_attention", "sliding_attention"]
    assert (args.rope_theta, args.rope_scaling, args.rope_local_base_freq, args.local_rope_scaling) == (
        5e5, {"rope_type": "linear", "factor": 8.0}, 333.0, None)


def test_a_bad_field_is_refused_at_load_naming_the_file(tmp_path):
    path, _ = checkpoint(tmp_path)
    config = json.loads((path / "config.json").read_text())
    config["layer_types"][1] = "global"
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=rf"{path / 'config.json'}: field 'layer_types'"):
        load(path)


def _multimodal_checkpoint(path):
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration
    text = {k: BASE[k] for k in ("vocab_size", "hidden_size", "intermediate_size", "num_attention_heads",
                                 "num_key_value_heads", "head_dim")}
    config = Gemma3Config(text_config=dict(text, num_hidden_layers=2),
                          vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                             num_attention_heads=2, image_size=28, patch_size=14),
                          mm_tokens_per_image=4, image_token_index=210, boi_token_index=208, eoi_token_index=209)
    torch.manual_seed(0)
    Gemma3ForConditionalGeneration(config).save_pretrained(str(path))
    return json.loads((path / "config.json").read_text())


def test_a_multimodal_gemma3_checkpoint_is_not_read_as_text_only(tmp_path):
    """Our text file refuses a multimodal config by name; vt.load reads a multimodal Gemma 3 as the vision family
    (velotune/models/vision/gemma3.py: its text model is this file's, from text_config)."""
    config = _multimodal_checkpoint(tmp_path / "mm")
    file = tmp_path / "mm" / "config.json"
    assert config["model_type"] == "gemma3" and config["text_config"]["model_type"] == "gemma3_text"
    with pytest.raises(UnsupportedError, match=rf"{file}: holds a text_config"):
        Args.from_dict(config, source=str(file))
    model, _ = vt.load(tmp_path / "mm", dtype="float32", device="cpu")
    from velotune.models.vision.gemma3 import Model
    assert isinstance(model, Model) and model.path == "native"
