"""Idefics3 / SmolVLM image processing, matching transformers' `Idefics3ImageProcessorPil` (SmolVLM's is the
same code) and the prompt expansion of `Idefics3Processor` / `SmolVLMProcessor` (also the same).

An image is resized so its longest edge is `size.longest_edge`, then (with image splitting) stretched to
multiples of `max_image_size` and cut into max_image_size tiles, read row by row, followed by the whole image
shrunk to one tile (the "global" image). Every frame is padded to the batch's largest and
`pixel_attention_mask` marks the real pixels; `pixel_values` is [records, frames, 3, H, W].

The placeholder `<image>` becomes, per tile, `<fake_token_around_image><row_r_col_c>` and image_seq_len
`<image>` tokens, a newline after each row, then `\\n<fake_token_around_image><global-img>`, image_seq_len
`<image>` tokens and a closing `<fake_token_around_image>`; an image that was not split gets only the global part.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image

from .processor import (
    ImageProcessor,
    ProcessedImages,
    ProcessorFiles,
    Settings,
    chw,
    rescale_normalize,
    resize,
    to_rgb,
    vision_settings,
)

HALF = (0.5, 0.5, 0.5)
LANCZOS = 1
MAX_IMAGE_SIZE = 4096        # transformers' absolute cap on a side after the first resize
FAKE_TOKEN = "<fake_token_around_image>"
GLOBAL_TOKEN = "<global-img>"
IMAGE_TOKEN = "<image>"
NAMES = {"idefics3": ("Idefics3ImageProcessor", "Idefics3Processor"),
         "smolvlm": ("SmolVLMImageProcessor", "SmolVLMProcessor")}


def image_prompt(rows: int, cols: int, image_seq_len: int) -> str:
    """The text that replaces one image's placeholder (`rows` = `cols` = 0: an image that was not split)."""
    global_part = FAKE_TOKEN + GLOBAL_TOKEN + IMAGE_TOKEN * image_seq_len + FAKE_TOKEN
    if rows == 0 and cols == 0:
        return global_part
    text = ""
    for r in range(rows):
        for c in range(cols):
            text += f"{FAKE_TOKEN}<row_{r + 1}_col_{c + 1}>" + IMAGE_TOKEN * image_seq_len
        text += "\n"
    return text + "\n" + global_part


def longest_edge_size(height: int, width: int, longest: int) -> tuple[int, int]:
    """transformers' size for the first resize: the longest side to `longest`, the other by the aspect ratio
    (rounded up to even), then both kept within MAX_IMAGE_SIZE."""
    ratio = width / height
    if width >= height:
        width = longest
        height = int(width / ratio)
        height += height % 2
    else:
        height = longest
        width = int(height * ratio)
        width += width % 2
    height, width = max(height, 1), max(width, 1)
    ratio = width / height
    if width >= height and width > MAX_IMAGE_SIZE:
        width = MAX_IMAGE_SIZE
        height = int(width / ratio)
    elif height > width and height > MAX_IMAGE_SIZE:
        height = MAX_IMAGE_SIZE
        width = int(height * ratio)
    return max(height, 1), max(width, 1)


def tile_multiple_size(height: int, width: int, tile: int) -> tuple[int, int]:
    """Both sides up to multiples of the tile size (transformers' resize_for_vision_encoder)."""
    ratio = width / height
    if width >= height:
        width = math.ceil(width / tile) * tile
        height = int(width / ratio)
        height = math.ceil(height / tile) * tile
    else:
        height = math.ceil(height / tile) * tile
        width = int(height * ratio)
        width = math.ceil(width / tile) * tile
    return height, width


