"""Parity of velotune's Gemma 3 with images (velotune.models.vision.gemma3 on models/gemma3.py) with transformers'
Gemma3ForConditionalGeneration on tiny random checkpoints, fp32: logits, loss and every parameter's gradient, text
only and with images (two in one row, one in a right-padded row), the image runs' bidirectional attention under a
sliding window shorter than a run, two image sizes (one per checkpoint: Gemma 3's tower has a fixed size);
checkpoint names both ways; vt.load / vt.save and transformers reading our save; the data and config errors.
"""
import json

import pytest
import torch
from safetensors.torch import load_file

import velotune as vt
from velotune.errors import CheckpointError, DataError, UnsupportedError
from velotune.models.registry import IMAGE_TEXT, architecture
from velotune.models.vision import gemma3

VOCAB, IMAGE, PAD = 211, 210, 3
TEXT = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=112, num_attention_heads=4, num_key_value_heads=2,
            head_dim=24, max_position_embeddings=256, rms_norm_eps=1e-6, query_pre_attn_scalar=16,
            rope_theta=10000.0, rope_local_base_freq=100.0, rope_scaling={"rope_type": "linear", "factor": 4.0},
            pad_token_id=PAD, eos_token_id=1, bos_token_id=2, num_hidden_layers=3, sliding_window_pattern=2)
VISION = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2, patch_size=4)
# case -> (top-level overrides, text overrides, vision overrides). "tied": 16-pixel images, 4 tokens each, a
# window of 3 (shorter than an image run), no pooling head; "untied": 24-pixel images, 9 tokens each, window 5,
# SigLIP's pooling head kept (unused), final soft-capping set (transformers' multimodal class never applies it).
CASES = {
    "tied": (dict(mm_tokens_per_image=4), dict(sliding_window=3), dict(image_size=16, vision_use_head=False)),
    "untied": (dict(mm_tokens_per_image=9, tie_word_embeddings=False),
               dict(sliding_window=5, final_logit_softcapping=2.0), dict(image_size=24)),
}
# Measured on this machine (fp32, one thread), both cases, over real positions: text only, logits and loss equal,
# gradients <= 2.4e-7 abs / 8.7e-7 relative; with images, logits <= 3.2e-7 abs / 3.7e-7 relative, loss <= 4.8e-7
# (~5.4), gradients <= 5.3e-7 abs / 1.7e-6 relative (per parameter). The bound applies to both abs and relative.
TOL = 1e-5


def rel(a, b):
    return ((a - b).norm() / b.norm().clamp(min=1e-30)).item()


def make_hf(case):
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration
    top, text, vision = CASES[case]
    torch.manual_seed(1234)
    config = Gemma3Config(text_config=dict(TEXT, **text), vision_config=dict(VISION, **vision),
                          image_token_index=IMAGE, boi_token_index=208, eoi_token_index=209, **top)
    model = Gemma3ForConditionalGeneration(config)
    with torch.no_grad():  # norms off Gemma's zeros / LayerNorm's ones, the projection off its zeros
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.normal_(0.0 if "language_model" in name or "mm_soft" in name else 0.5, 0.1)
            elif "mm_input_projection" in name:
                p.normal_(0.0, 0.2)
    return model.eval()


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    built = {}

    def get(case):
        if case not in built:
            hf = make_hf(case)
            path = tmp_path_factory.mktemp("gemma3") / case
            hf.save_pretrained(str(path))
            built[case] = path, hf
        return built[case]
    return get


@pytest.fixture(params=list(CASES))
def checkpoint(request, saved):
    return saved(request.param)


def load(path):
    return vt.load(path, dtype="float32", device="cpu")[0]


def batch(t, seed=5, images=True):
    """Row 0: text, image, text, image, text. Row 1: text, image, text, then right padding (without images: the
    image tokens are text). Labels skip the padding and the image tokens."""
    g = torch.Generator().manual_seed(seed)
    length = 5 + t + 3 + t + 2
    ids = torch.randint(4, IMAGE - 3, (2, length), generator=g)
    if images:
        ids[0, 5:5 + t] = IMAGE
        ids[0, 8 + t:8 + 2 * t] = IMAGE
        ids[1, 4:4 + t] = IMAGE
    mask = torch.ones_like(ids)
    mask[1, 4 + t + 3:] = 0
    ids[mask == 0] = PAD
    ids[0, 2] = PAD  # the pad row gets no gradient in transformers: nor in ours
    labels = ids.masked_fill((mask == 0) | (ids == IMAGE), -100)
    return ids, mask, labels


