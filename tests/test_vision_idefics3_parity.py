"""Parity of velotune's Idefics3 / SmolVLM (velotune.models.vision.idefics3, towers.py) with transformers'
Idefics3ForConditionalGeneration and SmolVLMForConditionalGeneration on tiny random models: fp32 logits, loss and
every parameter's gradient over a batch of two rows (two images in the first; one image and an all-zero padding
image in the second; right padding), with images smaller than the padded size through pixel_attention_mask
(bucketed positions, padded patches out of attention), without a mask, and at a second padded size; checkpoint
names both ways; the data and config errors.
"""
import json

import pytest
import torch
from safetensors.torch import load_file

from velotune.errors import CheckpointError, DataError, UnsupportedError
from velotune.models.registry import IMAGE_TEXT, architecture
from velotune.models.vision import idefics3

VOCAB, IMAGE, PAD = 128, 127, 1
TEXT = dict(model_type="llama", vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, pad_token_id=PAD, rms_norm_eps=1e-5)
VISION = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2, image_size=16,
              patch_size=4)
# case -> (model_type, top-level overrides)
CASES = {"idefics3": ("idefics3", {}),
         "smolvlm_tied": ("smolvlm", dict(tie_word_embeddings=True))}
# Measured on this machine (fp32, one thread), all cases and batches: max |ours - transformers| of the real
# positions' logits 0 (the same SDPA and matmul calls), loss <= 4.8e-7 (the loss is ~4.9), every gradient
# <= 1.8e-7 (largest gradient ~0.45).
TOL = 1e-5


def make_hf(case):
    from transformers import (
        Idefics3Config,
        Idefics3ForConditionalGeneration,
        SmolVLMConfig,
        SmolVLMForConditionalGeneration,
    )
    model_type, top = CASES[case]
    config_class, model_class = {"idefics3": (Idefics3Config, Idefics3ForConditionalGeneration),
                                 "smolvlm": (SmolVLMConfig, SmolVLMForConditionalGeneration)}[model_type]
    torch.manual_seed(1234)
    model = model_class(config_class(text_config=TEXT, vision_config=VISION, image_token_id=IMAGE, scale_factor=2,
                                     **top))
    with torch.no_grad():  # norms and biases off their ones / zeros init, which would hide a wrong convention
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.normal_(1.0 if "norm" in name and name.endswith("weight") else 0.0, 0.1)
    return model.eval()


def load_ours(path):
    """The recipe of the loader (files.py): Args from config.json, our names for the file's tensors, strict."""
    cfg = json.loads((path / "config.json").read_text())
    ours = idefics3.Model(idefics3.Args.from_dict(cfg, source=str(path / "config.json")))
    tensors = load_file(str(path / "model.safetensors"))
    missing, unexpected = ours.load_state_dict({idefics3.Model.our_name(k): v for k, v in tensors.items()},
                                               strict=False)
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
            path = tmp_path_factory.mktemp("idefics3") / case
            hf.save_pretrained(str(path))
            built[case] = case, path, hf
        return built[case]
    return get


@pytest.fixture(params=list(CASES))
def checkpoint(request, saved):
    return saved(request.param)


def images(side, real_sizes, seed=9):
    """pixel_values [2, 2, 3, side, side] and pixel_attention_mask [2, 2, side, side]: real_sizes[row][i] is the
    (height, width) of image i of the row, zero-padded to side x side; None: a padding image (all zeros)."""
    g = torch.Generator().manual_seed(seed)
    pixels = torch.zeros(2, 2, 3, side, side)
    mask = torch.zeros(2, 2, side, side, dtype=torch.long)
    for r, row in enumerate(real_sizes):
        for i, size in enumerate(row):
            if size is not None:
                h, w = size
                pixels[r, i, :, :h, :w] = torch.randn(3, h, w, generator=g)
                mask[r, i, :h, :w] = 1
    return pixels, mask


def text(tokens_per_image, seed=4):
    """Row 0: text, image, text, image, text. Row 1: text, image, text, right padding. Labels ignore the padding
    and the image tokens."""
    g = torch.Generator().manual_seed(seed)
    t = tokens_per_image
    ids = torch.randint(2, IMAGE, (2, 4 + t + 3 + t + 2), generator=g)
    ids[0, 4:4 + t] = IMAGE
    ids[0, 7 + t:7 + 2 * t] = IMAGE
    ids[1, 3:3 + t] = IMAGE
    mask = torch.ones_like(ids)
    mask[1, 3 + t + 2:] = 0
    ids[mask == 0] = PAD
    return ids, mask, ids.masked_fill((mask == 0) | (ids == IMAGE), -100)


