"""LLaVA's image processing: the CLIP / SigLIP recipe (resize to the shortest edge or to a fixed size, center
crop, rescale, normalize), plus LlavaImageProcessor's optional pad-to-square, matching transformers'
`CLIPImageProcessorPil`, `SiglipImageProcessorPil` and `LlavaImageProcessorPil`.

Every image becomes the same [3, H, W]; its placeholder `<image>` is expanded to one image token per vision
feature the model keeps: (H / patch) * (W / patch) patches, plus the tower's extra tokens (CLIP's CLS), minus one
when the "default" feature strategy drops the first token (as transformers' LlavaProcessor counts them).
"""
from __future__ import annotations

import math

import numpy as np
from PIL import Image

from ..errors import CheckpointError, UnsupportedError
from .processor import (
    ImageProcessor,
    ProcessedImages,
    ProcessorFiles,
    Settings,
    chw,
    rescale_normalize,
    resize,
    stack,
    to_rgb,
    vision_settings,
)

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
HALF = (0.5, 0.5, 0.5)
BICUBIC = 3

# transformers' class defaults per image processor type (what a preprocessor_config.json leaves unsaid).
KINDS = {
    "CLIPImageProcessor": {"size": {"shortest_edge": 224}, "crop_size": {"height": 224, "width": 224},
                           "do_center_crop": True, "mean": OPENAI_CLIP_MEAN, "std": OPENAI_CLIP_STD},
    "LlavaImageProcessor": {"size": {"shortest_edge": 224}, "crop_size": {"height": 224, "width": 224},
                            "do_center_crop": True, "mean": OPENAI_CLIP_MEAN, "std": OPENAI_CLIP_STD},
    "SiglipImageProcessor": {"size": {"height": 224, "width": 224}, "crop_size": None, "do_center_crop": False,
                             "mean": HALF, "std": HALF},
}
# Extra tokens a vision tower puts before its patches (CLIP's CLS), when processor_config.json does not say.
TOWER_EXTRA_TOKENS = {"clip_vision_model": 1, "siglip_vision_model": 0}
TOWER_PATCH_DEFAULT = {"clip_vision_model": 32, "siglip_vision_model": 16}
LLAVA_DEFAULT_PATCH = 14        # LlavaConfig's default vision tower (CLIP ViT-L/14 at 336)


