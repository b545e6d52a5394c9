"""Conversations with images and videos -> token ids, labels and pixel tensors, for vision-language fine-tuning.

Records are the chat formats (`messages`, or sharegpt's `conversations`) whose contents may hold image parts, as TRL,
Unsloth and mlx-vlm accept them:
    {"messages": [{"role": "user", "content": [{"type": "image", "image": "digits/3.png"},
                                               {"type": "text", "text": "Which digit is this?"}]},
                  {"role": "assistant", "content": "3"}]}
An image part names its image (`image`, `path`, or OpenAI's `image_url.url` as a data URI) or leaves it to the
record's `images` column, taken in order; a literal placeholder in text ("<image>") also takes the next image of the
column. Every image of a record is matched to exactly one place: more places than images, or the reverse, is an error
naming the record.

Families that read videos (Qwen2-VL, Qwen2.5-VL) also take video parts, `{"type": "video", "video": "clip.mp4"}`
(or `path`; or a list of frame images as the video; `fps`: the rate a file is sampled at, default 2 a second, or the
rate of listed frames), or the record's `videos` column the same way. A file is decoded and sampled by
vision/video.py, relative paths relative to the data file as for images. A video part given to a family that reads
images only is an error naming the record.

Each image's place becomes the processor's expansion (the family's image tokens, e.g. 576 `<image>` tokens, or
Idefics3's tiles with their row/column tokens), each video's its video processor's (`<|video_pad|>` tokens); the
conversation is then encoded as any chat sample (data/encode.py): the loss is on the assistant's answers only, so
image and video tokens and prompts carry none. Images and videos in assistant turns are refused (their tokens would
be targets). A sample cut by max_seq_length inside its image or video tokens is dropped and counted (the features
would no longer fit their tokens).
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from ..errors import DataError
from .encode import IGNORE_INDEX, DataStats, Encoded, encode
from .formats import normalise
from .vision_media import (VIDEO_FAMILIES, VideoRef, family_of, media_tensors, process_media, video_placeholder_of,
                           video_processor_of, video_ref)

log = logging.getLogger("velotune")

# Stand for "an image (a video) goes here" between reading a record and knowing its expansion: private-use characters
# no tokenizer or template produces. A part takes the family's delimiters with its tokens (Qwen2-VL's
# <|vision_start|> ... <|vision_end|>); a placeholder written in the text keeps the delimiters the text has.
IMAGE_MARK = "\ue000"
BARE_IMAGE_MARK = "\ue001"
VIDEO_MARK = "\ue002"
BARE_VIDEO_MARK = "\ue003"
MARKS = (IMAGE_MARK, BARE_IMAGE_MARK, VIDEO_MARK, BARE_VIDEO_MARK)


@dataclass
class VisionExample(Encoded):
    images: dict = field(default_factory=dict)   # transformers' names -> tensors of this sample's images and videos;
                                                 # empty when none, or when they are read again per batch (`reload`)
    num_images: int = 0
    refs: list = field(default_factory=list)     # the images (and VideoRefs) as the record names them
    base_dir: Path | None = None                 # what relative references are relative to
    num_videos: int = 0

    @property
    def image_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.images.values())

    def drop_images(self) -> bool:
        """Keeps only the references (`images_of` reads and processes them again when a batch needs them); False
        when they cannot be read again (given as objects, not paths or data URIs)."""
        if (self.num_images or self.num_videos) and len(self.refs) != self.num_images + self.num_videos:
            return False
        self.images = {}
        return True


def images_of(example: VisionExample, processor) -> dict:
    """The example's image and video tensors: kept ones, else read and processed again (the same pixels:
    processing is deterministic)."""
    if example.images or not (example.num_images or example.num_videos):
        return example.images
    where = example.origin or "<sample>"
    return media_tensors(*process_media(example.refs, processor, base_dir=example.base_dir, where=where))


@dataclass
class VisionStats(DataStats):
    images: int = 0              # images read (kept samples)
    resized: int = 0             # images over the processor's maximum, shrunk
    cut_in_images: int = 0       # samples dropped: max_seq_length fell inside their image (or video) tokens
    reread: int = 0              # images and videos not kept in memory (vision.image_cache_mb): read again per batch
    videos: int = 0              # videos read (kept samples)


# ---- records -----------------------------------------------------------------------------------------------------
class _Columns:
    """The record's `images` and `videos` columns, handed out in order to the places without their own reference."""

    def __init__(self, record: dict):
        self.items = {"image": _column(record, "images", "image"), "video": _column(record, "videos")}
        self.used = {"image": 0, "video": 0}

    def take(self, kind: str, at: str):
        column = self.items[kind]
        if self.used[kind] >= len(column):
            raise DataError(f"{at}: more {kind} places than {kind}s: the record's '{kind}s' column holds "
                            f"{len(column)} {kind}(s)")
        self.used[kind] += 1
        return column[self.used[kind] - 1]


