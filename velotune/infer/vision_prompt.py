"""Prompts with images for a vision-language model: chat messages whose contents hold image parts (a file path, a
`data:` URI or a PIL image, in `{"type": "image", "image": ...}` or OpenAI's `{"type": "image_url", "image_url":
{"url": "data:..."}}`) and, for a family that reads videos (Qwen2-VL, Qwen2.5-VL), video parts (`{"type": "video",
"video": "clip.mp4"}`, or a list of frame images; data/vision_data.py; or, as a server receives them,
`{"type": "video_url", "video_url": {"url": "data:video/mp4;base64,..."}}`) -> token ids with each image's and
video's tokens in place, and the batch's pixel tensors.

A video_url part is decoded in memory (vision/video.py read_video_bytes: the file's sampling and caps, and bounds on
decoding an untrusted upload) into its sampled frames and their rate, which is what a video file's part becomes: the
same bytes give the same tokens and tensors either way. Its URL must be a data: URI; nothing is fetched.

The image processor is the model directory's own (preprocessor_config.json), read once per model; the video
processor goes with it (vision/processor.py video_processor_for)."""
from __future__ import annotations

import weakref

from ..errors import DataError
from .chat_render import chat_text as render_chat

_PROCESSORS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
MEDIA_TYPES = ("image", "image_url", "video", "video_url")


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
    """Whether a chat prompt holds an image or a video part."""
    if not isinstance(prompt, list):
        return False
    return any(isinstance(m, dict) and isinstance(m.get("content"), list)
               and any(isinstance(p, dict) and p.get("type") in MEDIA_TYPES for p in m["content"])
               for m in prompt)


def encode_image_prompt(model, tokenizer, messages: list, *, base_dir=None, chat_template: str | None = None,
                        where: str = "the prompt", allow_files: bool = True):
    """(token ids, image and video tensors) of one chat prompt with images or videos, rendered with the generation
    prompt. allow_files=False: images only as data: URIs or PIL images, videos only as lists of such frames (a server
    must not read its own disk for a client)."""
    from ..data import vision_data as vd
    processor = processor_of(model)
    takes_videos = bool(getattr(model, "takes_videos", False))
    messages = _decode_video_urls(messages, processor, takes_videos, where)
    sample, refs = vd.read_vision_record({"messages": messages}, "messages", where, placeholder=processor.placeholder,
                                         video_placeholder=vd.video_placeholder_of(processor) if takes_videos else None,
                                         family=getattr(model, "model_type", None))
    images, videos = vd.process_media(refs, processor, base_dir=base_dir, where=where, allow_files=allow_files)
    video_processor = vd.video_processor_of(processor) if videos is not None else None
    # The tokens replace the marks after the chat template, as transformers' processors expand theirs.
    expand = vd.rendered_expander(list(images.expansions if images else ()), processor,
                                  list(videos.expansions if videos else ()), video_processor)
    text = expand(render_chat(tokenizer, sample.messages, chat_template))
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])  # the template writes any BOS itself
    for kind, done, token in (("image", images, lambda: vd.processor_image_token_id(processor, tokenizer)),
                              ("video", videos, lambda: vd.video_token_id(video_processor, tokenizer))):
        if done is None:
            continue
        wanted = sum(done.tokens_per_image if kind == "image" else done.tokens_per_video)
        held = ids.count(token())
        if held != wanted:
            raise DataError(f"{where}: the chat template lost {kind} tokens ({held} of {wanted} survived "
                            "rendering)")
    return ids, vd.media_tensors(images, videos)


def _decode_video_urls(messages: list, processor, takes_videos: bool, where: str) -> list:
    """The messages with each video_url part replaced by a video part holding its decoded frames and their rate
    (the list it was given when there is none)."""
    if not any(isinstance(m, dict) and isinstance(m.get("content"), list)
               and any(isinstance(p, dict) and p.get("type") == "video_url" for p in m["content"]) for m in messages):
        return messages
    from ..data import vision_data as vd
    out = []
    for i, message in enumerate(messages):
        content = message.get("content") if isinstance(message, dict) else None
        if not isinstance(content, list):
            out.append(message)
            continue
        parts = []
        for j, part in enumerate(content):
            if isinstance(part, dict) and part.get("type") == "video_url":
                at = f"messages[{i}].content[{j}]" if where == "messages" else f"{where}: messages[{i}].content[{j}]"
                if not takes_videos:
                    raise DataError(f"{at}: a video part, but {vd.family_of(processor)} reads images only; videos "
                                    f"need a {vd.VIDEO_FAMILIES} model")
                part = _video_part(part, vd.video_processor_of(processor), at)
            parts.append(part)
        out.append({**message, "content": parts})
    return out


def _video_part(part: dict, video_processor, at: str) -> dict:
    """`{"type": "video", "video": [frames], "fps": their rate}` of one video_url part (a data: URI)."""
    from PIL import Image

    from ..vision.images import data_uri_bytes
    from ..vision.video import read_video_bytes
    url = part.get("video_url")
    url = url.get("url") if isinstance(url, dict) else url
    if not isinstance(url, str) or url.strip()[:5].lower() != "data:":
        raise DataError(f"{at}: video_url.url must be a data:video/...;base64 URI; video URLs are not fetched and "
                        "files are not read from a URL")
    # a bare "data:,..." or octet-stream upload is taken as a video too: the demuxer decides what it holds
    data = data_uri_bytes(url.strip(), at, kind="video", also=("", "application/octet-stream"))
    clip = read_video_bytes(data, source=at, frame_factor=video_processor.temporal_patch_size)
    # PIL frames hold the same uint8 pixels: the video processor turns them back into the array a file gives
    return {"type": "video", "video": [Image.fromarray(frame) for frame in clip.frames], "fps": clip.fps}


def flatten_for_text(messages: list) -> list:
    """Messages with image and video parts refused, for a text-only model."""
    if has_images(messages):
        raise DataError("this model reads text only; images or videos were given (use a vision-language model, such "
                        "as a LLaVA, Qwen2-VL or Idefics3 checkpoint)")
    return messages


__all__ = ["encode_image_prompt", "flatten_for_text", "has_images", "is_vision_model", "processor_of"]
