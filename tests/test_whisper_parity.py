"""Parity of velotune's Whisper with transformers' WhisperForConditionalGeneration on a tiny random model loaded
through load_whisper: logits, loss and every parameter gradient in fp32, without and with decoder padding (right
and left); gradient checkpointing and dropout; LoRA on q_proj / v_proj against PEFT; greedy decoding with the cache
against a plain greedy loop over transformers' forward and against generate(); save -> reload both ways; errors.
"""
import json
from pathlib import Path

import pytest
import torch

import velotune as vt
from velotune.errors import CheckpointError, UnsupportedError
from velotune.lora import lora_layers, merged_state_dict
from velotune.models.registry import architecture, supported_model_types
from velotune.models.whisper import (SPEECH_SEQ2SEQ, Whisper, WhisperArgs, decoder_input_ids_from_labels,
                                     load_whisper, save_whisper, transcribe_ids)

# init_std 0.2: large enough that a random model's greedy output varies from token to token and row to row.
TINY = dict(vocab_size=211, num_mel_bins=16, d_model=64, encoder_layers=2, decoder_layers=2,
            encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=96, decoder_ffn_dim=112,
            max_source_positions=64, max_target_positions=32, pad_token_id=209, bos_token_id=209, eos_token_id=209,
            decoder_start_token_id=208, begin_suppress_tokens=None, suppress_tokens=None, init_std=0.2)
FRAMES = 128  # 2 x max_source_positions
START, PAD = 208, 209


def rel_err(a, b):
    return ((a - b).norm() / b.norm().clamp(min=1e-30)).item()


def make_hf(attn="sdpa", **overrides):
    from transformers import WhisperConfig, WhisperForConditionalGeneration
    torch.manual_seed(1234)
    model = WhisperForConditionalGeneration._from_config(WhisperConfig(**{**TINY, **overrides}),
                                                         attn_implementation=attn)
    with torch.no_grad():  # norms and biases off their ones/zeros init, which would hide a wrong convention
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.normal_(1.0 if "layer_norm" in name and name.endswith("weight") else 0.0, 0.1)
    return model.eval()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """(checkpoint dir, transformers model with sdpa attention)."""
    hf = make_hf()
    path = tmp_path_factory.mktemp("whisper") / "tiny"
    hf.save_pretrained(str(path))
    return path, hf


def features(batch=3, seed=7):
    return torch.randn(batch, TINY["num_mel_bins"], FRAMES, generator=torch.Generator().manual_seed(seed))


