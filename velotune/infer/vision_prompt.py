"""Prompts with images for a vision-language model: chat messages whose contents hold image parts (a file path, a
`data:` URI or a PIL image, in `{"type": "image", "image": ...}` or OpenAI's `{"type": "image_url", "image_url":
{"url": "data:..."}}`) -> token ids with each image's tokens in place, and the batch's pixel tensors.

The image processor is the model directory's own (preprocessor_config.json), read once per model."""
from __future__ import annotations

import weakref

from ..errors import DataError
from .chat_render import chat_text as render_chat

_PROCESSORS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def is_vision_model(model) -> bool:
    from ..models.vision.base import VisionLanguageModel
    return isinstance(model, VisionLanguageModel)


def processor_of(model):
    """The image processor of the directory `model` was loaded from (cached per model)."""
    found = _PROCESSORS.get(model)
    if found is None:
        from ..vision.processor import image_processor_for
        if model.source_dir is None:
            raise DataError("this vision-language model was not loaded from a directory: velotune reads its image "
                            "processor (preprocessor_config.json) from there")
        found = _PROCESSORS[model] = image_processor_for(model.source_dir)
    return found


def has_images(prompt) -> bool:
    """Whether a chat prompt holds an image part."""
    if not isinstance(prompt, list):
        return False
    return any(isinstance(m, dict) and isinstance(m.get("content"), list)
               and any(isinstance(p, dict) and p.get("type") in ("image", "image_url") for p in m["content"])
               for m in prompt)


def encode_image_prompt(model, tokenizer, messages: list, *, base_dir=None, chat_template: str | None = None,
                        where: str = "the prompt", allow_files: bool = True):
    """(token ids, image tensors) of one chat prompt with images, rendered with the generation prompt.
    allow_files=False: images only as data: URIs or PIL images (a server must not read its own disk for a client)."""
    from ..data.vision_data import processor_image_token_id, read_vision_record, rendered_expander
    from ..vision.images import load_image
    processor = processor_of(model)
    sample, refs = read_vision_record({"messages": messages}, "messages", where, placeholder=processor.placeholder)
    images = [load_image(ref, base_dir=base_dir, source=where, allow_files=allow_files) for ref in refs]
    processed = processor(images, source=where)
    # The image tokens replace the marks after the chat template, as transformers' processors expand theirs.
    text = rendered_expander(list(processed.expansions), processor)(render_chat(tokenizer, sample.messages,
                                                                              chat_template))
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])  # the template writes any BOS itself
    held = sum(1 for i in ids if i == processor_image_token_id(processor, tokenizer))
    if held != sum(processed.tokens_per_image):
        raise DataError(f"{where}: the chat template lost image tokens ({held} of "
                        f"{sum(processed.tokens_per_image)} survived rendering)")
    return ids, dict(processed.tensors)


def flatten_for_text(messages: list) -> list:
    """Messages with image parts refused, for a text-only model."""
    if has_images(messages):
        raise DataError("this model reads text only; images were given (use a vision-language model, such as a "
                        "LLaVA, Qwen2-VL or Idefics3 checkpoint)")
    return messages


__all__ = ["encode_image_prompt", "flatten_for_text", "has_images", "is_vision_model", "processor_of"]
