"""Tiny Qwen2-VL, Idefics3 and Gemma 3 checkpoints with random weights, written as transformers writes them (config,
safetensors, a byte-level BPE tokenizer with the family's image tokens and a ChatML template, the processor files),
beside tiny_vlm.py's LLaVA: the data pipeline, training and generation are tested on every family's own tokens and
processing. Built in-process and seeded; nothing is downloaded."""
from __future__ import annotations

import json
from pathlib import Path

import torch

TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=False)


def _tokenizer(texts, image_tokens: list[str]):
    from .tiny_vlm import vlm_tokenizer
    return vlm_tokenizer(texts, image_tokens, vocab=320)


def _special_ids(tokenizer) -> dict:
    return dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id)


def _write(out: Path, model, tokenizer, preprocessor: dict, processor: dict) -> Path:
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    (out / "preprocessor_config.json").write_text(json.dumps(preprocessor, indent=2) + "\n", encoding="utf-8")
    (out / "processor_config.json").write_text(json.dumps(processor, indent=2) + "\n", encoding="utf-8")
    return out


def make_tiny_qwen2_vl(out_dir, texts, *, family: str = "qwen2_vl", seed: int = 0) -> Path:
    """Qwen2-VL (family "qwen2_vl") or Qwen2.5-VL ("qwen2_5_vl"): patch 4, merge 2, images of 16..64 px a side."""
    from transformers import (Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2VLConfig,
                              Qwen2VLForConditionalGeneration)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = _tokenizer(texts, ["<|vision_start|>", "<|image_pad|>", "<|vision_end|>", "<|video_pad|>"])
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in ("<|vision_start|>", "<|image_pad|>", "<|vision_end|>",
                                                           "<|video_pad|>")}
    text = dict(TEXT, vocab_size=len(tokenizer), rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]},
                **_special_ids(tokenizer))
    vision = dict(depth=2, embed_dim=32, hidden_size=64, num_heads=4, patch_size=4, spatial_merge_size=2,
                  temporal_patch_size=2, in_chans=3)
    if family == "qwen2_5_vl":
        vision = dict(depth=2, hidden_size=32, out_hidden_size=64, intermediate_size=64, num_heads=4, patch_size=4,
                      spatial_merge_size=2, temporal_patch_size=2, window_size=16, fullatt_block_indexes=[1])
        config_class, model_class = Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
    else:
        config_class, model_class = Qwen2VLConfig, Qwen2VLForConditionalGeneration
    config = config_class(text_config=text, vision_config=vision, image_token_id=ids["<|image_pad|>"],
                          video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
                          vision_end_token_id=ids["<|vision_end|>"], tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = model_class(config).eval()
    preprocessor = {"image_processor_type": "Qwen2VLImageProcessor", "processor_class": "Qwen2VLProcessor",
                    "patch_size": 4, "merge_size": 2, "temporal_patch_size": 2, "min_pixels": 16 * 16,
                    "max_pixels": 64 * 64, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}
    return _write(out, model, tokenizer, preprocessor, {"processor_class": "Qwen2VLProcessor"})


def make_tiny_idefics3(out_dir, texts, *, seed: int = 0) -> Path:
    """Idefics3 with a SigLIP tower on 16 px images (patch 4, scale factor 2: 4 image tokens an image), no
    splitting."""
    from transformers import Idefics3Config, Idefics3ForConditionalGeneration
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows_cols = [f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7)]
    tokenizer = _tokenizer(texts, ["<image>", "<fake_token_around_image>", "<global-img>", *rows_cols])
    text = dict(TEXT, model_type="llama", vocab_size=len(tokenizer), **_special_ids(tokenizer))
    config = Idefics3Config(text_config=text, vision_config=dict(hidden_size=32, intermediate_size=64,
                                                                 num_hidden_layers=2, num_attention_heads=4,
                                                                 image_size=16, patch_size=4),
                            image_token_id=tokenizer.convert_tokens_to_ids("<image>"), scale_factor=2,
                            tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = Idefics3ForConditionalGeneration(config).eval()
    preprocessor = {"image_processor_type": "Idefics3ImageProcessor", "processor_class": "Idefics3Processor",
                    "do_image_splitting": False, "size": {"longest_edge": 16}, "max_image_size": {"longest_edge": 16},
                    "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5], "resample": 1}
    return _write(out, model, tokenizer, preprocessor, {"processor_class": "Idefics3Processor", "image_seq_len": 4})


def make_tiny_gemma3(out_dir, texts, *, seed: int = 0) -> Path:
    """Gemma 3 with a SigLIP tower on 16 px images (patch 4: a 4 x 4 grid pooled to 4 image tokens), local layers
    with a window of 8 (shorter than a prompt: the image block rule and the window both matter)."""
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = _tokenizer(texts, ["<start_of_image>", "<end_of_image>", "<image_soft_token>"])
    ids = {name: tokenizer.convert_tokens_to_ids(token) for name, token in (
        ("boi_token_index", "<start_of_image>"), ("eoi_token_index", "<end_of_image>"),
        ("image_token_index", "<image_soft_token>"))}
    text = dict(TEXT, vocab_size=len(tokenizer), head_dim=16, sliding_window=8, query_pre_attn_scalar=16,
                **_special_ids(tokenizer))
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, patch_size=4,
                  image_size=16, vision_use_head=False)
    torch.manual_seed(seed)
    model = Gemma3ForConditionalGeneration(Gemma3Config(text_config=text, vision_config=vision,
                                                        mm_tokens_per_image=4, **ids)).eval()
    preprocessor = {"image_processor_type": "Gemma3ImageProcessor", "processor_class": "Gemma3Processor",
                    "size": {"height": 16, "width": 16}, "image_mean": [0.5, 0.5, 0.5],
                    "image_std": [0.5, 0.5, 0.5], "resample": 2}
    return _write(out, model, tokenizer, preprocessor, {"processor_class": "Gemma3Processor", "image_seq_length": 4})


__all__ = ["make_tiny_gemma3", "make_tiny_idefics3", "make_tiny_qwen2_vl"]