def text_batch(padding, seed=3):
    """(decoder_input_ids or None, decoder_attention_mask or None, labels) for 3 rows of 9 positions. "none": labels
    alone (transformers shifts them), the last row's tail ignored as a collated batch has it; "right" / "left":
    explicit decoder inputs with padding at the end / start of rows 1 and 2, masked and ignored."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, START, (3, 9), generator=g)
    if padding == "none":
        labels[2, 6:] = -100
        return None, None, labels
    ids = torch.cat([torch.full((3, 1), START), labels[:, :-1]], dim=1)
    mask = torch.ones_like(ids)
    if padding == "right":
        mask[1, 5:], mask[2, 7:] = 0, 0
    else:
        mask[1, :3], mask[2, :1] = 0, 0
    ids[mask == 0] = PAD
    labels[mask == 0] = -100
    return ids, mask, labels


def test_registry_has_whisper_under_its_own_task():
    assert SPEECH_SEQ2SEQ == "speech-seq2seq"
    assert architecture("whisper", SPEECH_SEQ2SEQ).Model is Whisper
    assert supported_model_types(SPEECH_SEQ2SEQ) == ["whisper"]
    assert architecture("whisper") is None and "whisper" not in supported_model_types()  # not a causal LM


def test_parameter_names_and_tying_are_transformers(checkpoint):
    path, hf = checkpoint
    ours = load_whisper(path, dtype="float32", device="cpu")
    assert ours.task == SPEECH_SEQ2SEQ and not ours.training and ours.max_seq_length == TINY["max_target_positions"]
    assert set(ours.state_dict()) == set(hf.state_dict())
    assert "model.encoder.layers.0.self_attn.k_proj.bias" not in ours.state_dict()
    assert ours.proj_out.weight is ours.model.decoder.embed_tokens.weight
    assert ours.get_output_embeddings() is ours.proj_out and ours.get_input_embeddings().padding_idx == PAD
    assert not ours.model.encoder.embed_positions.weight.requires_grad
    assert len(ours.blocks()) == 4 and ours.num_parameters() == hf.num_parameters()
    for name, tensor in hf.state_dict().items():
        assert torch.equal(ours.state_dict()[name], tensor), name


@pytest.mark.parametrize("padding", ["none", "right", "left"])
def test_logits_loss_and_every_gradient_match_transformers(checkpoint, padding):
    path, hf = checkpoint
    ours = load_whisper(path, dtype="float32", device="cpu")
    x = features()
    ids, mask, labels = text_batch(padding)
    hf.zero_grad(set_to_none=True)
    ref = hf(input_features=x, decoder_input_ids=ids, decoder_attention_mask=mask, labels=labels)
    with torch.no_grad():
        logits = ours(x, ids, labels=labels, decoder_attention_mask=mask).logits
        eager = make_hf("eager")  # matmul + softmax attention: an independent check of the same logits
        eager.load_state_dict(hf.state_dict())
        ref_eager = eager(input_features=x, decoder_input_ids=ids, decoder_attention_mask=mask, labels=labels).logits
    # Padded positions carry no label: their outputs are padding's own (right padding runs plain causal attention,
    # a leading pad position has no key to attend to). Every real position is compared.
    real = mask.bool() if mask is not None else torch.ones(labels.shape, dtype=torch.bool)
    assert rel_err(logits[real], ref.logits[real].detach()) <= 1e-5  # measured 0 (the same SDPA calls)
    assert rel_err(logits[real], ref_eager[real]) <= 1e-5
    out = ours(x, ids, labels=labels, decoder_attention_mask=mask)  # the training path: fused loss, no logits
    assert out.logits is None and out.num_tokens.item() == int((labels != -100).sum())
    assert abs(out.loss.item() - ref.loss.item()) <= 1e-5 * ref.loss.item()
    out.loss.backward()
    ref.loss.backward()
    theirs = dict(hf.named_parameters())
    checked = 0
    for name, p in ours.named_parameters():
        if name == "model.encoder.embed_positions.weight":
            assert p.grad is None and theirs[name].grad is None  # frozen sinusoids on both sides
            continue
        assert rel_err(p.grad, theirs[name].grad) <= 1e-5, (name, rel_err(p.grad, theirs[name].grad))  # ~7e-7
        checked += 1
    assert checked == len(list(ours.parameters())) - 1


def test_bf16_error_is_transformers_own(checkpoint):
    """In bf16 our logits are as far from the fp32 reference as transformers' own bf16 logits are."""
    path, hf = checkpoint
    x = features()
    ids, mask, _ = text_batch("left")
    real = mask.bool()
    theirs_bf16 = make_hf()
    theirs_bf16.load_state_dict(hf.state_dict())
    theirs_bf16.to(torch.bfloat16)
    with torch.no_grad():
        ref = hf(input_features=x, decoder_input_ids=ids, decoder_attention_mask=mask).logits
        theirs = theirs_bf16(input_features=x.bfloat16(), decoder_input_ids=ids, decoder_attention_mask=mask).logits
        ours = load_whisper(path, dtype="bfloat16", device="cpu")(x.bfloat16(), ids, decoder_attention_mask=mask).logits
    assert ours.dtype == torch.bfloat16
    assert rel_err(ours.float()[real], ref[real]) <= 1.25 * rel_err(theirs.float()[real], ref[real]) + 1e-4


def test_loss_reductions_and_the_fused_path(checkpoint):
    path, _ = checkpoint
    ours = load_whisper(path, dtype="float32", device="cpu")
    x = features()
    _, _, labels = text_batch("none")
    with torch.no_grad():
        mean = ours(x, labels=labels)
        total = ours(x, labels=labels, reduction="sum")
        each = ours(x, labels=labels, reduction="none")
    fused = ours(x, labels=labels)  # gradients on: the chunked loss, no logits built
    assert fused.logits is None and mean.logits.shape == (3, 9, TINY["vocab_size"])
    assert abs(fused.loss.item() - mean.loss.item()) <= 1e-6 * mean.loss.item()
    assert abs(total.loss.item() - mean.loss.item() * mean.num_tokens.item()) <= 1e-4
    assert each.loss.shape == labels.shape and bool((each.loss[labels == -100] == 0).all())
    assert abs(each.loss.sum().item() - total.loss.item()) <= 1e-4
    fused_each = ours(x, labels=labels, reduction="none")  # per position without logits (preference-style use)
    assert rel_err(fused_each.loss.detach(), each.loss) <= 1e-6
    fused_each.loss.sum().backward()
    assert ours.proj_out.weight.grad is not None
    shifted = decoder_input_ids_from_labels(labels, START, PAD)
    assert shifted[:, 0].eq(START).all() and torch.equal(shifted[:2, 1:], labels[:2, :-1])
    assert shifted[2, 7].item() == PAD  # an ignored label reads as padding
    encoded = ours.encode(x)
    with torch.no_grad():
        again = ours(decoder_input_ids=shifted, encoder_hidden_states=encoded, labels=labels)
    assert again.loss.item() == mean.loss.item()


