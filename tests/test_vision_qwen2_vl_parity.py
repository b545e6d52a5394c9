"""Parity of velotune's Qwen2-VL and Qwen2.5-VL (models/vision/qwen2_vl.py) with transformers'
Qwen2VLForConditionalGeneration / Qwen2_5_VLForConditionalGeneration on tiny random models saved by transformers and
loaded by name: logits, loss and every parameter gradient in fp32 with three images of three sizes (two in one row)
and padding on either side; the 3-D positions and rope deltas against get_rope_index; greedy decoding through
velotune's KVCache against transformers' full forward on the growing sequence; the vision windows; names both ways;
the legacy flat config.json; errors.
"""
import json

import pytest
import torch
from safetensors.torch import load_file

from velotune.errors import CheckpointError, DataError, UnsupportedError
from velotune.infer.cache import KVCache
from velotune.models.registry import IMAGE_TEXT, architecture
from velotune.models.vision import qwen2_vl as family
from velotune.models.vision.mrope import rope_index
from velotune.models.vision.qwen2_vl_vision import patch_coordinates, window_order

IMG, PAD = 120, 0
TEXT = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, pad_token_id=PAD, bos_token_id=1, eos_token_id=2, rms_norm_eps=1e-6,
            initializer_range=0.1,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]})
VISION = {
    "qwen2_vl": dict(depth=2, embed_dim=32, hidden_size=64, num_heads=4, patch_size=4, spatial_merge_size=2,
                     temporal_patch_size=2, mlp_ratio=2, initializer_range=0.1),
    # window_size 16 = 2 merged patches a side: the 3 x 4 merged grid of the second image has windows of 4 and 2.
    "qwen2_5_vl": dict(depth=3, hidden_size=32, out_hidden_size=64, intermediate_size=48, num_heads=4, patch_size=4,
                       spatial_merge_size=2, temporal_patch_size=2, window_size=16, fullatt_block_indexes=[1],
                       initializer_range=0.1),
}
GRIDS = torch.tensor([[1, 4, 6], [1, 6, 8], [1, 4, 4]])    # 6, 12 and 4 image tokens
PATCH_VALUES = 3 * 2 * 4 * 4


def hf_classes(model_type):
    import transformers
    if model_type == "qwen2_vl":
        return transformers.Qwen2VLConfig, transformers.Qwen2VLForConditionalGeneration
    return transformers.Qwen2_5_VLConfig, transformers.Qwen2_5_VLForConditionalGeneration


@pytest.fixture(scope="module", params=list(VISION))
def pair(request, tmp_path_factory):
    """(transformers model, our model loaded from its files, checkpoint dir)."""
    config_class, model_class = hf_classes(request.param)
    torch.manual_seed(1234)
    config = config_class(text_config=TEXT, vision_config=VISION[request.param], image_token_id=IMG)
    hf = model_class._from_config(config, attn_implementation="sdpa")
    with torch.no_grad():  # norms and biases off their ones / zeros init, which would hide a wrong convention
        for name, p in hf.named_parameters():
            if p.dim() == 1:
                p.normal_(1.0 if "norm" in name or "ln_q" in name else 0.0, 0.1)
    path = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(str(path))
    return hf.eval(), load_ours(path), path


def load_ours(path):
    """The loader's recipe: Args from config.json, tensors renamed by Model.our_name, a strict load."""
    args = family.Args.from_dict(json.loads((path / "config.json").read_text()), source=str(path / "config.json"))
    ours = family.Model(args)
    state = {family.Model.our_name(k): v for k, v in load_file(path / "model.safetensors").items()}
    ours.load_state_dict(state, strict=True)
    return ours.eval()


