"""Qwen2-VL / Qwen2.5-VL image processing, matching transformers' `Qwen2VLImageProcessorPil` and the image side
of `Qwen2VLProcessor`.

Each image keeps its aspect ratio: `smart_resize` rounds both sides to multiples of patch_size * merge_size and
brings the area within [min_pixels, max_pixels]. The normalized image is cut into patch_size squares, each
repeated temporal_patch_size times (a still image is a video of identical frames), and flattened in the order
the vision tower's patch merger reads them: rows of merge_size x merge_size blocks. `pixel_values` is
[sum of patches, 3 * temporal_patch_size * patch_size^2] over all images, `image_grid_thw` [images, 3] holds
(t, h, w) in patches, and the placeholder `<|image_pad|>` becomes t * h * w / merge_size^2 copies of itself.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image

from ..errors import CheckpointError, DataError
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

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
MIN_PIXELS = 56 * 56
MAX_PIXELS = 28 * 28 * 1280
MAX_ASPECT_RATIO = 200
BICUBIC = 3
VISION_START, VISION_END = "<|vision_start|>", "<|vision_end|>"


def smart_resize(height: int, width: int, factor: int = 28, min_pixels: int = MIN_PIXELS,
                 max_pixels: int = MAX_PIXELS) -> tuple[int, int]:
    """(height, width) with both sides multiples of `factor`, the area within [min_pixels, max_pixels] and the
    aspect ratio kept as well as rounding allows. Raises ValueError past an aspect ratio of 200."""
    if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
        raise ValueError(f"aspect ratio {max(height, width) / min(height, width):.1f} is over {MAX_ASPECT_RATIO}")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


class Qwen2VLImageProcessor(ImageProcessor):
    """Dynamic-resolution patching for Qwen2-VL and Qwen2.5-VL."""

    model_types = ("qwen2_vl", "qwen2_5_vl")
    placeholder = "<|image_pad|>"     # the template writes <|vision_start|><|image_pad|><|vision_end|>
    image_token = "<|image_pad|>"
    tensor_names = ("pixel_values", "image_grid_thw")

    def __init__(self, *, min_pixels: int = MIN_PIXELS, max_pixels: int = MAX_PIXELS, patch_size: int = 14,
                 temporal_patch_size: int = 2, merge_size: int = 2, do_resize: bool = True, resample: int = BICUBIC,
                 do_rescale: bool = True, rescale_factor: float = 1 / 255, do_normalize: bool = True,
                 image_mean=OPENAI_CLIP_MEAN, image_std=OPENAI_CLIP_STD, model_type: str = "qwen2_vl"):
        if min_pixels > max_pixels:
            raise ValueError(f"min_pixels ({min_pixels}) is above max_pixels ({max_pixels})")
        self.min_pixels = min_pixels
        self.max_pixels = max_pixels
        self.patch_size = patch_size
        self.temporal_patch_size = temporal_patch_size
        self.merge_size = merge_size
        self.do_resize = do_resize
        self.resample = resample
        self.do_rescale = do_rescale
        self.rescale_factor = rescale_factor
        self.do_normalize = do_normalize
        self.image_mean = tuple(image_mean)
        self.image_std = tuple(image_std)
        self.model_type = model_type

    def wrap(self, expansion: str) -> str:
        return VISION_START + expansion + VISION_END

    @property
    def factor(self) -> int:
        return self.patch_size * self.merge_size

    # ---- settings ---------------------------------------------------------------------------------------------
    @classmethod
    def from_config(cls, preprocessor: dict, processor: dict, model_config: dict, *,
                    files: ProcessorFiles | None = None) -> Qwen2VLImageProcessor:
        files = files or ProcessorFiles()
        pre = Settings(preprocessor, files.preprocessor)
        vision = vision_settings(model_config, files)
        size = pre.size("size", {"shortest_edge": MIN_PIXELS, "longest_edge": MAX_PIXELS},
                        (("shortest_edge", "longest_edge"), ("min_pixels", "max_pixels")))
        # The older top-level min_pixels / max_pixels override `size`, as transformers' __init__ does.
        min_pixels = pre.positive_int("min_pixels", size.get("shortest_edge", size.get("min_pixels")))
        max_pixels = pre.positive_int("max_pixels", size.get("longest_edge", size.get("max_pixels")))
        if min_pixels > max_pixels:
            raise CheckpointError(f"{files.preprocessor}: min_pixels ({min_pixels}) is above max_pixels "
                                  f"({max_pixels})")
        shapes = patch_shapes(pre, vision, files, "images")
        model_type = model_config.get("model_type") if model_config.get("model_type") in cls.model_types \
            else "qwen2_vl"
        return cls(min_pixels=min_pixels, max_pixels=max_pixels, **shapes, do_resize=pre.flag("do_resize", True),
                   resample=pre.resample("resample", BICUBIC), do_rescale=pre.flag("do_rescale", True),
                   rescale_factor=pre.positive_number("rescale_factor", 1 / 255),
                   do_normalize=pre.flag("do_normalize", True),
                   image_mean=pre.channels("image_mean", OPENAI_CLIP_MEAN),
                   image_std=pre.channels("image_std", OPENAI_CLIP_STD, positive=True), model_type=model_type)

    def to_dict(self) -> dict:
        return {"image_processor_type": "Qwen2VLImageProcessor", "do_resize": self.do_resize,
                "size": {"shortest_edge": self.min_pixels, "longest_edge": self.max_pixels},
                "min_pixels": self.min_pixels, "max_pixels": self.max_pixels, "patch_size": self.patch_size,
                "temporal_patch_size": self.temporal_patch_size, "merge_size": self.merge_size,
                "resample": self.resample, "do_rescale": self.do_rescale, "rescale_factor": self.rescale_factor,
                "do_normalize": self.do_normalize, "image_mean": list(self.image_mean),
                "image_std": list(self.image_std), "do_convert_rgb": True}

    def processor_dict(self) -> dict:
        name = "Qwen2_5_VLProcessor" if self.model_type == "qwen2_5_vl" else "Qwen2VLProcessor"
        return {"processor_class": name}

    # ---- images -----------------------------------------------------------------------------------------------
    def __call__(self, images: list[Image.Image], *, source: str = "images") -> ProcessedImages:
        patches, grids, resized = [], [], 0
        for number, image in enumerate(images, 1):
            image = to_rgb(image)
            width, height = image.size
            array = chw(image)
            if self.do_resize:
                try:
                    new_h, new_w = smart_resize(height, width, self.factor, self.min_pixels, self.max_pixels)
                except ValueError as exc:
                    raise DataError(f"{source}: image {number} ({width}x{height}): {exc}; crop it first") from None
                resized += height * width > self.max_pixels
                array = resize(array, new_h, new_w, self.resample)
            elif height % self.factor or width % self.factor:
                raise DataError(f"{source}: image {number} is {width}x{height}; with do_resize off both sides must "
                                f"be multiples of {self.factor}")
            array = rescale_normalize(array, self.do_rescale, self.rescale_factor, self.do_normalize,
                                      self.image_mean, self.image_std)
            flat, grid_h, grid_w = self._patchify(array)
            patches.append(flat)
            grids.append((1, grid_h, grid_w))
        if not patches:
            return ProcessedImages({}, [], [], 0)
        counts = [t * h * w // self.merge_size ** 2 for t, h, w in grids]
        tensors = {"pixel_values": torch.from_numpy(np.concatenate(patches, axis=0)),
                   "image_grid_thw": torch.tensor(grids, dtype=torch.int64)}
        return ProcessedImages(tensors, [self.image_token * n for n in counts], counts, int(resized))

    def _patchify(self, image: np.ndarray) -> tuple[np.ndarray, int, int]:
        channels, height, width = image.shape
        p, m, t = self.patch_size, self.merge_size, self.temporal_patch_size
        grid_h, grid_w = height // p, width // p
        blocks = image.reshape(channels, grid_h // m, m, p, grid_w // m, m, p)
        blocks = blocks.transpose(1, 4, 2, 5, 0, 3, 6)          # (h blocks, w blocks, m, m, C, p, p)
        frames = np.broadcast_to(blocks[:, :, :, :, :, None], (*blocks.shape[:5], t, p, p))
        return np.ascontiguousarray(frames.reshape(grid_h * grid_w, channels * t * p * p)), grid_h, grid_w


def patch_shapes(pre, vision, files, what: str) -> dict:
    """patch_size, temporal_patch_size and merge_size from the processor's settings, defaulting to the vision
    tower's (config.json) and required to equal them: other values would cut `what` into patches the model does not
    read."""
    shapes = {}
    for ours, theirs, default in (("patch_size", "patch_size", 14),
                                  ("temporal_patch_size", "temporal_patch_size", 2),
                                  ("merge_size", "spatial_merge_size", 2)):
        tower = vision.positive_int(theirs, None)
        value = pre.positive_int(ours, tower if tower is not None else default)
        if tower is not None and value != tower:
            raise CheckpointError(f"{files.preprocessor}: {ours} is {value} but the vision tower's {theirs} "
                                  f"in {files.model} is {tower}; the {what} would not fit the model")
        shapes[ours] = value
    return shapes


__all__ = ["Qwen2VLImageProcessor", "patch_shapes", "smart_resize"]