def _gradients(model, x, labels, seed=5):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    out = model(x, labels=labels)
    out.loss.backward()
    return out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_dropout_replays_and_checkpointing_gives_the_same_gradients(checkpoint):
    path, _ = checkpoint
    loaded = load_whisper(path, dtype="float32", device="cpu")
    config = {**loaded.args.to_dict(), "dropout": 0.1, "attention_dropout": 0.1, "activation_dropout": 0.1}
    ours = Whisper(WhisperArgs.from_dict(config))
    ours.load_state_dict(loaded.state_dict())
    ours.train()
    x = features(batch=2)
    labels = text_batch("none")[2][:2]
    plain_loss, plain = _gradients(ours, x, labels)
    again_loss, _ = _gradients(ours, x, labels)
    assert plain_loss == again_loss  # dropout draws from torch's RNG only: a reseed replays it
    with torch.no_grad():
        assert abs(ours.eval()(x, labels=labels).loss.item() - plain_loss.item()) > 1e-4  # dropout is on in training
    ours.train()
    for mode in (True, "offload"):
        ours.gradient_checkpointing_enable({"offload": mode == "offload"})
        assert ours.is_gradient_checkpointing
        loss, grads = _gradients(ours, x, labels)
        assert loss == plain_loss and grads.keys() == plain.keys()
        for name, g in grads.items():
            assert rel_err(g, plain[name]) <= 1e-6 or (g - plain[name]).norm() <= 1e-9, (mode, name)
    ours.gradient_checkpointing_disable()
    assert not ours.is_gradient_checkpointing
    with pytest.raises(ValueError, match="gradient checkpointing"):
        ours.set_gradient_checkpointing("sometimes")


def test_layerdrop_skips_the_layers_transformers_skips(checkpoint):
    """LayerDrop draws one number per layer from torch's RNG, in transformers' order: the same seed skips the same
    layers (here 0.5 per layer: most seeds skip some, and the losses move)."""
    path, hf = checkpoint
    loaded = load_whisper(path, dtype="float32", device="cpu")
    ours = Whisper(WhisperArgs.from_dict({**loaded.args.to_dict(), "encoder_layerdrop": 0.5, "decoder_layerdrop": 0.5}))
    ours.load_state_dict(loaded.state_dict())
    theirs = make_hf(encoder_layerdrop=0.5, decoder_layerdrop=0.5)
    theirs.load_state_dict(hf.state_dict())
    ours.train()
    theirs.train()
    x = features(batch=2)
    labels = text_batch("none")[2][:2]
    losses = set()
    with torch.no_grad():
        for seed in range(6):
            torch.manual_seed(seed)
            mine = ours(x, labels=labels).loss.item()
            torch.manual_seed(seed)
            assert abs(mine - theirs(input_features=x, labels=labels).loss.item()) <= 1e-5 * mine, seed
            losses.add(round(mine, 4))
    assert len(losses) >= 3


def test_freeze_encoder_trains_the_decoder_only(checkpoint):
    path, _ = checkpoint
    ours = load_whisper(path, dtype="float32", device="cpu")
    ours.freeze_encoder()
    ours(features(batch=1), labels=text_batch("none")[2][:1]).loss.backward()
    grads = {n for n, p in ours.named_parameters() if p.grad is not None}
    assert grads and not any(n.startswith("model.encoder.") for n in grads)
    assert "model.decoder.layers.1.encoder_attn.k_proj.weight" in grads