def _column(record: dict, *keys: str) -> list:
    column = next((record[k] for k in keys if record.get(k)), [])
    return list(column) if isinstance(column, (list, tuple)) else [column]


def _part_ref(part: dict, at: str):
    """The image a content part names, or None when it leaves it to the `images` column."""
    if part.get("type") == "image_url":
        url = part.get("image_url")
        url = url.get("url") if isinstance(url, dict) else url
        if not isinstance(url, str):
            raise DataError(f"{at}: an image_url part needs image_url.url (a data: URI)")
        return url
    for key in ("image", "path", "url"):
        if part.get(key) is not None:
            return part[key]
    return None


def _flatten_content(content, at: str, placeholders: dict, refs: list, columns: _Columns, family: str | None):
    """Text with a mark at each image or video; appends each one's reference (its own or the column's next) to
    refs. `placeholders`: kind -> the text placeholder that takes the column's next (None: not recognised)."""
    if content is None:
        raise DataError(f"{at} has no content")
    parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
    if not isinstance(parts, list):
        raise DataError(f"{at}: content must be text or a list of parts, got {type(content).__name__}")
    written = {kind: p for kind, p in placeholders.items() if p}
    split = re.compile("(" + "|".join(map(re.escape, written.values())) + ")") if written else None
    pieces = []
    for k, part in enumerate(parts):
        where = f"{at}.content[{k}]"
        if not isinstance(part, dict):
            raise DataError(f"{where}: a content part must be an object, got {type(part).__name__}")
        kind = part.get("type", "text")
        if kind == "text":
            text = part.get("text")
            if not isinstance(text, str):
                raise DataError(f"{where}: a text part needs 'text' (a string)")
            if split is None or not split.search(text):
                pieces.append(text)
                continue
            for piece in split.split(text):   # LLaVA-style data: "<image>\nWhat is shown?"
                if piece == written.get("image"):
                    refs.append(columns.take("image", where))
                    pieces.append(BARE_IMAGE_MARK)
                elif piece == written.get("video"):
                    refs.append(video_ref(columns.take("video", where), None, where))
                    pieces.append(BARE_VIDEO_MARK)
                else:
                    pieces.append(piece)
        elif kind in ("image", "image_url"):
            ref = _part_ref(part, where)
            refs.append(ref if ref is not None else columns.take("image", where))
            pieces.append(IMAGE_MARK)
        elif kind == "video" and "video" in placeholders:
            video = next((part[key] for key in ("video", "path") if part.get(key) is not None), None)
            refs.append(video_ref(video if video is not None else columns.take("video", where), part.get("fps"),
                                   where))
            pieces.append(VIDEO_MARK)
        elif kind == "video":
            raise DataError(f"{where}: unknown part type 'video' for {family or 'this model'}, which reads images "
                            f"only (video parts need a {VIDEO_FAMILIES} model)")
        else:
            raise DataError(f"{where}: unknown part type '{kind}' (expected text, image, image_url or video)")
    return "".join(pieces)


