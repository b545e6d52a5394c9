"""Parity of velotune's LLaVA (velotune.models.vision.llava, towers.py) with transformers'
LlavaForConditionalGeneration on tiny random models: a CLIP tower with a Llama decoder and a SigLIP tower with a
Qwen2 decoder, vision_feature_layer an index and a list, the "default" and "full" strategies. fp32 logits, loss and
every parameter's gradient over a batch of two rows (two images in the first, one in the second, right padding);
checkpoint names both ways (the file transformers writes, the hub's llava-hf spelling, transformers 5's in-memory
names); vision checkpointing; the data and config errors.
"""
import json

import pytest
import torch
from safetensors.torch import load_file

from velotune.errors import CheckpointError, DataError, UnsupportedError
from velotune.models.registry import IMAGE_TEXT, architecture
from velotune.models.vision import llava

VOCAB, IMAGE, PAD = 128, 127, 1
TEXT = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, pad_token_id=PAD, rms_norm_eps=1e-6)
VISION = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=2, image_size=16,
              patch_size=4)
# case -> (tower type, text type, top-level overrides): what each exercises is in its name.
CASES = {
    "clip_llama_layer-2_default": ("clip_vision_model", "llama", dict(vision_feature_layer=-2)),
    "siglip_qwen2_list_full": ("siglip_vision_model", "qwen2",
                               dict(vision_feature_layer=[-3, -1], vision_feature_select_strategy="full")),
    "clip_llama_tied_list_full_nobias": ("clip_vision_model", "llama",
                                         dict(vision_feature_layer=[0, -2], vision_feature_select_strategy="full",
                                              multimodal_projector_bias=False, projector_hidden_act="quick_gelu",
                                              text_tie=True)),
    "siglip_qwen2_layer-1_default": ("siglip_vision_model", "qwen2", dict(vision_feature_layer=-1)),
}
# Measured on this machine (fp32, one thread): max |ours - transformers| over real positions' logits and over
# every gradient, all cases: logits 0 (the same SDPA and matmul calls), loss <= 9.6e-7 (our fused chunked loss;
# the loss is ~4.9), gradients <= 2.1e-7 (largest gradient ~0.4).
TOL = 1e-5


def make_hf(case):
    from transformers import LlavaConfig, LlavaForConditionalGeneration
    tower, text_type, top = CASES[case]
    top = dict(top)
    text = dict(TEXT, model_type=text_type, tie_word_embeddings=top.pop("text_tie", False))
    torch.manual_seed(1234)
    config = LlavaConfig(text_config=text, vision_config=dict(VISION, model_type=tower), image_token_index=IMAGE,
                         **top)
    model = LlavaForConditionalGeneration(config)
    with torch.no_grad():  # norms and biases off their ones / zeros init, which would hide a wrong convention
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.normal_(1.0 if "norm" in name and name.endswith("weight") else 0.0, 0.1)
    return model.eval()


def load_ours(path, hf_keys=None):
    """The recipe of the loader (files.py): Args from config.json, our names for the file's tensors, strict."""
    cfg = json.loads((path / "config.json").read_text())
    ours = llava.Model(llava.Args.from_dict(cfg, source=str(path / "config.json")))
    tensors = load_file(str(path / "model.safetensors"))
    state = {llava.Model.our_name(k): v for k, v in tensors.items()}
    missing, unexpected = ours.load_state_dict(state, strict=False)
    tied = ["language_model.lm_head.weight"] if ours.args.tie_word_embeddings else []
    assert sorted(missing) == tied and not unexpected, (missing, unexpected)
    return ours.eval(), tensors


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """case -> (case, checkpoint dir, transformers model), each built and saved once."""
    built = {}

    def get(case):
        if case not in built:
            hf = make_hf(case)
            path = tmp_path_factory.mktemp("llava") / case
            hf.save_pretrained(str(path))
            built[case] = case, path, hf
        return built[case]
    return get


@pytest.fixture(params=list(CASES))
def checkpoint(request, saved):
    return saved(request.param)


def batch(tokens_per_image, seed=5):
    """Row 0: text, image, text, image, text. Row 1: text, image, text, then right padding. Labels ignore the
    padding and the image tokens, as the data pipeline masks them."""
    g = torch.Generator().manual_seed(seed)
    t = tokens_per_image
    length = 5 + t + 3 + t + 2
    ids = torch.randint(2, IMAGE, (2, length), generator=g)
    ids[0, 5:5 + t] = IMAGE
    ids[0, 8 + t:8 + 2 * t] = IMAGE
    ids[1, 4:4 + t] = IMAGE
    mask = torch.ones_like(ids)
    mask[1, 4 + t + 3:] = 0
    ids[mask == 0] = PAD
    labels = ids.masked_fill((mask == 0) | (ids == IMAGE), -100)
    pixels = torch.randn(3, 3, VISION["image_size"], VISION["image_size"], generator=g)
    return ids, mask, labels, pixels