class ClipImageProcessor(ImageProcessor):
    """CLIP / SigLIP image processing for LLaVA."""

    model_types = ("llava",)
    tensor_names = ("pixel_values",)

    def __init__(self, *, kind: str = "CLIPImageProcessor", do_resize: bool = True, size: dict | None = None,
                 resample: int = BICUBIC, do_center_crop: bool | None = None, crop_size: dict | None = None,
                 do_rescale: bool = True, rescale_factor: float = 1 / 255, do_normalize: bool = True,
                 image_mean=None, image_std=None, do_pad: bool = False, patch_size: int = LLAVA_DEFAULT_PATCH,
                 num_additional_image_tokens: int = 1, vision_feature_select_strategy: str = "default",
                 image_token: str = "<image>"):
        defaults = KINDS[kind]
        self.kind = kind
        self.do_resize = do_resize
        self.size = dict(size or defaults["size"])
        self.resample = resample
        self.do_center_crop = defaults["do_center_crop"] if do_center_crop is None else do_center_crop
        self.crop_size = dict(crop_size) if crop_size else (dict(defaults["crop_size"]) if defaults["crop_size"]
                                                            else None)
        self.do_rescale = do_rescale
        self.rescale_factor = rescale_factor
        self.do_normalize = do_normalize
        self.image_mean = tuple(image_mean or defaults["mean"])
        self.image_std = tuple(image_std or defaults["std"])
        self.do_pad = do_pad
        self.patch_size = patch_size
        self.num_additional_image_tokens = num_additional_image_tokens
        self.vision_feature_select_strategy = vision_feature_select_strategy
        self.image_token = image_token
        self.placeholder = image_token
        if self.do_center_crop and not self.crop_size:
            raise ValueError("do_center_crop is set but crop_size is missing")

    # ---- settings ---------------------------------------------------------------------------------------------
    @classmethod
    def from_config(cls, preprocessor: dict, processor: dict, model_config: dict, *,
                    files: ProcessorFiles | None = None) -> ClipImageProcessor:
        files = files or ProcessorFiles()
        pre = Settings(preprocessor, files.preprocessor)
        proc = Settings(processor, files.processor)
        vision = vision_settings(model_config, files)
        tower = (model_config.get("vision_config") or {}).get("model_type") or "clip_vision_model"
        kind = _kind(preprocessor.get("image_processor_type"), tower, files.preprocessor)
        defaults = KINDS[kind]
        square_ints = pre.flag("default_to_square", False)
        size = _size(pre, "size", defaults["size"], square_ints)
        crop_size = _size(pre, "crop_size", defaults["crop_size"], True)
        if crop_size is not None and set(crop_size) != {"height", "width"}:
            raise CheckpointError(f"{files.preprocessor}: field 'crop_size' must be an object with keys "
                                  f"{{height, width}}, got {preprocessor.get('crop_size')!r}")
        do_center_crop = pre.flag("do_center_crop", defaults["do_center_crop"])
        do_resize = pre.flag("do_resize", True)
        if do_center_crop and crop_size is None:
            raise CheckpointError(f"{files.preprocessor}: 'do_center_crop' is true but there is no 'crop_size'")
        if not do_center_crop and (not do_resize or "shortest_edge" in size):
            raise UnsupportedError(f"{files.preprocessor}: without a center crop, images must be resized to a fixed "
                                   "'size' {height, width} so that every image has the same shape; got "
                                   f"do_resize={do_resize}, size={size}")

        if vision.has("patch_size") or not model_config.get("vision_config"):
            patch_default = vision.positive_int("patch_size", LLAVA_DEFAULT_PATCH)
        else:
            patch_default = TOWER_PATCH_DEFAULT.get(tower, LLAVA_DEFAULT_PATCH)
        strategy_default = Settings(model_config, files.model).choice(
            "vision_feature_select_strategy", "default", ("default", "full"))
        return cls(
            kind=kind, do_resize=do_resize, size=size, resample=pre.resample("resample", BICUBIC),
            do_center_crop=do_center_crop, crop_size=crop_size, do_rescale=pre.flag("do_rescale", True),
            rescale_factor=pre.positive_number("rescale_factor", 1 / 255),
            do_normalize=pre.flag("do_normalize", True),
            image_mean=pre.channels("image_mean", defaults["mean"]),
            image_std=pre.channels("image_std", defaults["std"], positive=True),
            do_pad=pre.flag("do_pad", False) if kind == "LlavaImageProcessor" else False,
            patch_size=proc.positive_int("patch_size", patch_default),
            num_additional_image_tokens=proc.int_at_least("num_additional_image_tokens",
                                                          TOWER_EXTRA_TOKENS.get(tower, 1), 0),
            vision_feature_select_strategy=proc.choice("vision_feature_select_strategy", strategy_default,
                                                       ("default", "full")),
            image_token=proc.text("image_token", "<image>"))

    def to_dict(self) -> dict:
        out = {"image_processor_type": self.kind, "do_resize": self.do_resize, "size": dict(self.size),
               "resample": self.resample, "do_center_crop": self.do_center_crop, "do_rescale": self.do_rescale,
               "rescale_factor": self.rescale_factor, "do_normalize": self.do_normalize,
               "image_mean": list(self.image_mean), "image_std": list(self.image_std), "do_convert_rgb": True}
        if self.crop_size:
            out["crop_size"] = dict(self.crop_size)
        if self.kind == "LlavaImageProcessor":
            out["do_pad"] = self.do_pad
        return out

    def processor_dict(self) -> dict:
        return {"processor_class": "LlavaProcessor", "patch_size": self.patch_size,
                "num_additional_image_tokens": self.num_additional_image_tokens,
                "vision_feature_select_strategy": self.vision_feature_select_strategy,
                "image_token": self.image_token}

    # ---- images -----------------------------------------------------------------------------------------------
    def __call__(self, images: list[Image.Image], *, source: str = "images") -> ProcessedImages:
        arrays, resized = [], 0
        for image in images:
            array, shrunk = self._one(to_rgb(image))
            arrays.append(array)
            resized += shrunk
        if not arrays:
            return ProcessedImages({}, [], [], 0)
        counts = [self.tokens_for(a.shape[1], a.shape[2]) for a in arrays]
        return ProcessedImages({"pixel_values": stack(arrays)}, [self.image_token * n for n in counts], counts,
                               resized)

    def tokens_for(self, height: int, width: int) -> int:
        """Image tokens for a processed image of height x width pixels."""
        count = (height // self.patch_size) * (width // self.patch_size) + self.num_additional_image_tokens
        return count - 1 if self.vision_feature_select_strategy == "default" else count

    def _one(self, image: Image.Image) -> tuple[np.ndarray, bool]:
        array = chw(image)
        if self.do_pad:
            array = _pad_to_square(array, tuple(int(m * 255) for m in self.image_mean))
        shrunk = False
        if self.do_resize:
            height, width = self._target(array.shape[1], array.shape[2])
            shrunk = height < array.shape[1] or width < array.shape[2]
            array = resize(array, height, width, self.resample)
        if self.do_center_crop:
            array = _center_crop(array, self.crop_size["height"], self.crop_size["width"])
        return rescale_normalize(array, self.do_rescale, self.rescale_factor, self.do_normalize, self.image_mean,
                                 self.image_std), shrunk

    def _target(self, height: int, width: int) -> tuple[int, int]:
        if "shortest_edge" in self.size:
            edge = self.size["shortest_edge"]
            short, long = (width, height) if width <= height else (height, width)
            new_long = int(edge * long / short)
            return (new_long, edge) if width <= height else (edge, new_long)
        return self.size["height"], self.size["width"]


def _kind(name, tower: str, source: str) -> str:
    if name is None:
        return "SiglipImageProcessor" if tower.startswith("siglip") else "CLIPImageProcessor"
    base = name[:-4] if isinstance(name, str) and name.endswith("Fast") else name
    base = base[:-3] if isinstance(base, str) and base.endswith("Pil") else base
    if base not in KINDS:
        raise UnsupportedError(f"{source}: image_processor_type '{name}' is not one velotune has for LLaVA; "
                               f"supported: {', '.join(KINDS)}")
    return base


def _size(settings: Settings, name: str, default: dict | None, square_ints: bool) -> dict | None:
    """A size field in any spelling transformers accepts: an int (shortest edge, or a square), [h, w], or an
    object."""
    value = settings.data.get(name)
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return {"height": value, "width": value} if square_ints else {"shortest_edge": value}
    if isinstance(value, (list, tuple)) and len(value) == 2:
        value = {"height": value[0], "width": value[1]}
        settings = Settings({name: value}, settings.source)
    return settings.size(name, default, (("shortest_edge",), ("height", "width")))


def _pad_to_square(image: np.ndarray, fill: tuple[int, ...]) -> np.ndarray:
    """LlavaImageProcessor's pad: the short side centred on a square of the mean colour."""
    channels, height, width = image.shape
    if height == width:
        return image
    side = max(height, width)
    out = np.empty((channels, side, side), dtype=image.dtype)
    out[:] = np.asarray(fill, dtype=image.dtype)[:, None, None]
    if width > height:
        top = (side - height) // 2
        out[:, top:top + height, :] = image
    else:
        left = (side - width) // 2
        out[:, :, left:left + width] = image
    return out


def _center_crop(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """The centre height x width; an image smaller than that is first zero-padded around (as transformers)."""
    _, h, w = image.shape
    top, left = (h - height) // 2, (w - width) // 2
    if top >= 0 and left >= 0:
        return image[:, top:top + height, left:left + width]
    new_h, new_w = max(height, h), max(width, w)
    padded = np.zeros((image.shape[0], new_h, new_w), dtype=image.dtype)
    pad_top, pad_left = math.ceil((new_h - h) / 2), math.ceil((new_w - w) / 2)
    padded[:, pad_top:pad_top + h, pad_left:pad_left + w] = image
    top, left = top + pad_top, left + pad_left
    return padded[:, max(0, top):min(new_h, top + height), max(0, left):min(new_w, left + width)]


__all__ = ["ClipImageProcessor"]