def read_vision_record(record: dict, fmt: str, where: str, *, placeholder: str, system_prompt=None,
                       video_placeholder: str | None = None, family: str | None = None):
    """(Sample with a mark at each image and video, their references in order: image references and VideoRefs) of
    one chat record. `video_placeholder`: the family's video placeholder (its video processor's); None: the family
    reads images only, and a video part is an error naming `family`."""
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a record (dict), got {type(record).__name__}")
    columns = _Columns(record)
    takes_videos = video_placeholder is not None
    if columns.items["video"] and not takes_videos:
        raise DataError(f"{where}: the record has a 'videos' column, but {family or 'this model'} reads images only "
                        f"(videos need a {VIDEO_FAMILIES} model)")
    placeholders = {"image": placeholder, **({"video": video_placeholder} if takes_videos else {})}
    key = "messages" if fmt == "messages" else "conversations"
    turns = record.get(key)
    if not isinstance(turns, list):
        raise DataError(f"{where}: missing field '{key}' (a list of turns; {fmt} format)")
    refs, flat = [], []
    for i, turn in enumerate(turns):
        at = f"{where}: {key}[{i}]"
        if not isinstance(turn, dict):
            raise DataError(f"{at} must be an object, got {type(turn).__name__}")
        content_key = "content" if "content" in turn or fmt == "messages" else "value"
        before = len(refs)
        text = _flatten_content(turn.get(content_key), at, placeholders, refs, columns, family)
        role = str(turn.get("role", turn.get("from", ""))).lower()
        if len(refs) > before and role in ("assistant", "gpt", "model"):
            what = "videos" if any(isinstance(r, VideoRef) for r in refs[before:]) else "images"
            raise DataError(f"{at}: {what} in assistant turns are not supported (their tokens would be trained); "
                            f"put {what} in user turns")
        flat.append({**turn, content_key: text})
    for kind, shown in (("image", placeholder), ("video", video_placeholder)):
        held, used = len(columns.items[kind]), columns.used[kind]
        if used != held:
            raise DataError(f"{where}: the '{kind}s' column holds {held} {kind}(s) but the conversation has {used} "
                            f"place(s) for them (a {kind} part without its own {kind}, or '{shown}')")
    sample = normalise({**record, key: flat}, fmt, system_prompt=system_prompt, where=where)
    return sample, refs


# ---- images and videos -> tensors -----------------------------------------------------------------------------------
# ---- encoding ------------------------------------------------------------------------------------------------------
def encode_vision(sample, refs: list, processor, tokenizer, template: str, *, train_on: str, max_len: int,
                  overflow: str, stats: VisionStats, base_dir: Path | None) -> VisionExample | None:
    """One vision sample: its images and videos processed, their places expanded, the conversation encoded."""
    where = sample.origin or "<sample>"
    processed, videos = process_media(refs, processor, base_dir=base_dir, where=where)
    expansions = list(processed.expansions if processed else ())
    video_expansions = list(videos.expansions if videos else ())
    video_processor = video_processor_of(processor) if videos else None
    if sample.is_chat:  # the marks go through the chat template; the tokens replace them after it
        whole_sample = sample
        expand = rendered_expander(expansions, processor, video_expansions, video_processor)
    else:
        messages = [{**m, "content": expand_marks(m["content"], iter(expansions), processor, iter(video_expansions),
                                                  video_processor)} for m in sample.messages]
        whole_sample, expand = replace(sample, messages=messages), None
    # Encoded whole, then cut here: a cut inside the image or video tokens is its own reason to drop the sample.
    whole = encode(whole_sample, tokenizer, template, train_on=train_on, max_len=1 << 62, overflow="truncate",
                   stats=DataStats(), expand=expand)
    if whole is None:
        stats.dropped_fully_masked += 1
        return None
    media = {}   # token id -> how many of it the sample's images / videos fill
    if processed is not None:
        media[processor_image_token_id(processor, tokenizer)] = sum(processed.tokens_per_image)
    if videos is not None:
        media[video_token_id(video_processor, tokenizer)] = sum(videos.tokens_per_video)
    example, truncated = whole, len(whole) > max_len
    if truncated:
        if overflow == "drop":
            stats.dropped_too_long += 1
            return None
        example = Encoded(whole.input_ids[:max_len], whole.labels[:max_len], whole.origin)
        if any(int((example.input_ids == token).sum()) != count for token, count in media.items()):
            stats.cut_in_images += 1
            return None
        if example.num_targets == 0:
            stats.dropped_fully_masked += 1
            return None
    stats.samples += 1
    stats.truncated += truncated
    stats.target_tokens += example.num_targets
    stats.total_tokens += len(example)
    if processed is not None:
        stats.images += len(processed)
        stats.resized += processed.resized
    stats.videos += len(videos) if videos is not None else 0
    labels = example.labels
    for token in media:   # never a target, whatever train_on says
        labels = torch.where(example.input_ids == token, torch.full_like(labels, IGNORE_INDEX), labels)
    rereadable = all(r.rereadable if isinstance(r, VideoRef) else isinstance(r, str) for r in refs)
    return VisionExample(example.input_ids, labels, example.origin, images=media_tensors(processed, videos),
                         num_images=len(processed) if processed else 0, refs=list(refs) if rereadable else [],
                         base_dir=base_dir, num_videos=len(videos) if videos else 0)