def test_lora_on_q_and_v_matches_peft_and_a_merged_transformers_model(checkpoint):
    peft = pytest.importorskip("peft")
    path, hf = checkpoint
    ours = vt.add_lora(load_whisper(path, dtype="float32", device="cpu"), r=4, alpha=8, targets=["q_proj", "v_proj"],
                       seed=0)
    names = set(lora_layers(ours))
    assert len(names) == 12  # encoder self-attention, decoder self- and cross-attention: q and v of each layer
    assert {n.rsplit(".", 2)[-2] for n in names} == {"self_attn", "encoder_attn"}
    assert set(ours.lora_settings.targets) == names
    with torch.no_grad():
        for layer in lora_layers(ours).values():
            layer.lora_B.weight.normal_(0.0, 0.2)  # B starts at zero: make the adapters count
    x = features(batch=2)
    labels = text_batch("none")[2][:2]
    out = ours(x, labels=labels, return_logits=True)
    out.loss.backward()
    trained = {n for n, p in ours.named_parameters() if p.grad is not None}
    assert trained and all("lora_" in n for n in trained)
    merged = make_hf()
    merged.load_state_dict(merged_state_dict(ours))
    with torch.no_grad():
        assert rel_err(out.logits, merged(input_features=x, labels=labels).logits) <= 1e-5
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    theirs = peft.get_peft_model(make_hf(), config)
    state = {n.replace(".lora_A.", ".lora_A.default.").replace(".lora_B.", ".lora_B.default."): p
             for n, p in ours.named_parameters() if "lora_" in n}
    theirs.base_model.model.load_state_dict(state, strict=False)
    ref = theirs(input_features=x, labels=labels)
    ref.loss.backward()
    assert rel_err(out.logits, ref.logits.detach()) <= 1e-5
    peft_grads = {n.removeprefix("base_model.model.").replace(".default.", "."): p.grad
                  for n, p in theirs.named_parameters() if p.grad is not None}
    assert set(peft_grads) == trained
    for name, p in ours.named_parameters():
        if name in trained:
            assert rel_err(p.grad, peft_grads[name]) <= 1e-5, name
    with pytest.raises(UnsupportedError, match="LoRA"):
        save_whisper(ours, path.parent / "lora-out")
    all_linear = vt.add_lora(load_whisper(path, dtype="float32", device="cpu"), r=2, targets="all-linear")
    assert "proj_out" not in lora_layers(all_linear) and len(lora_layers(all_linear)) == 2 * 6 + 2 * 10


def _greedy_reference(hf, x, prompt, steps, eos=None):
    """transformers' forward over the whole sequence at every step, no cache: the plainest greedy loop."""
    ids, finished = prompt.clone(), torch.zeros(len(prompt), dtype=torch.bool)
    with torch.no_grad():
        for _ in range(steps):
            nxt = hf(input_features=x, decoder_input_ids=ids).logits[:, -1].argmax(-1)
            if eos is not None:
                nxt = torch.where(finished, torch.full_like(nxt, PAD), nxt)
                finished |= nxt == eos
            ids = torch.cat([ids, nxt[:, None]], dim=1)
            if eos is not None and finished.all():
                break
    return ids[:, prompt.shape[1]:]


def test_greedy_decoding_matches_transformers(checkpoint):
    from transformers.models.whisper.generation_whisper import WhisperGenerationMixin
    path, hf = checkpoint
    ours = load_whisper(path, dtype="float32", device="cpu")
    x = features(batch=3, seed=11)
    prompt = torch.tensor([[START, 5, 6]] * 3)
    free = transcribe_ids(ours, x, [START, 5, 6], max_new_tokens=12)
    assert free.shape == (3, 12)
    assert torch.equal(free, _greedy_reference(hf, x, prompt, 12))
    assert len({tuple(r) for r in free.tolist()}) == 3 and len(set(free[0].tolist())) > 2  # not a constant output
    # An end token that row 1 produces at its 4th step and row 0 never does: rows end at different steps.
    eos = free[1, 3].item()
    assert eos not in free[1, :3].tolist() and eos not in free[0].tolist()
    ended = transcribe_ids(ours, x, prompt, max_new_tokens=12, eos_id=eos)
    assert torch.equal(ended, _greedy_reference(hf, x, prompt, 12, eos))
    assert ended[1, 3].item() == eos and bool((ended[1, 4:] == PAD).all()) and torch.equal(ended[0], free[0])
    generated = super(WhisperGenerationMixin, hf).generate(input_features=x, decoder_input_ids=prompt,
                                                           do_sample=False, num_beams=1, max_new_tokens=12,
                                                           eos_token_id=eos, pad_token_id=PAD)
    assert torch.equal(ended, generated[:, prompt.shape[1]:])
    whisper_generate = hf.generate(input_features=x, decoder_input_ids=prompt, max_new_tokens=12)
    assert torch.equal(transcribe_ids(ours, x, prompt, 12, eos_id=TINY["eos_token_id"]), whisper_generate)
    # One utterance alone (no batch dimension) decodes as its row of the batch: nothing crosses rows.
    assert torch.equal(transcribe_ids(ours, x[2], [START, 5, 6], max_new_tokens=12), free[2:3])
    with pytest.raises(ValueError, match="max_target_positions"):
        transcribe_ids(ours, x, prompt, max_new_tokens=30)