def pixels(hf, n=3, seed=9):
    size = hf.config.vision_config.image_size
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def compare(ours, hf, ids, mask, labels, **images):
    """Logits at real positions, loss and every gradient: (max abs logits, loss diff, max abs grad, max rel)."""
    token_types = (ids == IMAGE).long()
    ref_inputs = dict(images, token_type_ids=token_types) if images else {}
    hf.zero_grad(set_to_none=True)
    ours.zero_grad(set_to_none=True)
    ref = hf(input_ids=ids, attention_mask=mask, labels=labels, **ref_inputs)
    with torch.no_grad():
        logits = ours(ids, attention_mask=mask, **images).logits
    real = mask.bool()
    diffs = {"logits": (logits[real] - ref.logits[real]).abs().max().item(),
             "logits_rel": rel(logits[real], ref.logits[real])}
    out = ours(ids, labels=labels, attention_mask=mask, **images)
    diffs["loss"] = abs(out.loss.item() - ref.loss.item())
    out.loss.backward()
    ref.loss.backward()
    theirs = {gemma3.Model.our_name(n): p for n, p in hf.named_parameters()}
    mine = dict(ours.named_parameters())
    assert set(mine) == set(theirs)
    grad_abs = grad_rel = 0.0
    for name, p in mine.items():
        if p.grad is None:
            assert theirs[name].grad is None or not theirs[name].grad.any(), name
            continue
        grad_abs = max(grad_abs, (p.grad - theirs[name].grad).abs().max().item())
        if name.endswith("k_proj.bias"):  # zero but for rounding (a key bias shifts a whole softmax row): no ratio
            assert p.grad.abs().max().item() < 1e-7, name
            continue
        grad_rel = max(grad_rel, rel(p.grad, theirs[name].grad))
    diffs.update(grad=grad_abs, grad_rel=grad_rel)
    return diffs, ref, logits


def test_registry_and_vt_load_give_our_model(saved):
    path, _ = saved("tied")
    assert architecture("gemma3", IMAGE_TEXT) is gemma3
    model = load(path)
    assert isinstance(model, gemma3.Model) and model.args.tie_word_embeddings
    assert model.language_model.lm_head.weight is model.language_model.model.embed_tokens.weight


def test_text_only_logits_loss_and_every_gradient_match_transformers(checkpoint):
    path, hf = checkpoint
    ours = load(path)
    ids, mask, labels = batch(ours.args.tokens_per_image, images=False)
    diffs, _, _ = compare(ours, hf, ids, mask, labels)
    assert diffs["logits_rel"] <= TOL and diffs["logits"] <= TOL and diffs["loss"] <= TOL, diffs
    assert diffs["grad_rel"] <= TOL and diffs["grad"] <= TOL, diffs
    assert all(p.grad is None for n, p in ours.named_parameters() if not n.startswith("language_model."))


def test_images_logits_loss_and_every_gradient_match_transformers(checkpoint):
    path, hf = checkpoint
    ours = load(path)
    ids, mask, labels = batch(ours.args.tokens_per_image)
    images = pixels(hf)
    diffs, ref, logits = compare(ours, hf, ids, mask, labels, pixel_values=images)
    assert diffs["logits_rel"] <= TOL and diffs["logits"] <= TOL and diffs["loss"] <= TOL, diffs
    assert diffs["grad_rel"] <= TOL and diffs["grad"] <= TOL, diffs
    assert ours.vision_tower.encoder.layers[0].self_attn.q_proj.weight.grad is not None
    assert ours.multi_modal_projector.mm_input_projection_weight.grad is not None
    real = mask.bool()
    with torch.no_grad():
        # The image rule is in force: transformers without token_type_ids (plain causal) differs from both.
        causal = hf(input_ids=ids, attention_mask=mask, pixel_values=images).logits
        assert (causal[real] - ref.logits[real]).abs().max().item() > 1e-3
        # The processor's type ids, when given, say the same as the image tokens.
        marked = ours(ids, attention_mask=mask, pixel_values=images, token_type_ids=(ids == IMAGE).long()).logits
        assert torch.equal(marked, logits)
        # Each image at its own placeholders: swapping the first two moves row 0 only.
        swapped = ours(ids, attention_mask=mask, pixel_values=images[[1, 0, 2]]).logits
        assert (swapped[0] - logits[0]).abs().max().item() > 1e-3
        assert torch.allclose(swapped[1][real[1]], logits[1][real[1]], atol=1e-6)