class Idefics3ImageProcessor(ImageProcessor):
    """Tiled image processing for Idefics3 and SmolVLM."""

    model_types = ("idefics3", "smolvlm")
    placeholder = IMAGE_TOKEN
    image_token = IMAGE_TOKEN
    tensor_names = ("pixel_values", "pixel_attention_mask")

    def __init__(self, *, image_seq_len: int = 169, do_resize: bool = True, size: dict | None = None,
                 max_image_size: int = 364, do_image_splitting: bool = True, resample: int = LANCZOS,
                 do_rescale: bool = True, rescale_factor: float = 1 / 255, do_normalize: bool = True,
                 image_mean=HALF, image_std=HALF, model_type: str = "idefics3"):
        self.image_seq_len = image_seq_len
        self.do_resize = do_resize
        self.size = dict(size or {"longest_edge": 4 * 364})
        self.max_image_size = max_image_size
        self.do_image_splitting = do_image_splitting
        self.resample = resample
        self.do_rescale = do_rescale
        self.rescale_factor = rescale_factor
        self.do_normalize = do_normalize
        self.image_mean = tuple(image_mean)
        self.image_std = tuple(image_std)
        self.model_type = model_type

    # ---- settings ---------------------------------------------------------------------------------------------
    @classmethod
    def from_config(cls, preprocessor: dict, processor: dict, model_config: dict, *,
                    files: ProcessorFiles | None = None) -> Idefics3ImageProcessor:
        files = files or ProcessorFiles()
        pre = Settings(preprocessor, files.preprocessor)
        proc = Settings(processor, files.processor)
        vision = vision_settings(model_config, files)
        # The model's count when processor_config.json lacks it: (image_size / patch_size)^2 patches, pixel-
        # shuffled by scale_factor in each direction.
        image_size = vision.positive_int("image_size", 224)
        patch_size = vision.positive_int("patch_size", 32)
        scale = Settings(model_config, files.model).positive_int("scale_factor", 2)
        default_len = int(((image_size // patch_size) ** 2) / (scale ** 2))
        size = pre.size("size", {"longest_edge": 4 * 364}, (("longest_edge",), ("height", "width")))
        tile = pre.size("max_image_size", {"longest_edge": 364}, (("longest_edge",),))["longest_edge"]
        model_type = model_config.get("model_type") if model_config.get("model_type") in NAMES else "idefics3"
        return cls(image_seq_len=proc.positive_int("image_seq_len", default_len),
                   do_resize=pre.flag("do_resize", True), size=size, max_image_size=tile,
                   do_image_splitting=pre.flag("do_image_splitting", True),
                   resample=pre.resample("resample", LANCZOS), do_rescale=pre.flag("do_rescale", True),
                   rescale_factor=pre.positive_number("rescale_factor", 1 / 255),
                   do_normalize=pre.flag("do_normalize", True), image_mean=pre.channels("image_mean", HALF),
                   image_std=pre.channels("image_std", HALF, positive=True), model_type=model_type)

    def to_dict(self) -> dict:
        return {"image_processor_type": NAMES[self.model_type][0], "do_resize": self.do_resize,
                "size": dict(self.size), "max_image_size": {"longest_edge": self.max_image_size},
                "do_image_splitting": self.do_image_splitting, "resample": self.resample,
                "do_rescale": self.do_rescale, "rescale_factor": self.rescale_factor,
                "do_normalize": self.do_normalize, "image_mean": list(self.image_mean),
                "image_std": list(self.image_std), "do_pad": True, "do_convert_rgb": True}

    def processor_dict(self) -> dict:
        return {"processor_class": NAMES[self.model_type][1], "image_seq_len": self.image_seq_len}

    # ---- images -----------------------------------------------------------------------------------------------
    def __call__(self, images: list[Image.Image], *, source: str = "images") -> ProcessedImages:
        frames, expansions, counts, resized = [], [], [], 0
        for image in images:
            image_frames, rows, cols, shrunk = self._one(to_rgb(image))
            frames.extend(image_frames)
            expansions.append(image_prompt(rows, cols, self.image_seq_len))
            counts.append(self.image_seq_len * len(image_frames))
            resized += shrunk
        if not frames:
            return ProcessedImages({}, [], [], 0)
        pixels, mask = _pad([frames])
        return ProcessedImages({"pixel_values": pixels, "pixel_attention_mask": mask}, expansions, counts, resized)

    def _one(self, image: Image.Image) -> tuple[list[np.ndarray], int, int, bool]:
        array = chw(image)
        height, width = array.shape[1:]
        shrunk = False
        if self.do_resize:
            if "longest_edge" in self.size:
                shrunk = max(height, width) > self.size["longest_edge"]
                new_h, new_w = longest_edge_size(height, width, self.size["longest_edge"])
            else:
                new_h, new_w = self.size["height"], self.size["width"]
                shrunk = height > new_h or width > new_w
            array = resize(array, new_h, new_w, self.resample)
        tile = self.max_image_size
        rows = cols = 0
        if self.do_image_splitting:
            array = resize(array, *tile_multiple_size(*array.shape[1:], tile), self.resample)
            height, width = array.shape[1:]
            if height > tile or width > tile:
                rows = (height - tile) // tile + 1
                cols = (width - tile) // tile + 1
                frames = [array[:, r * tile:(r + 1) * tile, c * tile:(c + 1) * tile]
                          for r in range(rows) for c in range(cols)]
                frames.append(resize(array, tile, tile, self.resample))
            else:
                frames = [array]
        else:
            frames = [resize(array, tile, tile, self.resample)]
        return [rescale_normalize(f, self.do_rescale, self.rescale_factor, self.do_normalize, self.image_mean,
                                  self.image_std) for f in frames], rows, cols, shrunk

    # ---- batches ------------------------------------------------------------------------------------------------
    def collate(self, records: list[ProcessedImages]) -> dict[str, torch.Tensor]:
        """[records, most frames, 3, H, W] pixel values (zero frames pad the records with fewer, as transformers
        pads a batch) and the matching pixel_attention_mask; {} when no record has an image."""
        if not any(len(r) for r in records):
            return {}
        per_record = []
        for record in records:
            if not len(record):
                per_record.append([])
                continue
            pixels, mask = record.tensors["pixel_values"][0], record.tensors["pixel_attention_mask"][0]
            per_record.append([frame[:, :h, :w].numpy() for frame, h, w in
                               ((f, int(m.any(1).sum()), int(m.any(0).sum())) for f, m in zip(pixels, mask))])
        pixels, mask = _pad(per_record)
        return {"pixel_values": pixels, "pixel_attention_mask": mask}


def _pad(records: list[list[np.ndarray]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero-pad every frame to the largest height and width and every record to the most frames."""
    height = max(f.shape[1] for frames in records for f in frames)
    width = max(f.shape[2] for frames in records for f in frames)
    count = max(len(frames) for frames in records)
    pixels = np.zeros((len(records), count, 3, height, width), dtype=np.float32)
    mask = np.zeros((len(records), count, height, width), dtype=np.int64)
    for i, frames in enumerate(records):
        for j, frame in enumerate(frames):
            pixels[i, j, :, :frame.shape[1], :frame.shape[2]] = frame
            mask[i, j, :frame.shape[1], :frame.shape[2]] = 1
    return torch.from_numpy(pixels), torch.from_numpy(mask)


__all__ = ["Idefics3ImageProcessor", "image_prompt"]