def test_registry_maps_llava_to_this_file():
    assert architecture("llava", IMAGE_TEXT) is llava


def test_logits_loss_and_every_gradient_match_transformers(checkpoint):
    case, path, hf = checkpoint
    ours, _ = load_ours(path)
    t = ours.args.tokens_per_image
    ids, mask, labels, pixels = batch(t)
    with torch.no_grad():
        assert hf.model.get_image_features(pixel_values=pixels).pooler_output[0].shape[0] == t
    hf.zero_grad(set_to_none=True)
    ref = hf(input_ids=ids, attention_mask=mask, pixel_values=pixels, labels=labels)
    with torch.no_grad():
        logits = ours(ids, attention_mask=mask, pixel_values=pixels).logits
    real = mask.bool()
    assert (logits[real] - ref.logits[real]).abs().max().item() <= TOL
    with torch.no_grad():  # the images matter, each at its own placeholders: swapping two moves the logits
        swapped = ours(ids, attention_mask=mask, pixel_values=pixels[[1, 0, 2]]).logits
    assert (swapped[0] - logits[0]).abs().max().item() > 1e-3
    assert torch.allclose(swapped[1], logits[1], atol=1e-6)
    out = ours(ids, labels=labels, attention_mask=mask, pixel_values=pixels)
    assert out.num_tokens.item() == int((labels[:, 1:] != -100).sum())
    assert abs(out.loss.item() - ref.loss.item()) <= TOL
    out.loss.backward()
    ref.loss.backward()
    theirs = {llava.Model.our_name(n): p for n, p in hf.named_parameters()}
    ours_params = dict(ours.named_parameters())
    assert set(ours_params) == set(theirs)
    unused = set()
    for name, p in ours_params.items():
        if p.grad is None:  # the tower's post_layernorm, SigLIP's head, layers past the last feature layer
            assert theirs[name].grad is None or not theirs[name].grad.any(), name
            unused.add(name)
            continue
        assert (p.grad - theirs[name].grad).abs().max().item() <= TOL, name
    assert all(n.startswith("vision_tower.") for n in unused) and "vision_tower.post_layernorm.weight" in unused
    assert not any(n.startswith("vision_tower.encoder.layers.0.") for n in unused)


def test_checkpoint_names_round_trip(checkpoint, tmp_path):
    case, path, hf = checkpoint
    ours, tensors = load_ours(path)
    saved = ours.state_for_saving()
    assert set(saved) == set(tensors)
    for name, tensor in tensors.items():
        assert torch.equal(saved[name], tensor), name
    # The hub's llava-hf files (a `vision_model` level inside the tower) and transformers 5's in-memory names.
    hub = {k.replace("vision_tower.", "vision_tower.vision_model.", 1): v for k, v in tensors.items()}
    for spelling in (hub, hf.state_dict()):
        other = llava.Model(ours.args)
        other.load_state_dict({llava.Model.our_name(k): v for k, v in spelling.items()},
                              strict=not ours.args.tie_word_embeddings)
        if ours.args.tie_word_embeddings:
            other.tie_weights()
        for name, tensor in ours.state_dict().items():
            assert torch.equal(other.state_dict()[name], tensor), name
    assert ours.part_of("vision_tower.encoder.layers.0.mlp.fc1.weight") == "vision"
    assert ours.part_of("multi_modal_projector.linear_1.weight") == "projector"
    assert ours.part_of("language_model.model.layers.0.mlp.up_proj.weight") == "language"


def test_vision_checkpointing_recomputes_layers_with_the_same_gradients(saved):
    case, path, _ = saved("clip_llama_layer-2_default")
    ours, _ = load_ours(path)
    ids, mask, labels, pixels = batch(ours.args.tokens_per_image)
    ours.train()
    grads = []
    for mode in (False, True):
        ours.zero_grad(set_to_none=True)
        ours.set_gradient_checkpointing(mode)
        assert ours.vision_tower.vision_checkpointing is mode and len(ours.vision_blocks()) == 3
        calls = []
        hook = ours.vision_tower.encoder.layers[0].register_forward_pre_hook(lambda *a: calls.append(1))
        ours(ids, labels=labels, attention_mask=mask, pixel_values=pixels).loss.backward()
        hook.remove()
        assert len(calls) == (2 if mode else 1)  # recomputed in backward
        grads.append({n: p.grad.clone() for n, p in ours.named_parameters() if p.grad is not None})
    for name, g in grads[0].items():
        assert torch.allclose(g, grads[1][name], atol=1e-7), name