def processor_image_token_id(processor, tokenizer) -> int:
    return _token_id(tokenizer, processor.image_token, "image")


def video_token_id(video_processor, tokenizer) -> int:
    return _token_id(tokenizer, video_processor.video_token, "video")


def _token_id(tokenizer, token: str, kind: str) -> int:
    token_id = tokenizer.convert_tokens_to_ids(token)
    if token_id is None or token_id == getattr(tokenizer, "unk_token_id", None):
        raise DataError(f"the tokenizer has no token '{token}' (the model's {kind} token): is this the model's own "
                        "tokenizer?")
    return int(token_id)


def expand_marks(content: str, expansions, processor, videos=None, video_processor=None) -> str:
    """`content` with each image mark replaced, in order, by the next of `expansions` (an iterator), inside the
    family's delimiters for an image part (`processor.wrap`); each video mark likewise by the next of `videos`
    (`video_processor.wrap`)."""
    if not any(mark in content for mark in MARKS):
        return content
    out = []
    for char in content:
        if char == IMAGE_MARK:
            out.append(processor.wrap(next(expansions)))
        elif char == BARE_IMAGE_MARK:
            out.append(next(expansions))
        elif char == VIDEO_MARK:
            out.append(video_processor.wrap(next(videos)))
        elif char == BARE_VIDEO_MARK:
            out.append(next(videos))
        else:
            out.append(char)
    return "".join(out)


def rendered_expander(expansions: list[str], processor, video_expansions: list[str] = (), video_processor=None):
    """text -> text with its image and video marks replaced in order by their expansions, for a rendered chat:
    transformers' processors expand the placeholders in the template's output, so a template that trims a
    message's text (Gemma 3's) keeps the newlines around an image. Every rendering (a prefix of the conversation
    included) starts again at the first image and video."""
    def expand(text: str) -> str:
        return expand_marks(text, iter(expansions), processor, iter(video_expansions), video_processor)
    return expand


def collate_images(per_sample: list[dict]) -> dict:
    """The image (and video) tensors of a batch's samples (each a dict under transformers' names, empty without
    any), joined as the family's processor batches them: along the first axis (LLaVA's [images, 3, H, W], Qwen2-VL's
    patches and grids, its videos' too), or, for per-sample image stacks (Idefics3's [1, tiles, 3, H, W] and its
    pixel_attention_mask), padded with empty tiles to the batch's most."""
    keys = sorted({k for images in per_sample for k in images})
    if not keys:
        return {}
    stacked = any(images.get("pixel_values") is not None and images["pixel_values"].dim() == 5
                  for images in per_sample)
    batch = {}
    for key in keys:
        tensors = [images.get(key) for images in per_sample]
        batch[key] = _pad_stacks(tensors) if stacked else torch.cat([t for t in tensors if t is not None], dim=0)
    return batch


def _pad_stacks(tensors: list) -> torch.Tensor:
    """[1, n_i, ...] per sample (None: no images) -> [batch, max n_i, ...], zeros where a sample has fewer."""
    known = next(t for t in tensors if t is not None)
    most = max(t.shape[1] for t in tensors if t is not None)
    out = known.new_zeros((len(tensors), most, *known.shape[2:]))
    for b, t in enumerate(tensors):
        if t is not None:
            out[b, : t.shape[1]] = t[0]
    return out


__all__ = ["IMAGE_MARK", "VIDEO_MARK", "VideoRef", "VisionExample", "VisionStats", "collate_images", "encode_vision",
           "expand_marks", "family_of", "images_of", "media_tensors", "process_media", "processor_image_token_id",
           "read_vision_record", "rendered_expander", "video_placeholder_of", "video_processor_of", "video_token_id"]
