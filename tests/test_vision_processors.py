"""velotune.vision processors against transformers: tensors equal the `*ImageProcessorPil` outputs on the same
images (several sizes, odd aspect ratios, RGBA / greyscale / palette), expansion strings equal what LlavaProcessor,
Qwen2VLProcessor and Idefics3Processor put in the text (and the token ids match), batches equal transformers'
batched call, and the checkpoint files are read in both layouts transformers writes. Tiny sizes: seconds."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_tokenizer import make_tokenizer

from velotune.errors import CheckpointError, DataError, UnsupportedError
from velotune.vision import ImageCounters, image_processor_for
from velotune.vision.clip_processor import ClipImageProcessor
from velotune.vision.idefics3_processor import Idefics3ImageProcessor, image_prompt
from velotune.vision.qwen2_vl_processor import Qwen2VLImageProcessor

TOL = 1e-5


def _noise(width: int, height: int, mode: str = "RGB", seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed + width * 1000 + height)
    image = Image.fromarray(rng.integers(0, 256, (height, width, 4), dtype=np.uint8), "RGBA")
    return image if mode == "RGBA" else image.convert(mode)


# Small, square, very wide, very tall, odd sizes, and the three non-RGB kinds a data set holds.
IMAGES = [_noise(37, 53), _noise(500, 120), _noise(90, 700), _noise(64, 64, "RGBA"), _noise(121, 80, "L"),
          _noise(301, 300, "P"), _noise(17, 19)]

CLIP = {"size": {"shortest_edge": 30}, "crop_size": {"height": 28, "width": 28}}
SIGLIP = {"size": {"height": 32, "width": 48}}
LLAVA_PAD = {**CLIP, "do_pad": True}
QWEN = {"patch_size": 4, "merge_size": 2, "temporal_patch_size": 2, "min_pixels": 64, "max_pixels": 64 * 64}
IDEFICS = {"size": {"longest_edge": 96}, "max_image_size": {"longest_edge": 32}}
TEXT = "Look <image> and <image>, then <image>."
MAX_DIFFS: dict[str, float] = {}


def _max_diff(ours: torch.Tensor, theirs: torch.Tensor, label: str) -> float:
    assert ours.shape == theirs.shape, (label, ours.shape, theirs.shape)
    assert ours.dtype == theirs.dtype, (label, ours.dtype, theirs.dtype)
    diff = (ours.double() - theirs.double()).abs().max().item() if ours.numel() else 0.0
    MAX_DIFFS[label] = max(diff, MAX_DIFFS.get(label, 0.0))
    print(f"max abs diff {label}: {diff:.3g}")
    return diff


def _reference(name: str, **settings):
    import transformers
    return getattr(transformers, name)(**settings)


def _cases():
    return [
        ("clip", ClipImageProcessor.from_config(CLIP, {"patch_size": 14}, {}),
         _reference("CLIPImageProcessorPil", **CLIP)),
        ("clip-bilinear", ClipImageProcessor.from_config({**CLIP, "resample": 2}, {"patch_size": 14}, {}),
         _reference("CLIPImageProcessorPil", **CLIP, resample=2)),
        ("siglip", ClipImageProcessor.from_config({**SIGLIP, "image_processor_type": "SiglipImageProcessor"},
                                                  {"patch_size": 16}, {}),
         _reference("SiglipImageProcessorPil", **SIGLIP)),
        ("llava-pad", ClipImageProcessor.from_config({**LLAVA_PAD, "image_processor_type": "LlavaImageProcessor"},
                                                     {"patch_size": 14}, {}),
         _reference("LlavaImageProcessorPil", **LLAVA_PAD)),
        ("qwen2_vl", Qwen2VLImageProcessor.from_config(QWEN, {}, {}), _reference("Qwen2VLImageProcessorPil", **QWEN)),
        ("idefics3", Idefics3ImageProcessor.from_config(IDEFICS, {"image_seq_len": 4}, {}),
         _reference("Idefics3ImageProcessorPil", **IDEFICS)),
        ("idefics3-nosplit", Idefics3ImageProcessor.from_config({**IDEFICS, "do_image_splitting": False},
                                                                {"image_seq_len": 4}, {}),
         _reference("Idefics3ImageProcessorPil", **IDEFICS, do_image_splitting=False)),
        ("smolvlm", Idefics3ImageProcessor.from_config(IDEFICS, {"image_seq_len": 4}, {"model_type": "smolvlm"}),
         _reference("SmolVLMImageProcessorPil", **IDEFICS)),
    ]


@pytest.mark.parametrize("index", range(8), ids=[c[0] for c in _cases()])
def test_tensors_equal_transformers_pil_processors(index):
    label, ours, theirs = _cases()[index]
    processed = ours(IMAGES)
    expected = theirs(IMAGES, return_tensors="pt")
    assert set(processed.tensors) == set(ours.tensor_names)
    for name in ours.tensor_names:
        assert _max_diff(processed.tensors[name], expected[name], f"{label}.{name}") <= TOL
    assert len(processed.expansions) == len(processed.tokens_per_image) == len(IMAGES)
    for expansion, count in zip(processed.expansions, processed.tokens_per_image):
        assert expansion.count(ours.image_token) == count


# ---- expansions against transformers' processors ---------------------------------------------------------------
def _tokenizer(*special: str):
    tokenizer = make_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": list(special)})
    return tokenizer


def _expansions_match(reference, ours, text: str, images, tokenizer):
    expected = reference(images=images, text=text, return_text_replacement_offsets=True)
    processed = ours(images)
    replacements = [entry["replacement"] for entry in expected["text_replacement_offsets"][0]]
    assert replacements == processed.expansions
    expanded = ours.expand(text, processed, "test record")
    assert tokenizer(expanded)["input_ids"] == expected["input_ids"][0]
    return processed, expected


@pytest.mark.parametrize("strategy,extra", [("default", 1), ("full", 0)])
def test_llava_expansion(strategy, extra):
    from transformers import CLIPImageProcessorPil, LlavaProcessor

    tokenizer = _tokenizer("<image>")
    fields = {"patch_size": 14, "vision_feature_select_strategy": strategy, "num_additional_image_tokens": extra}
    reference = LlavaProcessor(image_processor=CLIPImageProcessorPil(**CLIP), tokenizer=tokenizer, **fields)
    ours = ClipImageProcessor.from_config(CLIP, fields, {})
    processed, _ = _expansions_match(reference, ours, TEXT, IMAGES[:3], tokenizer)
    assert processed.tokens_per_image == [4 + extra - (strategy == "default")] * 3


def test_qwen2_vl_expansion():
    from transformers import Qwen2VLImageProcessorPil, Qwen2VLProcessor

    class WithoutVideo(Qwen2VLProcessor):
        # Its video processor needs torchvision; images never touch it.
        def check_argument_for_proper_class(self, name, arg):
            return None if name == "video_processor" else super().check_argument_for_proper_class(name, arg)

    tokenizer = _tokenizer("<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>")
    reference = WithoutVideo(image_processor=Qwen2VLImageProcessorPil(**QWEN), tokenizer=tokenizer,
                             video_processor=None)
    text = TEXT.replace("<image>", "<|vision_start|><|image_pad|><|vision_end|>")
    processed, expected = _expansions_match(reference, Qwen2VLImageProcessor.from_config(QWEN, {}, {}), text,
                                            IMAGES[:3], tokenizer)
    grid = expected["image_grid_thw"]
    assert processed.tokens_per_image == (grid.prod(-1) // 4).tolist()
    # An image part of a chat renders as the template would write it: the expansion between the delimiters.
    ours = Qwen2VLImageProcessor.from_config(QWEN, {}, {})
    assert ours.wrap("<|image_pad|>") == "<|vision_start|><|image_pad|><|vision_end|>"
    assert ClipImageProcessor.from_config(CLIP, {}, {}).wrap("<image>") == "<image>"


def test_idefics3_expansion_split_and_unsplit():
    from transformers import Idefics3ImageProcessorPil, Idefics3Processor

    rows_cols = [f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7)]
    tokenizer = _tokenizer("<image>", "<fake_token_around_image>", "<global-img>", *rows_cols)
    for settings in (IDEFICS, {**IDEFICS, "do_image_splitting": False}):
        reference = Idefics3Processor(image_processor=Idefics3ImageProcessorPil(**settings), tokenizer=tokenizer,
                                      image_seq_len=4)
        ours = Idefics3ImageProcessor.from_config(settings, {"image_seq_len": 4}, {})
        _expansions_match(reference, ours, TEXT, IMAGES[:3], tokenizer)


def test_smolvlm_prompt_string_is_idefics3s():
    from transformers.models.smolvlm.processing_smolvlm import get_image_prompt_string

    for rows, cols in ((0, 0), (1, 3), (2, 2), (4, 1)):
        assert image_prompt(rows, cols, 5) == get_image_prompt_string(
            rows, cols, 5, fake_token_around_image="<fake_token_around_image>", image_token="<image>",
            global_image_token="<global-img>")


# ---- batches --------------------------------------------------------------------------------------------------
def test_collate_equals_transformers_batches():
    from transformers import (
        CLIPImageProcessorPil,
        Idefics3ImageProcessorPil,
        Qwen2VLImageProcessorPil,
    )

    records = [IMAGES[:2], [], IMAGES[2:5]]
    flat = [image for record in records for image in record]
    for ours, theirs in ((ClipImageProcessor.from_config(CLIP, {"patch_size": 14}, {}),
                          CLIPImageProcessorPil(**CLIP)),
                         (Qwen2VLImageProcessor.from_config(QWEN, {}, {}), Qwen2VLImageProcessorPil(**QWEN))):
        batch = ours.collate([ours(record) for record in records])
        expected = theirs(flat, return_tensors="pt")
        for name in ours.tensor_names:
            assert _max_diff(batch[name], expected[name], f"collate.{name}") <= TOL
    ours = Idefics3ImageProcessor.from_config(IDEFICS, {"image_seq_len": 4}, {})
    batch = ours.collate([ours(record) for record in records])
    expected = Idefics3ImageProcessorPil(**IDEFICS)(records, return_tensors="pt")
    for name in ours.tensor_names:
        assert _max_diff(batch[name], expected[name], f"collate.idefics3.{name}") <= TOL
    assert ours.collate([ours([]), ours([])]) == {}


# ---- placeholders and counting ------------------------------------------------------------------------------------
def test_placeholder_count_mismatch_both_ways():
    ours = ClipImageProcessor.from_config(CLIP, {"patch_size": 14}, {})
    two = ours(IMAGES[:2])
    for text, found in (("<image> <image> <image>", 3), ("only <image>", 1), ("no placeholder", 0)):
        with pytest.raises(DataError) as caught:
            ours.expand(text, two, "train.jsonl line 7")
        message = str(caught.value)
        assert "train.jsonl line 7" in message and f"{found} image placeholder" in message and "2 image(s)" in message
    assert ours.expand("plain", ours([]), "x") == "plain"


def test_images_over_the_maximum_are_resized_and_counted():
    big, small = _noise(200, 150), _noise(20, 10)
    qwen = Qwen2VLImageProcessor.from_config(QWEN, {}, {})
    processed = qwen([big, small])
    assert processed.resized == 1
    _, h, w = processed.tensors["image_grid_thw"][0].tolist()
    assert h * w * 16 <= QWEN["max_pixels"]
    idefics = Idefics3ImageProcessor.from_config(IDEFICS, {"image_seq_len": 4}, {})
    assert idefics([big, small]).resized == 1
    clip = ClipImageProcessor.from_config(CLIP, {"patch_size": 14}, {})
    assert clip([big, small]).resized == 1
    counters = ImageCounters()
    counters.add(processed)
    assert (counters.images, counters.resized) == (2, 1)


def test_extreme_aspect_ratio_is_a_data_error_naming_the_record():
    with pytest.raises(DataError, match="rec 4: image 2 .*aspect ratio"):
        Qwen2VLImageProcessor.from_config(QWEN, {}, {})([_noise(8, 8), _noise(1000, 4)], source="rec 4")


# ---- checkpoint files ------------------------------------------------------------------------------------------------
def _write(folder, name, data):
    (folder / name).write_text(json.dumps(data))


def test_from_dir_reads_both_layouts_transformers_writes(tmp_path):
    from transformers import CLIPImageProcessorPil, LlavaProcessor

    fields = {"patch_size": 14, "vision_feature_select_strategy": "default", "num_additional_image_tokens": 1}
    nested, legacy = tmp_path / "nested", tmp_path / "legacy"
    LlavaProcessor(image_processor=CLIPImageProcessorPil(**CLIP), tokenizer=_tokenizer("<image>"),
                   **fields).save_pretrained(nested)
    CLIPImageProcessorPil(**CLIP).save_pretrained(legacy)
    _write(legacy, "processor_config.json", {**fields, "processor_class": "LlavaProcessor"})
    expected = CLIPImageProcessorPil(**CLIP)(IMAGES, return_tensors="pt")["pixel_values"]
    for folder in (nested, legacy):
        _write(folder, "config.json", {"model_type": "llava", "vision_config": {"model_type": "clip_vision_model",
                                                                                "patch_size": 14}})
        ours = image_processor_for(folder)
        assert isinstance(ours, ClipImageProcessor)
        assert _max_diff(ours(IMAGES).tensors["pixel_values"], expected, "from_dir.clip") <= TOL
        assert ours.processor_dict()["patch_size"] == 14


@pytest.mark.parametrize("model_type,cls", [("llava", ClipImageProcessor), ("qwen2_vl", Qwen2VLImageProcessor),
                                            ("qwen2_5_vl", Qwen2VLImageProcessor),
                                            ("idefics3", Idefics3ImageProcessor),
                                            ("smolvlm", Idefics3ImageProcessor)])
def test_to_dict_round_trips_through_transformers(tmp_path, model_type, cls):
    from transformers import AutoImageProcessor

    settings = {ClipImageProcessor: CLIP, Qwen2VLImageProcessor: QWEN, Idefics3ImageProcessor: IDEFICS}[cls]
    ours = cls.from_config(settings, {"patch_size": 14, "image_seq_len": 4}, {"model_type": model_type})
    _write(tmp_path, "preprocessor_config.json", ours.to_dict())
    _write(tmp_path, "processor_config.json", ours.processor_dict())
    _write(tmp_path, "config.json", {"model_type": model_type})
    again = image_processor_for(tmp_path)
    assert type(again) is cls and again.to_dict() == ours.to_dict()
    theirs = AutoImageProcessor.from_pretrained(tmp_path)
    expected = theirs(IMAGES[:4], return_tensors="pt")
    processed = again(IMAGES[:4])
    for name in cls.tensor_names:
        assert _max_diff(processed.tensors[name], expected[name], f"roundtrip.{model_type}.{name}") <= TOL


def test_token_counts_fall_back_to_config_json():
    clip_tower = {"model_type": "llava", "vision_config": {"model_type": "clip_vision_model", "patch_size": 14}}
    siglip_tower = {"model_type": "llava", "vision_feature_select_strategy": "full",
                    "vision_config": {"model_type": "siglip_vision_model", "patch_size": 14}}
    assert ClipImageProcessor.from_config(CLIP, {}, clip_tower).tokens_for(28, 28) == 4      # +CLS -first
    siglip_settings = {**SIGLIP, "image_processor_type": "SiglipImageProcessor"}
    assert ClipImageProcessor.from_config(siglip_settings, {}, siglip_tower).tokens_for(28, 28) == 4  # no CLS, full
    config = {"model_type": "idefics3", "scale_factor": 2, "vision_config": {"image_size": 32, "patch_size": 4}}
    assert Idefics3ImageProcessor.from_config(IDEFICS, {}, config).image_seq_len == 16
    assert Qwen2VLImageProcessor.from_config({}, {}, {"vision_config": {"patch_size": 4, "spatial_merge_size": 2,
                                                                        "temporal_patch_size": 2}}).factor == 8


def test_bad_settings_name_the_file_and_field(tmp_path):
    files = {"model_type": "llava"}
    for settings, words in (({**CLIP, "resample": 9}, ("'resample'",)),
                            ({**CLIP, "image_std": [1, 0, 1]}, ("'image_std'",)),
                            ({**CLIP, "size": {"longest_edge": 3}}, ("'size'",))):
        with pytest.raises(CheckpointError) as caught:
            ClipImageProcessor.from_config(settings, {}, files)
        assert "preprocessor_config.json" in str(caught.value) and all(w in str(caught.value) for w in words)
    with pytest.raises(CheckpointError, match="patch_size is 4 but the vision tower's patch_size"):
        Qwen2VLImageProcessor.from_config(QWEN, {}, {"vision_config": {"patch_size": 14}})
    with pytest.raises(UnsupportedError, match="image_processor_type 'ViTImageProcessor'"):
        ClipImageProcessor.from_config({"image_processor_type": "ViTImageProcessor"}, {}, files)


def test_image_processor_for_refuses_unknown_types_and_missing_files(tmp_path):
    _write(tmp_path, "config.json", {"model_type": "llama"})
    with pytest.raises(UnsupportedError) as caught:
        image_processor_for(tmp_path)
    message = str(caught.value)
    assert "config.json" in message and "'llama'" in message and "qwen2_vl" in message and "smolvlm" in message
    _write(tmp_path, "config.json", {"model_type": "llava"})
    with pytest.raises(CheckpointError, match="no preprocessor_config.json"):
        image_processor_for(tmp_path)
    with pytest.raises(CheckpointError, match="config.json: not found"):
        image_processor_for(tmp_path / "absent")
    _write(tmp_path, "preprocessor_config.json", {})
    with pytest.raises(CheckpointError, match="model_type 'llava' is not one Qwen2VLImageProcessor processes"):
        Qwen2VLImageProcessor.from_dir(tmp_path)