def test_a_deep_copy_keeps_its_own_image_rule(saved):
    """The rule's hook is a bound method: a copy (a reference model for preference training) must use its own."""
    import copy
    path, hf = saved("tied")
    ours = load(path)
    twin = copy.deepcopy(ours)
    hooks = list(twin.language_model.model._forward_pre_hooks.values())
    assert len(hooks) == 1 and hooks[0].__self__ is twin
    ids, mask, _ = batch(ours.args.tokens_per_image)
    with torch.no_grad():
        assert torch.equal(twin(ids, attention_mask=mask, pixel_values=pixels(hf)).logits,
                           ours(ids, attention_mask=mask, pixel_values=pixels(hf)).logits)


def test_checkpointing_keeps_the_image_rule_and_the_gradients(saved):
    path, hf = saved("tied")
    ours = load(path).train()
    ids, mask, labels = batch(ours.args.tokens_per_image)
    images = pixels(hf)
    grads = []
    for mode in (False, True):
        ours.zero_grad(set_to_none=True)
        ours.set_gradient_checkpointing(mode)
        ours(ids, labels=labels, attention_mask=mask, pixel_values=images).loss.backward()
        grads.append({n: p.grad.clone() for n, p in ours.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for name, g in grads[0].items():
        assert torch.allclose(g, grads[1][name], atol=1e-7), name


def test_checkpoint_names_round_trip(checkpoint):
    path, hf = checkpoint
    ours = load(path)
    tensors = load_file(str(path / "model.safetensors"))
    saved = ours.state_for_saving()
    assert set(saved) == set(tensors)
    assert ("language_model.lm_head.weight" in tensors) == (not ours.args.tie_word_embeddings)
    for name, tensor in tensors.items():
        assert torch.equal(saved[name], tensor), name
    # The hub's spelling (a `vision_model` level inside the tower) and transformers 5's in-memory names.
    hub = {k.replace("vision_tower.", "vision_tower.vision_model.", 1): v for k, v in tensors.items()}
    assert any(k.startswith("vision_tower.vision_model.encoder.") for k in hub)
    for spelling in (hub, hf.state_dict()):
        other = gemma3.Model(ours.args)
        other.load_state_dict({gemma3.Model.our_name(k): v for k, v in spelling.items()},
                              strict=not ours.args.tie_word_embeddings)
        if ours.args.tie_word_embeddings:
            other.tie_weights()
        for name, tensor in ours.state_dict().items():
            assert torch.equal(other.state_dict()[name], tensor), name
    assert ours.part_of("vision_tower.encoder.layers.0.mlp.fc1.weight") == "vision"
    assert ours.part_of("multi_modal_projector.mm_input_projection_weight") == "projector"
    assert ours.part_of("language_model.model.layers.0.mlp.up_proj.weight") == "language"


def test_vt_save_is_read_back_by_transformers_and_by_us(saved, tmp_path):
    from transformers import Gemma3ForConditionalGeneration
    path, hf = saved("untied")
    ours = load(path)
    out = tmp_path / "saved"
    vt.save(ours, None, out)
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["Gemma3ForConditionalGeneration"] and config["model_type"] == "gemma3"
    ids, mask, _ = batch(ours.args.tokens_per_image)
    images = pixels(hf)
    again = Gemma3ForConditionalGeneration.from_pretrained(str(out), dtype=torch.float32).eval()
    ours_again = load(out)
    with torch.no_grad():
        token_types = (ids == IMAGE).long()
        expected = hf(input_ids=ids, attention_mask=mask, pixel_values=images, token_type_ids=token_types).logits
        theirs = again(input_ids=ids, attention_mask=mask, pixel_values=images, token_type_ids=token_types).logits
        mine = ours_again(ids, attention_mask=mask, pixel_values=images).logits
    real = mask.bool()
    assert torch.equal(theirs, expected)
    assert (mine[real] - expected[real]).abs().max().item() <= TOL
    # The hub's files spell the tower `vision_tower.vision_model.*`: vt.load reads them too.
    from safetensors.torch import save_file
    hub = tmp_path / "hub"
    hub.mkdir()
    (hub / "config.json").write_text((out / "config.json").read_text())
    tensors = load_file(str(path / "model.safetensors"))
    save_file({k.replace("vision_tower.", "vision_tower.vision_model.", 1): v for k, v in tensors.items()},
              str(hub / "model.safetensors"))
    from_hub = load(hub)
    for name, tensor in ours.state_dict().items():
        assert torch.equal(from_hub.state_dict()[name], tensor), name


def test_data_errors(saved):
    path, hf = saved("tied")
    ours = load(path)
    ids, _, _ = batch(ours.args.tokens_per_image)
    with torch.no_grad():
        short = ids.clone()
        short[0, 5] = 7  # one image placeholder fewer than the images' features
        with pytest.raises(DataError, match="image token"):
            ours(short, pixel_values=pixels(hf))
        with pytest.raises(DataError, match="no images"):
            ours(ids)
        with pytest.raises(DataError, match="image_size|size"):
            ours(ids, pixel_values=torch.randn(3, 3, 20, 20))
        with pytest.raises(DataError, match="token_type_ids"):
            ours(ids, pixel_values=pixels(hf), token_type_ids=(ids == IMAGE).long()[:, :-1])


def test_config_errors(saved):
    path, _ = saved("tied")
    file = path / "config.json"
    config = json.loads(file.read_text())
    with pytest.raises(CheckpointError, match=r"mm_tokens_per_image"):
        gemma3.Args.from_dict(dict(config, mm_tokens_per_image=3), source=str(file))
    with pytest.raises(CheckpointError, match=r"mm_tokens_per_image"):
        gemma3.Args.from_dict(dict(config, mm_tokens_per_image=9), source=str(file))  # 3 does not pool 4 evenly
    with pytest.raises(UnsupportedError, match=rf"{file}: the image token id 300"):
        gemma3.Args.from_dict(dict(config, image_token_index=300), source=str(file))
    with pytest.raises(UnsupportedError, match="text_config.model_type"):
        gemma3.Args.from_dict(dict(config, text_config=dict(config["text_config"], model_type="llama")),
                              source=str(file))
    with pytest.raises(UnsupportedError, match="vision_config.model_type"):
        gemma3.Args.from_dict(dict(config, vision_config=dict(config["vision_config"], model_type="clip_vision_model")),
                              source=str(file))
    args = gemma3.Args.from_dict({k: v for k, v in config.items() if k != "tie_word_embeddings"}, source=str(file))
    assert args.tie_word_embeddings  # Gemma3Config's default


def test_greedy_generation_with_images_matches_transformers(saved):
    """The KV cache path: the prompt's one forward (images, the image rule, left padding), then cached steps,
    against transformers' generate with the processor's token_type_ids; the step logits too."""
    from velotune.infer.decoder import Decoder
    from velotune.infer.sampling import SamplingParams
    path, hf = saved("tied")
    ours = load(path)
    ids, mask, _ = batch(ours.args.tokens_per_image)
    ids, mask = ids[[1, 0]], mask[[1, 0]]          # the padded row first, its padding moved to the left
    ids[0], mask[0] = ids[0].roll(int((mask[0] == 0).sum())), mask[0].roll(int((mask[0] == 0).sum()))
    images = pixels(hf)[[2, 0, 1]]                 # the images in the order of their placeholders
    new = 5
    ref = hf.generate(input_ids=ids, attention_mask=mask, pixel_values=images, token_type_ids=(ids == IMAGE).long(),
                      max_new_tokens=new, do_sample=False, output_logits=True, return_dict_in_generate=True,
                      eos_token_id=None, pad_token_id=PAD)
    decoder = Decoder(ours, ids, mask, SamplingParams(max_new_tokens=new, ignore_eos=True), eos_token_ids=[],
                      return_logits=True, image_inputs={"pixel_values": images})
    for _ in decoder.steps():
        pass
    assert decoder.output().tokens == ref.sequences[:, ids.shape[1]:].tolist()
    assert len(decoder.step_logits) == len(ref.logits) == new
    for step, theirs in zip(decoder.step_logits, ref.logits):
        assert (step.float() - theirs).abs().max().item() <= TOL