def test_save_and_reload_both_ways(checkpoint, tmp_path):
    from transformers import WhisperForConditionalGeneration, WhisperModel
    path, hf = checkpoint
    ours = load_whisper(path, dtype="float32", device="cpu")
    out = save_whisper(ours, tmp_path / "saved")
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["WhisperForConditionalGeneration"] and config["d_model"] == TINY["d_model"]
    assert (out / "generation_config.json").is_file() == (path / "generation_config.json").is_file()
    back = WhisperForConditionalGeneration.from_pretrained(str(out)).eval()
    for name, tensor in hf.state_dict().items():
        assert torch.equal(back.state_dict()[name], tensor), name
    again = load_whisper(out, dtype="float32", device="cpu")
    x = features(batch=2)
    _, _, labels = text_batch("none")
    with torch.no_grad():
        assert torch.equal(again(x, labels=labels[:2]).logits, ours(x, labels=labels[:2]).logits)
    with pytest.raises(CheckpointError, match="not empty"):
        save_whisper(ours, out)
    # A WhisperModel (base, no head) checkpoint: `encoder.*` / `decoder.*` names, the head tied.
    base = WhisperModel(hf.config)
    base.load_state_dict(hf.model.state_dict())
    base.save_pretrained(str(tmp_path / "base"))
    from_base = load_whisper(tmp_path / "base", dtype="float32", device="cpu")
    with torch.no_grad():
        assert torch.equal(from_base(x, labels=labels[:2]).logits, ours(x, labels=labels[:2]).logits)


def test_untied_head_loads_and_matches(tmp_path):
    hf = make_hf(tie_word_embeddings=False)
    assert hf.proj_out.weight.data_ptr() != hf.model.decoder.embed_tokens.weight.data_ptr()
    hf.save_pretrained(str(tmp_path))
    ours = load_whisper(tmp_path, dtype="float32", device="cpu")
    assert ours.proj_out.weight is not ours.model.decoder.embed_tokens.weight
    assert "proj_out.weight" in ours.state_for_saving()
    x = features(batch=2)
    ids = torch.tensor([[START, 3, 4, 5]] * 2)
    with torch.no_grad():
        assert rel_err(ours(x, ids).logits, hf(input_features=x, decoder_input_ids=ids).logits) <= 1e-5


def _edited(checkpoint, tmp_path, edit_config=None, edit_state=None):
    import shutil

    from safetensors.torch import load_file, save_file
    path, _ = checkpoint
    shutil.copytree(path, tmp_path / "edited")
    path = tmp_path / "edited"
    if edit_config is not None:
        config = json.loads((path / "config.json").read_text())
        edit_config(config)
        (path / "config.json").write_text(json.dumps(config))
    if edit_state is not None:
        state = load_file(str(path / "model.safetensors"))
        edit_state(state)
        save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})
    return path


@pytest.mark.parametrize("edit, error, words", [
    (lambda c: c.update(dropout=1.5), CheckpointError, "'dropout' must be a probability"),
    (lambda c: c.update(decoder_layers=7), CheckpointError, "decoder_layers is 7 but the weights hold 2"),
    (lambda c: c.update(activation_function="mish"), UnsupportedError, "activation_function 'mish'"),
    (lambda c: c.update(decoder_start_token_id=500), CheckpointError, "'decoder_start_token_id' must be null"),
    (lambda c: c.update(d_model=66), CheckpointError, "multiple of encoder_attention_heads"),
    (lambda c: c.update(model_type="llama"), UnsupportedError, "'llama' is not a speech-to-text model"),
])
def test_bad_config_fields_are_named(checkpoint, tmp_path, edit, error, words):
    with pytest.raises(error, match="config.json") as err:
        load_whisper(_edited(checkpoint, tmp_path, edit_config=edit))
    assert words in str(err.value)