# batch name -> (padded side, real sizes per row, pass pixel_attention_mask). Tokens per image:
# (side // patch_size) ** 2 // scale_factor ** 2 = 4 at side 16, 1 at side 8, whatever the real size.
BATCHES = {
    "smaller_images_masked": (16, [[(16, 16), (12, 8)], [(16, 12), None]], True),
    "full_images_no_mask": (16, [[(16, 16), (16, 16)], [(16, 16), None]], False),
    "second_size_masked": (8, [[(8, 8), (8, 4)], [(4, 8), None]], True),
}


def test_registry_maps_both_model_types_to_this_file():
    assert architecture("idefics3", IMAGE_TEXT) is idefics3 and architecture("smolvlm", IMAGE_TEXT) is idefics3


@pytest.mark.parametrize("batch", list(BATCHES))
def test_logits_loss_and_every_gradient_match_transformers(checkpoint, batch):
    case, path, hf = checkpoint
    ours, _ = load_ours(path)
    side, sizes, with_mask = BATCHES[batch]
    pixels, pixel_mask = images(side, sizes)
    pixel_mask = pixel_mask if with_mask else None
    tokens = (side // VISION["patch_size"]) ** 2 // 4
    ids, mask, labels = text(tokens)
    inputs = dict(attention_mask=mask, pixel_values=pixels, pixel_attention_mask=pixel_mask)
    hf.zero_grad(set_to_none=True)
    ref = hf(input_ids=ids, labels=labels, **inputs)
    with torch.no_grad():
        logits = ours(ids, **inputs).logits
        features = ours.image_features(pixels, pixel_mask)
    assert features.shape == (3 * tokens, TEXT["hidden_size"])  # the padding image gives none
    real = mask.bool()
    assert (logits[real] - ref.logits[real]).abs().max().item() <= TOL
    out = ours(ids, labels=labels, **inputs)
    assert abs(out.loss.item() - ref.loss.item()) <= TOL
    out.loss.backward()
    ref.loss.backward()
    theirs = {idefics3.Model.our_name(n): p for n, p in hf.named_parameters()}
    ours_params = dict(ours.named_parameters())
    assert set(ours_params) == set(theirs)
    for name, p in ours_params.items():  # every parameter takes part: the tower's post_layernorm too
        assert p.grad is not None and theirs[name].grad is not None, name
        assert (p.grad - theirs[name].grad).abs().max().item() <= TOL, name


def test_the_mask_and_the_padding_image_matter(saved):
    """A model ignoring the mask or keeping the padding image would fail the parity above: the masked patches move
    the features of a smaller image, and features come from real images only, in order."""
    _, path, _ = saved("idefics3")
    ours, _ = load_ours(path)
    pixels, pixel_mask = images(16, [[(16, 16), (12, 8)], [(16, 12), None]])
    with torch.no_grad():
        masked = ours.image_features(pixels, pixel_mask)
        unmasked = ours.image_features(pixels, torch.ones_like(pixel_mask))
        alone = ours.image_features(pixels[1:, :1], pixel_mask[1:, :1])
    assert (masked[4:8] - unmasked[4:8]).abs().max().item() > 1e-3
    assert torch.allclose(masked[8:], alone, atol=1e-6)


def test_checkpoint_names_round_trip(checkpoint):
    case, path, hf = checkpoint
    ours, tensors = load_ours(path)
    saved_state = ours.state_for_saving()
    assert set(saved_state) == set(tensors)
    for name, tensor in tensors.items():
        assert torch.equal(saved_state[name], tensor), name
    # transformers 5 keeps the file's names in memory
    assert {idefics3.Model.our_name(k) for k in hf.state_dict()} >= set(ours.state_dict()) - {
        "language_model.lm_head.weight"}
    assert ours.hf_architecture == type(hf).__name__
    assert ours.args.tokens_per_image == hf.model.image_seq_len
    assert ours.part_of("vision_model.encoder.layers.0.self_attn.q_proj.weight") == "vision"
    assert ours.part_of("connector.modality_projection.proj.weight") == "projector"


def test_vision_checkpointing_gives_the_same_gradients(saved):
    _, path, _ = saved("idefics3")
    ours, _ = load_ours(path)
    pixels, pixel_mask = images(16, [[(16, 16), (12, 8)], [(16, 12), None]])
    ids, mask, labels = text(4)
    ours.train()
    grads = []
    for mode in (False, True):
        ours.zero_grad(set_to_none=True)
        ours.set_gradient_checkpointing(mode)
        assert ours.vision_model.vision_checkpointing is mode and len(ours.vision_blocks()) == 2
        ours(ids, labels=labels, attention_mask=mask, pixel_values=pixels,
             pixel_attention_mask=pixel_mask).loss.backward()
        grads.append({n: p.grad.clone() for n, p in ours.named_parameters()})
    for name, g in grads[0].items():
        assert torch.allclose(g, grads[1][name], atol=1e-7), name


def test_data_errors(saved):
    _, path, _ = saved("smolvlm_tied")
    ours, _ = load_ours(path)
    pixels, pixel_mask = images(16, [[(16, 16), (12, 8)], [(16, 12), None]])
    ids, mask, _ = text(4)
    with torch.no_grad():
        short = ids.clone()
        short[0, 4] = 3
        with pytest.raises(DataError, match="image token"):
            ours(short, pixel_values=pixels, pixel_attention_mask=pixel_mask)
        with pytest.raises(DataError, match="rows, images per row"):
            ours(ids, pixel_values=pixels[0])
        with pytest.raises(DataError, match="square"):
            ours(ids, pixel_values=pixels[..., :12], pixel_attention_mask=pixel_mask[..., :12])
        with pytest.raises(DataError, match="pixel_attention_mask has shape"):
            ours(ids, pixel_values=pixels, pixel_attention_mask=pixel_mask[0])
        bad = pixel_mask.clone()
        bad[0, 1] = 0
        with pytest.raises(DataError, match="no real pixel"):
            ours(ids, pixel_values=pixels, pixel_attention_mask=bad)
        # A batch whose images are all padding gives no features (transformers' SmolVLM would run the first
        # padding image and then refuse the count): the same as no images.
        plain = ours(ids[:, :3]).logits
        padded = ours(ids[:, :3], pixel_values=torch.zeros(2, 1, 3, 16, 16)).logits
        assert torch.equal(plain, padded)



def test_velotune_loader_and_saver_agree_with_transformers(saved, tmp_path):
    """files.py's load_vision_model reads the directory to the same state; save_vision_model writes one that
    transformers loads back to the same tensors."""
    from velotune.models.vision.files import load_vision_model, save_vision_model
    _, path, hf = saved("smolvlm_tied")
    ours = load_vision_model(path, dtype="float32", device="cpu")
    assert type(ours) is idefics3.Model
    reference, _ = load_ours(path)
    for name, tensor in reference.state_dict().items():
        assert torch.equal(ours.state_dict()[name], tensor), name
    save_vision_model(ours, tmp_path / "out")
    back = type(hf).from_pretrained(str(tmp_path / "out"))
    assert json.loads((tmp_path / "out" / "config.json").read_text())["architectures"] == [type(hf).__name__]
    for name, tensor in hf.state_dict().items():
        assert torch.equal(back.state_dict()[name], tensor), name

def saved_config(tmp_path):
    make_hf("idefics3").config.to_json_file(str(tmp_path / "config.json"))
    return json.loads((tmp_path / "config.json").read_text())


@pytest.mark.parametrize("edit, error, words", [
    (lambda c: c["vision_config"].update(hidden_size=-1), CheckpointError, "'hidden_size'"),
    (lambda c: c["vision_config"].update(num_attention_heads=5), CheckpointError, "'num_attention_heads'"),
    (lambda c: c["vision_config"].update(image_size=[16, 16]), CheckpointError, "'image_size'"),
    (lambda c: c["vision_config"].update(attention_dropout=1.5), CheckpointError, "'attention_dropout'"),
    (lambda c: c["vision_config"].update(hidden_act="gelu_nope"), UnsupportedError, "'hidden_act'"),
    (lambda c: c["vision_config"].update(patch_size=32), CheckpointError, "'patch_size'"),
    (lambda c: c.update(scale_factor=3), CheckpointError, "'scale_factor'"),
    (lambda c: c.update(scale_factor=0), CheckpointError, "'scale_factor'"),
    (lambda c: c.update(image_token_id=VOCAB + 5), CheckpointError, "image token id"),
    (lambda c: c.update(tie_word_embeddings="no"), CheckpointError, "'tie_word_embeddings'"),
    (lambda c: c.update(model_type="llava"), CheckpointError, "'model_type'"),
    (lambda c: c.pop("text_config"), CheckpointError, "'text_config'"),
])
def test_config_errors_name_the_file_and_the_field(tmp_path, edit, error, words):
    config = saved_config(tmp_path)
    edit(config)
    with pytest.raises(error) as info:
        idefics3.Args.from_dict(config, source="ckpt/config.json")
    assert "ckpt/config.json" in str(info.value) and words in str(info.value)


def test_tying_follows_the_top_level_flag_only(tmp_path):
    """As Idefics3Config: the text model's own tie_word_embeddings is not read."""
    config = saved_config(tmp_path)
    config["text_config"]["tie_word_embeddings"] = True
    assert not idefics3.Args.from_dict(config, source="config.json").tie_word_embeddings
    config["tie_word_embeddings"] = True
    config["text_config"]["tie_word_embeddings"] = False
    assert idefics3.Args.from_dict(config, source="config.json").tie_word_embeddings
