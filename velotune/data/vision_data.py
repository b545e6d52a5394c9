"""Conversations with images -> token ids, labels and pixel tensors, for vision-language fine-tuning.

Records are the chat formats (`messages`, or sharegpt's `conversations`) whose contents may hold image parts, as TRL,
Unsloth and mlx-vlm accept them:
    {"messages": [{"role": "user", "content": [{"type": "image", "image": "digits/3.png"},
                                               {"type": "text", "text": "Which digit is this?"}]},
                  {"role": "assistant", "content": "3"}]}
An image part names its image (`image`, `path`, or OpenAI's `image_url.url` as a data URI) or leaves it to the
record's `images` column, taken in order; a literal placeholder in text ("<image>") also takes the next image of the
column. Every image of a record is matched to exactly one place: more places than images, or the reverse, is an error
naming the record.

Each image's place becomes the processor's expansion (the family's image tokens, e.g. 576 `<image>` tokens, or
Idefics3's tiles with their row/column tokens); the conversation is then encoded as any chat sample (data/encode.py):
the loss is on the assistant's answers only, so image tokens and prompts carry none. Images in assistant turns are
refused (their tokens would be targets). A sample cut by max_seq_length inside its image tokens is dropped and counted
(the images' features would no longer fit their tokens).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from ..errors import DataError
from .encode import IGNORE_INDEX, DataStats, Encoded, encode
from .formats import normalise

log = logging.getLogger("velotune")

# Stand for "an image goes here" between reading a record and knowing its expansion: private-use characters no
# tokenizer or template produces. An image part takes the family's delimiters with its tokens (Qwen2-VL's
# <|vision_start|> ... <|vision_end|>); a placeholder written in the text keeps the delimiters the text has.
IMAGE_MARK = "\ue000"
BARE_IMAGE_MARK = "\ue001"
MARKS = (IMAGE_MARK, BARE_IMAGE_MARK)


@dataclass
class VisionExample(Encoded):
    images: dict = field(default_factory=dict)   # transformers' names -> tensors of this sample's images; empty
                                                 # when none, or when they are read again per batch (`reload`)
    num_images: int = 0
    refs: list = field(default_factory=list)     # the images as the record names them (reload reads them again)
    base_dir: Path | None = None                 # what relative references are relative to

    @property
    def image_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.images.values())

    def drop_images(self) -> bool:
        """Keeps only the references (`images_of` reads and processes them again when a batch needs them); False
        when the images cannot be read again (given as objects, not paths or data URIs)."""
        if self.num_images and len(self.refs) != self.num_images:
            return False
        self.images = {}
        return True


def images_of(example: VisionExample, processor) -> dict:
    """The example's image tensors: kept ones, else read and processed again (the same pixels: processing is
    deterministic)."""
    if example.images or not example.num_images:
        return example.images
    from ..vision.images import load_image
    where = example.origin or "<sample>"
    images = [load_image(ref, base_dir=example.base_dir, source=where) for ref in example.refs]
    return dict(processor(images, source=where).tensors)


@dataclass
class VisionStats(DataStats):
    images: int = 0              # images read (kept samples)
    resized: int = 0             # images over the processor's maximum, shrunk
    cut_in_images: int = 0       # samples dropped: max_seq_length fell inside their image tokens
    reread: int = 0              # images not kept in memory (vision.image_cache_mb): read again per batch


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


def _flatten_content(content, at: str, placeholder: str, refs: list, column: list, used: list):
    """Text with IMAGE_MARK at each image; appends each image's reference (its own or the column's next) to refs."""
    def take_from_column():
        if used[0] >= len(column):
            raise DataError(f"{at}: more image places than images: the record's 'images' column holds "
                            f"{len(column)} image(s)")
        used[0] += 1
        return column[used[0] - 1]

    if content is None:
        raise DataError(f"{at} has no content")
    parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
    if not isinstance(parts, list):
        raise DataError(f"{at}: content must be text or a list of parts, got {type(content).__name__}")
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
            if placeholder and placeholder in text:  # LLaVA-style data: "<image>\nWhat is shown?"
                chunks = text.split(placeholder)
                for chunk in chunks[:-1]:
                    refs.append(take_from_column())
                    pieces += [chunk, BARE_IMAGE_MARK]
                text = chunks[-1]
            pieces.append(text)
        elif kind in ("image", "image_url"):
            ref = _part_ref(part, where)
            refs.append(ref if ref is not None else take_from_column())
            pieces.append(IMAGE_MARK)
        else:
            raise DataError(f"{where}: unknown part type '{kind}' (expected text, image or image_url)")
    return "".join(pieces)


def read_vision_record(record: dict, fmt: str, where: str, *, placeholder: str, system_prompt=None):
    """(Sample with IMAGE_MARK at each image, the image references in order) of one chat record."""
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a record (dict), got {type(record).__name__}")
    column = record.get("images") or record.get("image") or []
    if not isinstance(column, (list, tuple)):
        column = [column]
    key = "messages" if fmt == "messages" else "conversations"
    turns = record.get(key)
    if not isinstance(turns, list):
        raise DataError(f"{where}: missing field '{key}' (a list of turns; {fmt} format)")
    refs, used, flat = [], [0], []
    for i, turn in enumerate(turns):
        at = f"{where}: {key}[{i}]"
        if not isinstance(turn, dict):
            raise DataError(f"{at} must be an object, got {type(turn).__name__}")
        content_key = "content" if "content" in turn or fmt == "messages" else "value"
        before = len(refs)
        text = _flatten_content(turn.get(content_key), at, placeholder, refs, column, used)
        role = str(turn.get("role", turn.get("from", ""))).lower()
        if len(refs) > before and role in ("assistant", "gpt", "model"):
            raise DataError(f"{at}: images in assistant turns are not supported (their tokens would be trained); "
                            "put images in user turns")
        flat.append({**turn, content_key: text})
    if used[0] != len(column):
        raise DataError(f"{where}: the 'images' column holds {len(column)} image(s) but the conversation has "
                        f"{used[0]} place(s) for them (an image part without its own image, or '{placeholder}')")
    sample = normalise({**record, key: flat}, fmt, system_prompt=system_prompt, where=where)
    return sample, refs


def encode_vision(sample, refs: list, processor, tokenizer, template: str, *, train_on: str, max_len: int,
                  overflow: str, stats: VisionStats, base_dir: Path | None) -> VisionExample | None:
    """One vision sample: its images processed, their places expanded, the conversation encoded."""
    from ..vision.images import load_image
    where = sample.origin or "<sample>"
    images = [load_image(ref, base_dir=base_dir, source=where) for ref in refs]
    processed = processor(images, source=where) if images else None
    expansions = list(processed.expansions if processed else ())
    if sample.is_chat:  # the marks go through the chat template; the image tokens replace them after it
        whole_sample, expand = sample, rendered_expander(expansions, processor)
    else:
        messages = [{**m, "content": expand_marks(m["content"], iter(expansions), processor)}
                    for m in sample.messages]
        whole_sample, expand = replace(sample, messages=messages), None
    # Encoded whole, then cut here: a cut inside the image tokens is its own reason to drop the sample.
    whole = encode(whole_sample, tokenizer, template, train_on=train_on, max_len=1 << 62, overflow="truncate",
                   stats=DataStats(), expand=expand)
    if whole is None:
        stats.dropped_fully_masked += 1
        return None
    image_id = processor_image_token_id(processor, tokenizer) if processed is not None else None
    example, truncated = whole, len(whole) > max_len
    if truncated:
        if overflow == "drop":
            stats.dropped_too_long += 1
            return None
        example = Encoded(whole.input_ids[:max_len], whole.labels[:max_len], whole.origin)
        if processed is not None and int((example.input_ids == image_id).sum()) != sum(processed.tokens_per_image):
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
        stats.images += len(images)
        stats.resized += processed.resized
    labels = example.labels
    if image_id is not None:   # never a target, whatever train_on says
        labels = torch.where(example.input_ids == image_id, torch.full_like(labels, IGNORE_INDEX), labels)
    return VisionExample(example.input_ids, labels, example.origin,
                         images=dict(processed.tensors) if processed else {}, num_images=len(images),
                         refs=list(refs) if all(isinstance(r, str) for r in refs) else [], base_dir=base_dir)


def processor_image_token_id(processor, tokenizer) -> int:
    token_id = tokenizer.convert_tokens_to_ids(processor.image_token)
    if token_id is None or token_id == getattr(tokenizer, "unk_token_id", None):
        raise DataError(f"the tokenizer has no token '{processor.image_token}' (the model's image token): is this "
                        "the model's own tokenizer?")
    return int(token_id)


def expand_marks(content: str, expansions, processor) -> str:
    """`content` with each image mark replaced, in order, by the next of `expansions` (an iterator), inside the
    family's delimiters for an image part (`processor.wrap`)."""
    if not any(mark in content for mark in MARKS):
        return content
    out = []
    for char in content:
        if char == IMAGE_MARK:
            out.append(processor.wrap(next(expansions)))
        elif char == BARE_IMAGE_MARK:
            out.append(next(expansions))
        else:
            out.append(char)
    return "".join(out)


def rendered_expander(expansions: list[str], processor):
    """text -> text with its image marks replaced in order by `expansions`, for a rendered chat: transformers'
    processors expand the image placeholder in the template's output, so a template that trims a message's text
    (Gemma 3's) keeps the newlines around an image. Every rendering (a prefix of the conversation included)
    starts again at the first image."""
    def expand(text: str) -> str:
        return expand_marks(text, iter(expansions), processor)
    return expand


def collate_images(per_sample: list[dict]) -> dict:
    """The image tensors of a batch's samples (each a dict under transformers' names, empty without images), joined
    as the family's processor batches them: along the first axis (LLaVA's [images, 3, H, W], Qwen2-VL's patches and
    grids), or, for per-sample image stacks (Idefics3's [1, tiles, 3, H, W] and its pixel_attention_mask), padded
    with empty tiles to the batch's most."""
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


__all__ = ["IMAGE_MARK", "VisionExample", "VisionStats", "collate_images", "encode_vision", "expand_marks", "images_of",
           "rendered_expander",
           "processor_image_token_id", "read_vision_record"]