def test_image_token_count_and_image_size_errors(saved):
    case, path, _ = saved("clip_llama_layer-2_default")
    ours, _ = load_ours(path)
    ids, mask, _, pixels = batch(ours.args.tokens_per_image)
    with torch.no_grad():
        short = ids.clone()
        short[0, 5] = 3  # one image placeholder fewer than the images' features
        with pytest.raises(DataError, match="image token"):
            ours(short, pixel_values=pixels)
        with pytest.raises(DataError, match="no images"):
            ours(ids)
        with pytest.raises(DataError, match="image_size"):
            ours(ids, pixel_values=torch.randn(3, 3, 20, 20))
        with pytest.raises(DataError, match="pixel_attention_mask"):
            ours(ids, pixel_values=pixels, pixel_attention_mask=torch.ones(3, 16, 16))



def test_velotune_loader_and_saver_agree_with_transformers(saved, tmp_path):
    """files.py's load_vision_model reads the directory to the same state; save_vision_model writes one that
    transformers loads back to the same tensors."""
    from velotune.models.vision.files import load_vision_model, save_vision_model
    _, path, hf = saved("siglip_qwen2_list_full")
    ours = load_vision_model(path, dtype="float32", device="cpu")
    assert type(ours) is llava.Model
    reference, _ = load_ours(path)
    for name, tensor in reference.state_dict().items():
        assert torch.equal(ours.state_dict()[name], tensor), name
    save_vision_model(ours, tmp_path / "out")
    back = type(hf).from_pretrained(str(tmp_path / "out"))
    assert json.loads((tmp_path / "out" / "config.json").read_text())["architectures"] == [type(hf).__name__]
    for name, tensor in hf.state_dict().items():
        assert torch.equal(back.state_dict()[name], tensor), name

def saved_config(tmp_path):
    make_hf("clip_llama_layer-2_default").config.to_json_file(str(tmp_path / "config.json"))
    return json.loads((tmp_path / "config.json").read_text())


@pytest.mark.parametrize("edit, error, words", [
    (lambda c: c["vision_config"].update(hidden_size=-1), CheckpointError, "'hidden_size'"),
    (lambda c: c["vision_config"].update(num_attention_heads=3), CheckpointError, "'num_attention_heads'"),
    (lambda c: c["vision_config"].update(patch_size=[4, 4]), CheckpointError, "'patch_size'"),
    (lambda c: c["vision_config"].update(layer_norm_eps=0), CheckpointError, "'layer_norm_eps'"),
    (lambda c: c["vision_config"].update(hidden_act="swiglu"), UnsupportedError, "'hidden_act'"),
    (lambda c: c["vision_config"].update(model_type="pixtral"), CheckpointError, "vision_config.model_type"),
    (lambda c: c.update(vision_feature_layer=4), CheckpointError, "'vision_feature_layer'"),
    (lambda c: c.update(vision_feature_layer=[]), CheckpointError, "'vision_feature_layer'"),
    (lambda c: c.update(vision_feature_select_strategy="cls"), CheckpointError, "'vision_feature_select_strategy'"),
    (lambda c: c.update(projector_hidden_act="nope"), UnsupportedError, "'projector_hidden_act'"),
    (lambda c: c.update(multimodal_projector_bias="yes"), CheckpointError, "'multimodal_projector_bias'"),
    (lambda c: c.update(image_token_index=VOCAB), CheckpointError, "image token id"),
    (lambda c: c.update(image_token_index=-3), CheckpointError, "'image_token_index'"),
    (lambda c: c.pop("vision_config"), CheckpointError, "'vision_config'"),
    (lambda c: c["text_config"].update(hidden_size=0), CheckpointError, "'hidden_size'"),
    (lambda c: c["text_config"].update(model_type="gpt2"), UnsupportedError, "text_config.model_type"),
])
def test_config_errors_name_the_file_and_the_field(tmp_path, edit, error, words):
    config = saved_config(tmp_path)
    edit(config)
    with pytest.raises(error) as info:
        llava.Args.from_dict(config, source="ckpt/config.json")
    assert "ckpt/config.json" in str(info.value) and words in str(info.value)


def test_config_defaults_are_transformers(tmp_path):
    """llava-1.5's config.json shape: a text_config of the fields differing from LlamaConfig's defaults, a
    vision_config leaning on CLIPVisionConfig's defaults (quick_gelu, eps 1e-5)."""
    config = {"model_type": "llava", "image_token_index": 32000,
              "text_config": {"model_type": "llama", "vocab_size": 32064, "rms_norm_eps": 1e-5},
              "vision_config": {"model_type": "clip_vision_model", "hidden_size": 1024, "image_size": 336,
                                "intermediate_size": 4096, "num_attention_heads": 16, "num_hidden_layers": 24,
                                "patch_size": 14}}
    args = llava.Args.from_dict(config, source="config.json")
    assert (args.text.hidden_size, args.text.num_hidden_layers, args.text.vocab_size) == (4096, 32, 32064)
    assert (args.tower.hidden_act, args.tower.layer_norm_eps, args.tower.kind) == ("quick_gelu", 1e-5, "clip")
    assert args.vision_feature_layer == -2 and args.projector_hidden_act == "gelu" and not args.tie_word_embeddings
    assert args.tokens_per_image == 576 and args.to_dict() == config
