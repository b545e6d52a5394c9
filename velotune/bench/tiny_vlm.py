"""A tiny LLaVA-style vision-language checkpoint with random weights, written as transformers writes one: a CLIP
vision tower, a two-layer projector and a Llama text model, a byte-level BPE tokenizer with an `<image>` token and a
ChatML template, and the processor files (preprocessor_config.json, processor_config.json).

For the learning benchmark and tests, which may not download a model: everything is built in-process and seeded."""
from __future__ import annotations

import json
from pathlib import Path

import torch

IMAGE_TOKEN = "<image>"

# Sizes: "tiny" for tests (seconds), "small" for the learning benchmark (a few CPU minutes).
SIZES = {
    "tiny": dict(vision_hidden=32, vision_layers=2, vision_heads=4, text_hidden=64, text_layers=2, text_heads=4,
                 vocab=320),
    "small": dict(vision_hidden=96, vision_layers=3, vision_heads=4, text_hidden=128, text_layers=3, text_heads=4,
                  vocab=384),
    # "bench" for the speed benchmark (velotune.bench.vision): a ViT-S-like tower (at 224 px / patch 16: 196 image
    # tokens) and a small Llama, the shape of a real LLaVA at a size one CPU core trains in seconds a step.
    "bench": dict(vision_hidden=384, vision_layers=8, vision_heads=6, text_hidden=512, text_layers=6, text_heads=8,
                  vocab=4096),
}


def vlm_tokenizer(texts, image_tokens: list[str], vocab: int):
    """The demo's byte-level BPE trained on `texts`, ChatML template, with the family's image tokens as special
    tokens."""
    from transformers import PreTrainedTokenizerFast

    from ..demo.tokenizer import BOS, CHAT_TEMPLATE, EOS, IM_START, PAD, train_bpe
    bpe = train_bpe(list(texts), vocab)
    bpe.add_special_tokens(image_tokens)
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe, bos_token=BOS, eos_token=EOS, pad_token=PAD,
        additional_special_tokens=[IM_START, *image_tokens], chat_template=CHAT_TEMPLATE, model_max_length=512,
        padding_side="right", clean_up_tokenization_spaces=False)


def make_tiny_llava(out_dir, texts, *, image_size: int = 32, patch_size: int = 8, size: str = "tiny",
                    select_strategy: str = "default", seed: int = 0) -> Path:
    """Writes the checkpoint directory; returns it. `texts`: what the tokenizer is trained on (the data's
    questions and answers)."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration
    dims = SIZES[size]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = vlm_tokenizer(texts, [IMAGE_TOKEN], dims["vocab"])
    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    vocab = len(tokenizer)
    config = LlavaConfig(
        vision_config=dict(model_type="clip_vision_model", hidden_size=dims["vision_hidden"],
                           intermediate_size=4 * dims["vision_hidden"], num_hidden_layers=dims["vision_layers"],
                           num_attention_heads=dims["vision_heads"], image_size=image_size, patch_size=patch_size,
                           projection_dim=dims["vision_hidden"]),
        text_config=dict(model_type="llama", hidden_size=dims["text_hidden"],
                         intermediate_size=4 * dims["text_hidden"], num_hidden_layers=dims["text_layers"],
                         num_attention_heads=dims["text_heads"], num_key_value_heads=dims["text_heads"],
                         vocab_size=vocab, max_position_embeddings=512, tie_word_embeddings=False,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id),
        image_token_id=image_token_id, image_seq_length=(image_size // patch_size) ** 2, vision_feature_layer=-1, vision_feature_select_strategy=select_strategy,
        projector_hidden_act="gelu")
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).eval()
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    mean, std = [0.5, 0.5, 0.5], [0.5, 0.5, 0.5]
    preprocessor = {"image_processor_type": "CLIPImageProcessor", "processor_class": "LlavaProcessor",
                    "do_resize": True, "size": {"shortest_edge": image_size}, "resample": 3,
                    "do_center_crop": True, "crop_size": {"height": image_size, "width": image_size},
                    "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": mean,
                    "image_std": std, "do_convert_rgb": True}
    processor = {"processor_class": "LlavaProcessor", "patch_size": patch_size,
                 "vision_feature_select_strategy": select_strategy, "num_additional_image_tokens": 1,
                 "image_token": IMAGE_TOKEN}
    (out / "preprocessor_config.json").write_text(json.dumps(preprocessor, indent=2) + "\n", encoding="utf-8")
    (out / "processor_config.json").write_text(json.dumps(processor, indent=2) + "\n", encoding="utf-8")
    return out


__all__ = ["IMAGE_TOKEN", "SIZES", "make_tiny_llava", "vlm_tokenizer"]
