"""velotune.vision.gemma3_processor against transformers: pixel_values equal Gemma3ImageProcessorPil's on images of
several sizes and modes; the expanded prompt's token ids (and the image-token marks) equal Gemma3Processor's;
the settings are read from both folder layouts and refused with the file and field named; and end to end, a tiny
Gemma 3 checkpoint with its processor files gives our model's logits on our processed inputs equal to
Gemma3ForConditionalGeneration's on transformers' processed inputs. Tiny sizes: seconds."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_tokenizer import make_tokenizer

from velotune.errors import CheckpointError, DataError, UnsupportedError
from velotune.vision.gemma3_processor import BOI, EOI, IMAGE_TOKEN, Gemma3ImageProcessor, image_sequence
from velotune.vision.processor import image_processor_for

PIXEL_TOL = 1e-6
LOGIT_TOL = 1e-5
SIZE = {"height": 16, "width": 16}
SEQ = 4
TEXTS = [f"Look {BOI} and then {BOI}, what differs?", f"Describe {BOI} briefly."]


def _noise(width: int, height: int, mode: str = "RGB", seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed + width * 1000 + height)
    image = Image.fromarray(rng.integers(0, 256, (height, width, 4), dtype=np.uint8), "RGBA")
    return image if mode == "RGBA" else image.convert(mode)


# Smaller and larger than the target, very wide and tall, odd sizes, and RGBA / greyscale / palette images.
IMAGES = [_noise(37, 53), _noise(90, 20), _noise(12, 70), _noise(64, 64, "RGBA"), _noise(21, 30, "L"),
          _noise(31, 30, "P"), _noise(16, 16)]


def _max_diff(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    assert ours.shape == theirs.shape and ours.dtype == theirs.dtype, (ours.shape, theirs.shape)
    return (ours.double() - theirs.double()).abs().max().item()


def _tokenizer():
    tokenizer = make_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": [BOI, EOI, IMAGE_TOKEN]})
    # Gemma3Processor reads these names off the tokenizer, as a Gemma 3 tokenizer_config.json defines them.
    tokenizer._set_model_specific_special_tokens({"boi_token": BOI, "eoi_token": EOI, "image_token": IMAGE_TOKEN})
    return tokenizer


def _reference(settings: dict, tokenizer=None):
    from transformers import Gemma3ImageProcessorPil, Gemma3Processor
    images = Gemma3ImageProcessorPil(**settings)
    return Gemma3Processor(image_processor=images, tokenizer=tokenizer or _tokenizer(), image_seq_length=SEQ)


@pytest.mark.parametrize("settings", [{"size": SIZE},
                                      {"size": {"height": 24, "width": 24}, "resample": 3,
                                       "image_mean": [0.4, 0.5, 0.6], "image_std": [0.2, 0.3, 0.25]}],
                         ids=["bilinear", "bicubic-own-stats"])
def test_pixel_values_equal_transformers(settings):
    from transformers import Gemma3ImageProcessorPil
    ours = Gemma3ImageProcessor.from_config(settings, {"image_seq_length": SEQ}, {})
    processed = ours(IMAGES)
    expected = Gemma3ImageProcessorPil(**settings)(IMAGES, return_tensors="pt")
    diff = _max_diff(processed.tensors["pixel_values"], expected["pixel_values"])
    print(f"pixel_values max abs diff: {diff:.3g}")
    assert diff <= PIXEL_TOL
    assert expected["num_crops"].tolist() == [0] * len(IMAGES)
    assert processed.tokens_per_image == [SEQ] * len(IMAGES)
    over = sum(i.height > settings["size"]["height"] or i.width > settings["size"]["width"] for i in IMAGES)
    assert processed.resized == over == 6  # every image with a side over the target: all but the 16 x 16 one
    assert ours([]).tensors == {} and ours.collate([ours([]), ours([])]) == {}


def test_prompt_expansion_equals_gemma3_processor():
    tokenizer = _tokenizer()
    reference = _reference({"size": SIZE}, tokenizer)
    ours = Gemma3ImageProcessor.from_config({"size": SIZE}, {"image_seq_length": SEQ}, {})
    records = [IMAGES[:2], IMAGES[3:4]]
    expected = reference(images=records, text=TEXTS, return_text_replacement_offsets=True)
    image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    for i, (text, images) in enumerate(zip(TEXTS, records)):
        processed = ours(images)
        replacements = [entry["replacement"] for entry in expected["text_replacement_offsets"][i]]
        assert processed.expansions == replacements == [image_sequence(SEQ)] * len(images)
        ids = tokenizer(ours.expand(text, processed, f"record {i}"))["input_ids"]
        assert ids == expected["input_ids"][i]
        assert [int(t == image_id) for t in ids] == expected["token_type_ids"][i]
    batch = ours.collate([ours(images) for images in records])
    flat = reference.image_processor(IMAGES[:2] + IMAGES[3:4], return_tensors="pt")["pixel_values"]
    assert _max_diff(batch["pixel_values"], flat) <= PIXEL_TOL
    assert ours.wrap(image_sequence(SEQ)) == image_sequence(SEQ)  # a chat image part: the same run
    with pytest.raises(DataError, match="record 9: the text has 1 image placeholder"):
        ours.expand(TEXTS[1], ours(IMAGES[:2]), "record 9")


# ---- checkpoint files ----------------------------------------------------------------------------------------
def _write(folder, name, data):
    (folder / name).write_text(json.dumps(data))


def test_to_dict_round_trips_and_legacy_layout(tmp_path):
    from transformers import AutoImageProcessor
    settings = {"size": {"height": 24, "width": 24}, "resample": 3}
    ours = Gemma3ImageProcessor.from_config(settings, {"image_seq_length": 9}, {})
    _write(tmp_path, "preprocessor_config.json", ours.to_dict())
    _write(tmp_path, "processor_config.json", ours.processor_dict())
    _write(tmp_path, "config.json", {"model_type": "gemma3", "mm_tokens_per_image": 9,
                                     "vision_config": {"image_size": 24, "patch_size": 4}})
    again = image_processor_for(tmp_path)
    assert type(again) is Gemma3ImageProcessor and again.to_dict() == ours.to_dict()
    assert again.image_seq_length == 9
    expected = AutoImageProcessor.from_pretrained(tmp_path)(IMAGES[:4], return_tensors="pt")["pixel_values"]
    assert _max_diff(again(IMAGES[:4]).tensors["pixel_values"], expected) <= PIXEL_TOL
    # A hub folder's preprocessor_config.json: int size, nulls for pan-and-scan, image_seq_length beside it.
    _write(tmp_path, "preprocessor_config.json", {"image_processor_type": "Gemma3ImageProcessor", "size": 24,
                                                  "do_pan_and_scan": None, "image_seq_length": 9})
    (tmp_path / "processor_config.json").unlink()
    legacy = image_processor_for(tmp_path)
    assert (legacy.height, legacy.width, legacy.resample, legacy.image_seq_length) == (24, 24, 2, 9)


def test_bad_settings_name_the_file_and_field(tmp_path):
    tower = {"model_type": "gemma3", "mm_tokens_per_image": 4, "vision_config": {"image_size": 16}}
    with pytest.raises(UnsupportedError, match="preprocessor_config.json: field 'do_pan_and_scan' is true"):
        Gemma3ImageProcessor.from_config({"size": SIZE, "do_pan_and_scan": True}, {}, tower)
    with pytest.raises(CheckpointError, match="'size' .*vision_config.image_size"):
        Gemma3ImageProcessor.from_config({"size": 24}, {}, tower)
    with pytest.raises(CheckpointError, match="processor_config.json: field 'image_seq_length' is 9.*"
                                              "mm_tokens_per_image"):
        Gemma3ImageProcessor.from_config({"size": SIZE}, {"image_seq_length": 9}, tower)
    with pytest.raises(CheckpointError, match="'size' must be an object with keys"):
        Gemma3ImageProcessor.from_config({"size": {"shortest_edge": 16}}, {}, {})
    with pytest.raises(CheckpointError, match="'resample'"):
        Gemma3ImageProcessor.from_config({"resample": 9}, {}, {})
    with pytest.raises(UnsupportedError, match="image_processor_type 'SiglipImageProcessor'"):
        Gemma3ImageProcessor.from_config({"image_processor_type": "SiglipImageProcessor"}, {}, {})
    assert Gemma3ImageProcessor.from_config({"size": SIZE}, {}, tower).image_seq_length == 4  # from config.json
    fixed = Gemma3ImageProcessor.from_config({"size": SIZE, "do_resize": False}, {}, {})
    assert fixed([_noise(16, 16)]).tensors["pixel_values"].shape == (1, 3, 16, 16)
    with pytest.raises(DataError, match="rec 2: image 1 is 37 x 53 pixels"):
        fixed([IMAGES[0]], source="rec 2")


# ---- end to end: checkpoint + processor files -> our model == transformers ---------------------------------------
def _checkpoint(folder, tokenizer):
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration
    ids = {name: tokenizer.convert_tokens_to_ids(token) for name, token in
           (("image_token_index", IMAGE_TOKEN), ("boi_token_index", BOI), ("eoi_token_index", EOI))}
    text = dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_attention_heads=2,
                num_key_value_heads=1, head_dim=16, num_hidden_layers=2, sliding_window=3, sliding_window_pattern=2,
                max_position_embeddings=256, query_pre_attn_scalar=16, pad_token_id=tokenizer.pad_token_id)
    vision = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2, patch_size=4,
                  image_size=16, vision_use_head=False)
    torch.manual_seed(7)
    model = Gemma3ForConditionalGeneration(Gemma3Config(text_config=text, vision_config=vision,
                                                        mm_tokens_per_image=SEQ, **ids)).eval()
    with torch.no_grad():  # norms off their constant starts and the projection off zeros, so every part counts
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.normal_(0.0 if "language_model" in name or "mm_soft" in name else 1.0, 0.1)
            elif "mm_input_projection" in name:
                p.normal_(0.0, 0.2)
    model.save_pretrained(str(folder))
    _reference({"size": SIZE}, tokenizer).save_pretrained(str(folder))
    return model


def test_end_to_end_logits_equal_transformers(tmp_path):
    import velotune as vt
    tokenizer = _tokenizer()
    hf = _checkpoint(tmp_path, tokenizer)
    processor = image_processor_for(tmp_path)
    assert isinstance(processor, Gemma3ImageProcessor)
    assert (processor.height, processor.image_seq_length) == (16, SEQ)

    records = [IMAGES[:2], IMAGES[3:4]]
    reference = _reference({"size": SIZE}, tokenizer)
    expected = reference(images=records, text=TEXTS, padding=True, return_tensors="pt")
    rows, per_record = [], []
    for i, (text, images) in enumerate(zip(TEXTS, records)):
        processed = processor(images)
        per_record.append(processed)
        rows.append(tokenizer(processor.expand(text, processed, f"record {i}"))["input_ids"])
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), tokenizer.pad_token_id)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(rows):
        ids[i, :len(row)] = torch.tensor(row)
        mask[i, :len(row)] = 1
    assert torch.equal(ids, expected["input_ids"]) and torch.equal(mask, expected["attention_mask"])
    pixels = processor.collate(per_record)["pixel_values"]
    pixel_diff = _max_diff(pixels, expected["pixel_values"])

    ours = vt.load(tmp_path, dtype="float32", device="cpu")[0]
    with torch.no_grad():
        theirs = hf(**expected).logits
        mine = ours(ids, attention_mask=mask, pixel_values=pixels).logits
        blank = ours(ids, attention_mask=mask, pixel_values=torch.zeros_like(pixels)).logits
    assert (blank - mine).abs().max().item() > 1e-3  # the images do reach the logits
    real = mask.bool()
    logit_diff = (mine[real] - theirs[real]).abs().max().item()
    print(f"end to end: pixel_values max abs diff {pixel_diff:.3g}, logits max abs diff {logit_diff:.3g} "
          f"(logits scale {theirs[real].abs().max().item():.3g})")
    assert pixel_diff <= PIXEL_TOL and logit_diff <= LOGIT_TOL


# Gemma 3's chat template trims each text part; the processor expands <start_of_image> in what the template wrote.
TRIMMING_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<start_of_turn>{{ 'model' if m['role'] == 'assistant' else m['role'] }}"
    "\n{% if m['content'] is string %}"
    "{{ m['content'] | trim }}{% else %}{% for item in m['content'] %}{% if item['type'] == 'image' %}"
    "{{ '<start_of_image>' }}{% elif item['type'] == 'text' %}{{ item['text'] | trim }}{% endif %}{% endfor %}"
    "{% endif %}<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}")


def test_image_tokens_go_in_after_a_trimming_chat_template(tmp_path):
    """An image at the start or end of a turn keeps the newlines around its tokens, as transformers' flow
    (template, then processor) keeps them: for a prompt (chat / serve) and for a training sample."""
    import velotune as vt
    from velotune.data.vision_data import VisionStats, encode_vision, read_vision_record
    from velotune.infer.vision_prompt import encode_image_prompt
    tokenizer = _tokenizer()
    _checkpoint(tmp_path, tokenizer)
    model = vt.load(tmp_path, dtype="float32", device="cpu", load_tokenizer_files=False)[0]
    messages = [{"role": "user", "content": [{"type": "image", "image": IMAGES[0]}, {"type": "text", "text": "What?"},
                                             {"type": "image", "image": IMAGES[1]}]}]
    reference = _reference({"size": SIZE}, tokenizer)
    hf_messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What?"},
                                                {"type": "image"}]}]
    text = tokenizer.apply_chat_template(hf_messages, chat_template=TRIMMING_TEMPLATE, tokenize=False,
                                         add_generation_prompt=True)
    expected = reference(images=[IMAGES[:2]], text=[text], add_special_tokens=False)["input_ids"][0]
    ids, _ = encode_image_prompt(model, tokenizer, messages, chat_template=TRIMMING_TEMPLATE)
    assert ids == expected
    # training: the answer appended; the prompt's ids are the same and the image tokens are never targets
    answer = [*messages, {"role": "assistant", "content": "Two."}]
    sample, refs = read_vision_record({"messages": answer}, "messages", "row 1", placeholder=BOI)
    example = encode_vision(sample, refs, image_processor_for(tmp_path), tokenizer, TRIMMING_TEMPLATE,
                            train_on="assistant", max_len=4096, overflow="truncate", stats=VisionStats(),
                            base_dir=None)
    assert example.input_ids.tolist()[:len(expected)] == expected