def prompt_batch(padding, seed=0):
    """(input_ids, attention_mask): row 0 holds images 0 and 1, row 1 image 2, the shorter row padded."""
    g = torch.Generator().manual_seed(seed)
    counts = (GRIDS.prod(-1) // 4).tolist()

    def text(n):
        return torch.randint(3, 110, (n,), generator=g).tolist()

    rows = [text(3) + [IMG] * counts[0] + text(2) + [IMG] * counts[1] + text(4), text(2) + [IMG] * counts[2] + text(5)]
    T = max(map(len, rows))
    ids = torch.full((2, T), PAD)
    mask = torch.zeros(2, T, dtype=torch.long)
    for i, row in enumerate(rows):
        span = slice(0, len(row)) if padding != "left" else slice(T - len(row), T)
        ids[i, span], mask[i, span] = torch.tensor(row), 1
    return ids, mask


def pixels(seed=5):
    return torch.randn(int(GRIDS.prod(-1).sum()), PATCH_VALUES, generator=torch.Generator().manual_seed(seed))


def hf_inputs(ids, mask):
    return dict(input_ids=ids, attention_mask=mask, pixel_values=pixels(), image_grid_thw=GRIDS,
                mm_token_type_ids=(ids == IMG).int())


def test_registry_and_names_round_trip(pair):
    hf, ours, path = pair
    assert architecture(hf.config.model_type, IMAGE_TEXT).Model is family.Model
    assert ours.hf_architecture == type(hf).__name__
    files = load_file(path / "model.safetensors")
    saved = ours.state_for_saving()
    assert set(saved) == set(files)
    assert all(torch.equal(saved[k], files[k]) for k in files)
    # transformers 5's in-memory names (also the files of transformers 4.5x) load too.
    ours_params = dict(ours.named_parameters())
    for name, p in hf.named_parameters():
        assert torch.equal(ours_params[family.Model.our_name(name)], p), name
    parts = {ours.part_of(n) for n in ours_params}
    assert parts == {"vision", "projector", "language"}
    assert ours.part_of("visual.merger.mlp.0.weight") == "projector"
    assert ours.part_of("visual.blocks.0.attn.qkv.weight") == "vision"
    assert len(ours.vision_blocks()) == hf.config.vision_config.depth and len(ours.blocks()) == 2


@pytest.mark.parametrize("padding", ["right", "left"])
def test_logits_loss_and_every_gradient_match_transformers(pair, padding):
    hf, ours, _ = pair
    ids, mask = prompt_batch(padding)
    labels = ids.masked_fill(mask == 0, -100)
    if padding == "left":  # a padding position would predict the row's first token: it is not a target
        labels[torch.arange(2), mask.argmax(-1)] = -100
    hf.zero_grad(set_to_none=True)
    ours.zero_grad(set_to_none=True)
    ref = hf(**hf_inputs(ids, mask), labels=labels)
    with torch.no_grad():
        logits = ours(ids, attention_mask=mask, pixel_values=pixels(), image_grid_thw=GRIDS).logits
    real = mask.bool()  # padding's own outputs are padding's (no target reads them)
    logit_diff = (logits[real] - ref.logits[real]).abs().max().item()
    out = ours(ids, labels=labels, attention_mask=mask, pixel_values=pixels(), image_grid_thw=GRIDS)
    assert out.logits is None  # the fused loss: no [batch, seq, vocab] logits
    loss_diff = abs(out.loss.item() - ref.loss.item())
    out.loss.backward()
    ref.loss.backward()
    ours_params = dict(ours.named_parameters())
    grad_diff, checked = 0.0, 0
    for name, p in hf.named_parameters():
        mine = ours_params[family.Model.our_name(name)]
        assert p.grad is not None and mine.grad is not None, name
        grad_diff = max(grad_diff, (mine.grad - p.grad).abs().max().item())
        checked += 1
    print(f"{hf.config.model_type} {padding}: logits {logit_diff:.2e}, loss {loss_diff:.2e}, "
          f"grads {grad_diff:.2e} over {checked} tensors")
    assert checked == len(ours_params)
    assert logit_diff <= 1e-5 and loss_diff <= 1e-5 and grad_diff <= 1e-5


@pytest.mark.parametrize("padding", ["none", "right", "left"])
def test_positions_and_rope_deltas_match_get_rope_index(pair, padding):
    hf, ours, _ = pair
    ids, mask = prompt_batch("right" if padding == "none" else padding)
    if padding == "none":
        ids, mask = ids[:1, :int(mask[0].sum())], None  # the longer row: no padding
        grids = GRIDS[:2]
    else:
        grids = GRIDS
    ref_positions, ref_deltas = hf.model.get_rope_index(ids, (ids == IMG).int(), grids, attention_mask=mask)
    positions, deltas = rope_index(ids, IMG, grids, 2, mask)
    assert torch.equal(positions, ref_positions) and torch.equal(deltas, ref_deltas)
    cache = KVCache.for_model(ours, 64)
    with torch.no_grad():
        ours(ids, attention_mask=mask, pixel_values=pixels()[:int(grids.prod(-1).sum())], image_grid_thw=grids,
             cache=cache)
    assert torch.equal(cache.rope_deltas, ref_deltas)


def test_cached_greedy_decoding_matches_transformers_full_forward(pair):
    hf, ours, _ = pair
    ids, mask = prompt_batch("left", seed=3)
    cache = KVCache.for_model(ours, 64, block_size=16)
    with torch.no_grad():
        logits = ours(ids, attention_mask=mask, pixel_values=pixels(), image_grid_thw=GRIDS, cache=cache,
                      logits_to_keep=1).logits[:, -1]
        worst, steps = 0.0, 5
        for step in range(steps):
            ref = hf(**hf_inputs(ids, mask)).logits[:, -1]
            worst = max(worst, (logits - ref).abs().max().item())
            assert torch.equal(logits.argmax(-1), ref.argmax(-1)), step
            next_ids = ref.argmax(-1, keepdim=True)
            ids, mask = torch.cat([ids, next_ids], 1), torch.cat([mask, torch.ones_like(next_ids)], 1)
            if step % 2:  # embeddings alone: the text model places them after the prompt's images
                embeds = ours.get_input_embeddings()(next_ids)
                logits = ours(inputs_embeds=embeds, attention_mask=mask, cache=cache).logits[:, -1]
            else:
                logits = ours(next_ids, attention_mask=mask, cache=cache).logits[:, -1]
    print(f"{hf.config.model_type} cached decoding: max logit diff {worst:.2e} over {steps} steps")
    assert cache.past_length == ids.shape[1] and worst <= 1e-5


def test_vision_checkpointing_gives_the_same_gradients(pair):
    _, ours, _ = pair
    ids, mask = prompt_batch("right")
    labels = ids.masked_fill(mask == 0, -100)
    grads = []
    ours.train()
    try:
        for mode in (False, True):
            ours.set_gradient_checkpointing(mode)
            assert ours.visual.vision_checkpointing is mode
            ours.zero_grad(set_to_none=True)
            ours(ids, labels=labels, attention_mask=mask, pixel_values=pixels(), image_grid_thw=GRIDS).loss.backward()
            grads.append({n: p.grad.clone() for n, p in ours.named_parameters()})
    finally:
        ours.set_gradient_checkpointing(False)
        ours.eval()
    assert all(torch.allclose(grads[0][n], grads[1][n], atol=1e-7) for n in grads[0])


def test_windows_and_patch_coordinates_match_transformers():
    from transformers.vision_utils import (
        get_vision_position_ids,
        get_vision_window_index,
    )
    grids = torch.tensor([[1, 4, 6], [1, 6, 8], [2, 8, 4], [1, 2, 2]])
    for side, window in ((1, 8), (2, 16), (3, 24)):
        ref_index, ref_cu = get_vision_window_index(grids, 2, window, 4)
        order, lengths = window_order(grids.tolist(), 2, side, "cpu")
        assert torch.equal(order, ref_index)
        assert torch.equal(torch.tensor([0] + lengths).cumsum(0).int(), ref_cu)
    assert torch.equal(patch_coordinates(grids.tolist(), 2, "cpu"), get_vision_position_ids(grids, 2))


def flat_legacy(config: dict) -> dict:
    """config.json as older hub checkpoints have it: the text fields at the top level, rope_scaling "mrope"."""
    flat = {k: v for k, v in config.items() if k != "text_config"}
    text = dict(config["text_config"])
    rope = text.pop("rope_parameters")
    text.pop("model_type")
    flat.update(text, rope_theta=rope["rope_theta"], rope_scaling={"type": "mrope",
                                                                   "mrope_section": rope["mrope_section"]})
    flat["vision_config"] = {k: v for k, v in config["vision_config"].items() if k != "rope_parameters"}
    return flat


def test_legacy_flat_config_reads_the_same(pair, tmp_path):
    hf, _, path = pair
    config = json.loads((path / "config.json").read_text())
    nested = family.Args.from_dict(config)
    flat = family.Args.from_dict(flat_legacy(config))
    for name in ("hidden_size", "num_key_value_heads", "head_dim", "rope_theta", "rope_scaling", "rms_norm_eps",
                 "tie_word_embeddings", "pad_token_id", "layer_types", "vocab_size"):
        assert getattr(flat.text, name) == getattr(nested.text, name), name
    assert flat.mrope_section == nested.mrope_section == [2, 3, 3] and flat.tower == nested.tower
    # transformers reads the flat file to the same model.
    (tmp_path / "config.json").write_text(json.dumps(flat_legacy(config)))
    assert type(hf).config_class.from_pretrained(str(tmp_path)).text_config.rope_parameters["mrope_section"] == [2, 3, 3]


def test_errors_name_their_cause(pair):
    _, ours, path = pair
    config = json.loads((path / "config.json").read_text())
    ids, mask = prompt_batch("right")
    with pytest.raises(DataError, match="image token"):  # one image too few for the placeholders
        ours(ids, attention_mask=mask, pixel_values=pixels()[:-16], image_grid_thw=GRIDS[:2])
    with pytest.raises(DataError, match="pixel_values has shape"):
        ours(ids, attention_mask=mask, pixel_values=pixels()[:, :-1], image_grid_thw=GRIDS)
    with pytest.raises(DataError, match="image_grid_thw"):
        ours(ids, attention_mask=mask, pixel_values=pixels())
    bad = json.loads(json.dumps(config))
    bad["text_config"]["rope_parameters"]["mrope_section"] = [2, 3, 4]
    with pytest.raises(CheckpointError, match="mrope_section"):
        family.Args.from_dict(bad, source="x/config.json")
    bad = json.loads(json.dumps(config))
    bad["text_config"]["model_type"] = "llama"
    with pytest.raises(UnsupportedError, match="text_config.model_type 'llama'"):
        family.Args.from_dict(bad)
    bad = json.loads(json.dumps(config))
    bad["vision_config"]["num_heads"] = 3
    with pytest.raises(CheckpointError, match="num_heads"):
        family.Args.from_dict(bad)
    cache = KVCache.for_model(ours, 64)
    with torch.no_grad():
        ours(torch.tensor([[5, 6, 7], [8, 9, 10]]), cache=cache)  # a text prefill, then the images: too late
        with pytest.raises(UnsupportedError, match="first forward"):
            ours(ids, pixel_values=pixels(), image_grid_thw=GRIDS, cache=cache)


def test_packed_documents_restart_their_positions():
    ids, mask = prompt_batch("right")
    rows = [ids[i, :int(mask[i].sum())] for i in range(2)]
    packed = torch.cat(rows)[None]
    documents = torch.cat([torch.full_like(r, i) for i, r in enumerate(rows)])[None]
    positions, _ = rope_index(packed, IMG, GRIDS, 2, document_ids=documents)
    alone = [rope_index(r[None], IMG, g, 2)[0][:, 0] for r, g in zip(rows, (GRIDS[:2], GRIDS[2:]))]
    assert torch.equal(positions[:, 0], torch.cat(alone, dim=1))


def test_velotune_loader_and_saver_round_trip(pair, tmp_path):
    from velotune.models.vision.files import load_vision_model, save_vision_model
    hf, ours, path = pair
    loaded = load_vision_model(path, dtype="float32", device="cpu")
    assert isinstance(loaded, family.Model)
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in ours.state_dict().items())
    save_vision_model(loaded, tmp_path / "saved")
    again = type(hf).from_pretrained(str(tmp_path / "saved"))
    assert all(torch.equal(again.state_dict()[k], v) for k, v in hf.state_dict().items())