def test_checkpoint_errors_name_the_tensor(checkpoint, tmp_path):
    missing = _edited(checkpoint, tmp_path, edit_state=lambda s: s.pop("model.decoder.layers.1.fc2.bias"))
    with pytest.raises(CheckpointError, match=r"'model\.decoder\.layers\.1\.fc2\.bias' missing"):
        load_whisper(missing)

    def shrink(state):
        state["model.encoder.layers.0.fc1.weight"] = torch.zeros(40, 64)
    (tmp_path / "edited").rename(tmp_path / "first")
    wrong = _edited(checkpoint, tmp_path, edit_state=shrink)
    with pytest.raises(CheckpointError, match=r"model\.safetensors: tensor 'model\.encoder\.layers\.0\.fc1\.weight' "
                                              r"has shape \[40, 64\] but config\.json implies \[96, 64\]"):
        load_whisper(wrong)


def test_bad_inputs_are_refused(checkpoint):
    path, _ = checkpoint
    ours = load_whisper(path, dtype="float32", device="cpu")
    with pytest.raises(ValueError, match=r"\[batch, 16 mel bins, 128 frames\]"):
        ours(torch.zeros(1, 16, 100), torch.tensor([[START]]))
    with pytest.raises(ValueError, match="more than the 32 of this model"):
        ours(features(1), labels=torch.zeros(1, 33, dtype=torch.long))
    with pytest.raises(ValueError, match="decoder_input_ids or labels"):
        ours(features(1))
    with pytest.raises(ValueError, match="prompt_ids"):
        transcribe_ids(ours, features(2), torch.zeros(3, 2, dtype=torch.long), max_new_tokens=2)
    with pytest.raises(TypeError, match="velotune Whisper"):
        transcribe_ids(torch.nn.Linear(2, 2), features(1), [START], max_new_tokens=2)


def test_a_merged_export_of_a_whisper_adapter_loads_in_transformers_with_the_adapters_generation_config(
        checkpoint, tmp_path):
    """`velotune export BASE --adapter DIR --format merged`: transformers reads the merged Whisper and gives the
    adapted model's logits; the adapter's generation_config.json (a speech run's language and task) and the
    base's preprocessor_config.json come along; GGUF is refused for a speech model."""
    import subprocess
    import sys

    from transformers import WhisperForConditionalGeneration

    from velotune.lora import save_adapter
    path, _ = checkpoint
    (path / "preprocessor_config.json").write_text(json.dumps({"feature_size": TINY["num_mel_bins"]}))
    model = load_whisper(path)
    vt.add_lora(model, r=4, alpha=8, targets=["q_proj", "v_proj"])
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.weight.normal_(0, 0.2)
    adapter = save_adapter(model, tmp_path / "adapter")
    (Path(adapter) / "generation_config.json").write_text(json.dumps({"decoder_start_token_id": START,
                                                                       "language": "en", "task": "transcribe"}))
    run = subprocess.run([sys.executable, "-m", "velotune", "export", str(path), "--adapter", str(adapter),
                          "--format", "merged", "--out", str(tmp_path / "merged")], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    merged = WhisperForConditionalGeneration.from_pretrained(str(tmp_path / "merged")).eval()
    x, ids = features(2), torch.tensor([[START, 5, 6], [START, 7, 8]])
    with torch.no_grad():
        assert rel_err(merged(input_features=x, decoder_input_ids=ids).logits, model.eval()(x, ids).logits) < 1e-5
    assert json.loads((tmp_path / "merged" / "generation_config.json").read_text())["task"] == "transcribe"
    assert (tmp_path / "merged" / "preprocessor_config.json").is_file()
    run = subprocess.run([sys.executable, "-m", "velotune", "export", str(path), "--format", "gguf", "--out",
                          str(tmp_path / "w.gguf")], capture_output=True, text=True)
    assert run.returncode != 0 and "GGUF export is for language models" in run.stderr


def test_vt_load_and_save_route_whisper(checkpoint, tmp_path):
    """vt.load / vt.save take a Whisper directory as load_whisper / save_whisper do (no tokenizer files here)."""
    import velotune as vt
    from velotune.models.registry import SPEECH_SEQ2SEQ
    path, hf = checkpoint
    model, tokenizer = vt.load(str(path), dtype="float32", device="cpu")
    assert model.task == SPEECH_SEQ2SEQ and tokenizer is None
    vt.save(model, None, tmp_path / "again")
    again, _ = vt.load(str(tmp_path / "again"), dtype="float32", device="cpu")
    x, labels = features(1), torch.tensor([[11, 12, 13, 209]])
    with torch.no_grad():
        assert torch.equal(again(x, labels=labels).logits, model(x, labels=labels).logits)
    with pytest.raises(vt.VelotuneError, match="unquantized"):
        vt.load(str(path), quantize="nf4")
