"""What every image processor shares: the `ProcessedImages` it returns, the `ImageProcessor` interface the data
pipeline, generation and export code against, the placeholder expansion in the prompt text, reading the
checkpoint's processor files, and `image_processor_for(model_dir)`, which picks the family's processor by
config.json's model_type (`video_processor_for(model_dir)` the video processor of a family that reads videos).

A processor turns the images of ONE record (one prompt) into tensors under transformers' names and, per image,
the text that replaces its placeholder in the prompt (the image tokens the model's features are scattered over).
`collate` joins the records of a batch.
"""
from __future__ import annotations

import json
import math
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import import_module
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..errors import CheckpointError, DataError, UnsupportedError

PREPROCESSOR_FILE = "preprocessor_config.json"
PROCESSOR_FILE = "processor_config.json"
MODEL_CONFIG_FILE = "config.json"

# config.json model_type -> "module:class" of its image processor (imported on use).
PROCESSORS = {
    "llava": "velotune.vision.clip_processor:ClipImageProcessor",
    "qwen2_vl": "velotune.vision.qwen2_vl_processor:Qwen2VLImageProcessor",
    "qwen2_5_vl": "velotune.vision.qwen2_vl_processor:Qwen2VLImageProcessor",
    "idefics3": "velotune.vision.idefics3_processor:Idefics3ImageProcessor",
    "smolvlm": "velotune.vision.idefics3_processor:Idefics3ImageProcessor",
    "gemma3": "velotune.vision.gemma3_processor:Gemma3ImageProcessor",
}

# PIL's filter numbers, the values preprocessor_config.json's "resample" holds.
RESAMPLE_NAMES = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}


@dataclass
class ProcessedImages:
    """The images of one record, ready for the model: `tensors` under transformers' names (`pixel_values`, and
    `image_grid_thw` or `pixel_attention_mask` where the family has them), per image the text that replaces its
    placeholder and the number of image tokens in that text, and how many images were shrunk because they were
    over the processor's maximum size."""
    tensors: dict[str, torch.Tensor]
    expansions: list[str]
    tokens_per_image: list[int]
    resized: int = 0

    def __len__(self) -> int:
        return len(self.expansions)


@dataclass
class ProcessorFiles:
    """Where each settings dict came from, for error messages."""
    preprocessor: str = PREPROCESSOR_FILE
    processor: str = PROCESSOR_FILE
    model: str = MODEL_CONFIG_FILE


class ImageProcessor(ABC):
    """A family's image processing, matching transformers' PIL image processor and processor for it."""

    model_types: tuple[str, ...] = ()
    placeholder: str = "<image>"    # what a chat template writes per image
    image_token: str = "<image>"    # the token repeated in the expansion, one per image feature row
    tensor_names: tuple[str, ...] = ("pixel_values",)
    source_dir: Path | None = None  # the checkpoint folder read by from_dir (None: built from dicts)

    @abstractmethod
    def __call__(self, images: list[Image.Image], *, source: str = "images") -> ProcessedImages:
        """Process the images of one record (in prompt order); `source` names the record in errors."""

    @abstractmethod
    def to_dict(self) -> dict:
        """preprocessor_config.json for an export (transformers' keys; it rebuilds the same processing)."""

    def processor_dict(self) -> dict:
        """The processor-level fields of processor_config.json (token counts, image token) for an export."""
        return {}

    @classmethod
    @abstractmethod
    def from_config(cls, preprocessor: dict, processor: dict, model_config: dict, *,
                    files: ProcessorFiles | None = None) -> ImageProcessor:
        """Build from the three settings dicts (preprocessor_config.json, processor_config.json without its nested
        image processor, config.json); `files` names them in errors."""

    @classmethod
    def from_dir(cls, model_dir) -> ImageProcessor:
        """Read a checkpoint folder's processor files (see `read_processor_files`)."""
        preprocessor, processor, model_config, files = read_processor_files(model_dir)
        model_type = model_config.get("model_type")
        if cls.model_types and model_type is not None and model_type not in cls.model_types:
            raise CheckpointError(f"{files.model}: model_type '{model_type}' is not one {cls.__name__} processes "
                                  f"({', '.join(cls.model_types)}); use image_processor_for(model_dir)")
        made = cls.from_config(preprocessor, processor, model_config, files=files)
        made.source_dir = Path(model_dir)   # where video_processor_of finds the folder's video settings
        return made

    # ---- the prompt side ------------------------------------------------------------------------------------
    def expand(self, text: str, processed: ProcessedImages, source: str) -> str:
        """`text` with its placeholders replaced, in order, by the images' expansions. A count mismatch (more
        placeholders than images, or the reverse) is a DataError naming `source` and both counts."""
        pieces = text.split(self.placeholder)
        found = len(pieces) - 1
        if found != len(processed.expansions):
            raise DataError(f"{source}: the text has {found} image placeholder(s) ('{self.placeholder}') but "
                            f"{len(processed.expansions)} image(s) were given; each image needs exactly one "
                            "placeholder, in the order the images are listed")
        out = [pieces[0]]
        for expansion, piece in zip(processed.expansions, pieces[1:]):
            out.append(expansion)
            out.append(piece)
        return "".join(out)

    def count_placeholders(self, text: str) -> int:
        return text.count(self.placeholder)

    def wrap(self, expansion: str) -> str:
        """One image's text where a chat template renders an image part: the expansion, inside the family's
        image delimiters when the placeholder sits between them (Qwen2-VL's <|vision_start|>...<|vision_end|>)."""
        return expansion

    # ---- batches ------------------------------------------------------------------------------------------------
    def collate(self, records: list[ProcessedImages]) -> dict[str, torch.Tensor]:
        """The image tensors of a batch, records in order (records without images add nothing); {} if no record
        has an image. Families whose tensors are per record (Idefics3) override this."""
        present = [r for r in records if len(r)]
        if not present:
            return {}
        return {name: torch.cat([r.tensors[name] for r in present], dim=0) for name in self.tensor_names}


# ---- shared numerics (transformers' PIL backend, step for step, so the floats match bit for bit) ---------------
def to_rgb(image: Image.Image) -> Image.Image:
    """An RGB image; transparency is composited on white (as transformers and `load_image` do)."""
    if image.mode == "RGB":
        return image
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def chw(image: Image.Image) -> np.ndarray:
    """uint8 [3, H, W] of an RGB image."""
    return np.ascontiguousarray(np.asarray(image, dtype=np.uint8).transpose(2, 0, 1))


def resize(image: np.ndarray, height: int, width: int, resample: int) -> np.ndarray:
    """uint8 CHW resized by PIL (transformers resizes the uint8 image before rescaling)."""
    pil = Image.fromarray(np.ascontiguousarray(image.transpose(1, 2, 0)))
    return chw(pil.resize((width, height), resample=resample))


def rescale_normalize(image: np.ndarray, do_rescale: bool, scale: float, do_normalize: bool,
                      mean: tuple[float, ...], std: tuple[float, ...]) -> np.ndarray:
    """float32 CHW: (pixel * scale - mean) / std, with transformers' float64-then-float32 rescale."""
    out = (image.astype(np.float64) * scale).astype(np.float32) if do_rescale else image.astype(np.float32)
    if do_normalize:
        m = np.asarray(mean, dtype=np.float32)[:, None, None]
        s = np.asarray(std, dtype=np.float32)[:, None, None]
        out = (out - m) / s
    return out


# ---- reading settings --------------------------------------------------------------------------------------
class Settings:
    """Typed reads of one settings dict; errors name the file and the field."""

    def __init__(self, data: Mapping[str, Any], source: str):
        if not isinstance(data, Mapping):
            raise CheckpointError(f"{source}: expected a JSON object, got {type(data).__name__}")
        self.data = data
        self.source = source

    def has(self, name: str) -> bool:
        return self.data.get(name) is not None

    def flag(self, name: str, default: bool) -> bool:
        value = self.data.get(name)
        if value is None:
            return default
        if not isinstance(value, bool):
            raise CheckpointError(f"{self.source}: field '{name}' must be true or false, got {value!r}")
        return value

    def positive_int(self, name: str, default: int | None) -> int | None:
        value = self.data.get(name)
        if value is None:
            return default
        if not _is_int(value) or value <= 0:
            raise CheckpointError(f"{self.source}: field '{name}' must be a positive integer, got {value!r}")
        return value

    def int_at_least(self, name: str, default: int, low: int) -> int:
        value = self.data.get(name)
        if value is None:
            return default
        if not _is_int(value) or value < low:
            raise CheckpointError(f"{self.source}: field '{name}' must be an integer >= {low}, got {value!r}")
        return value

    def positive_number(self, name: str, default: float) -> float:
        value = self.data.get(name)
        if value is None:
            return default
        if not _is_number(value) or not 0 < value < math.inf:
            raise CheckpointError(f"{self.source}: field '{name}' must be a positive number, got {value!r}")
        return value

    def channels(self, name: str, default: tuple[float, ...], positive: bool = False) -> tuple[float, ...]:
        """A per-channel (RGB) list of numbers, or one number for all three."""
        value = self.data.get(name)
        if value is None:
            return tuple(default)
        values = [value] * 3 if _is_number(value) else value
        if (not isinstance(values, (list, tuple)) or len(values) != 3 or not all(_is_number(v) for v in values)
                or (positive and not all(v > 0 for v in values))):
            kind = "positive numbers" if positive else "numbers"
            raise CheckpointError(f"{self.source}: field '{name}' must be a list of 3 {kind} (R, G, B), "
                                  f"got {value!r}")
        return tuple(float(v) for v in values)

    def resample(self, name: str, default: int) -> int:
        value = self.data.get(name)
        if value is None:
            return default
        if not _is_int(value) or value not in RESAMPLE_NAMES:
            raise CheckpointError(f"{self.source}: field '{name}' must be a PIL filter number "
                                  f"({', '.join(f'{k}={v}' for k, v in RESAMPLE_NAMES.items())}), got {value!r}")
        return value

    def size(self, name: str, default: dict | None, allowed: tuple[tuple[str, ...], ...]) -> dict | None:
        """A size object with one of the `allowed` key sets, each a positive integer."""
        value = self.data.get(name)
        if value is None:
            return None if default is None else dict(default)
        keys = tuple(sorted(value)) if isinstance(value, dict) else None
        if keys not in {tuple(sorted(a)) for a in allowed}:
            shown = " or ".join("{" + ", ".join(a) + "}" for a in allowed)
            raise CheckpointError(f"{self.source}: field '{name}' must be an object with keys {shown}, got {value!r}")
        for key in keys:
            if not _is_int(value[key]) or value[key] <= 0:
                raise CheckpointError(f"{self.source}: field '{name}.{key}' must be a positive integer, "
                                      f"got {value[key]!r}")
        return dict(value)

    def choice(self, name: str, default: str, choices: tuple[str, ...]) -> str:
        value = self.data.get(name)
        if value is None:
            return default
        if value not in choices:
            raise CheckpointError(f"{self.source}: field '{name}' must be one of {', '.join(choices)}, got {value!r}")
        return value

    def text(self, name: str, default: str) -> str:
        value = self.data.get(name)
        if value is None:
            return default
        if not isinstance(value, str) or not value:
            raise CheckpointError(f"{self.source}: field '{name}' must be a non-empty string, got {value!r}")
        return value


def vision_settings(model_config: dict, files: ProcessorFiles) -> Settings:
    """config.json's vision_config (empty when absent)."""
    vision = model_config.get("vision_config") or {}
    return Settings(vision, f"{files.model} (vision_config)")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


# ---- files ----------------------------------------------------------------------------------------------------
def _read_json(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: not readable as JSON ({exc})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def read_processor_files(model_dir) -> tuple[dict, dict, dict, ProcessorFiles]:
    """(image processor settings, processor settings, config.json, their file names) of a checkpoint folder.

    transformers 5 writes one processor_config.json with the image processor nested under "image_processor";
    older checkpoints have preprocessor_config.json beside a processor_config.json of processor fields. The nested
    one wins when both are there, as in transformers."""
    folder = Path(model_dir)
    model_path = folder / MODEL_CONFIG_FILE
    model_config = _read_json(model_path)
    if model_config is None:
        raise CheckpointError(f"{model_path}: not found; a model folder needs its config.json")
    processor_path = folder / PROCESSOR_FILE
    preprocessor_path = folder / PREPROCESSOR_FILE
    processor = _read_json(processor_path) or {}
    files = ProcessorFiles(str(preprocessor_path), str(processor_path), str(model_path))
    nested = processor.get("image_processor")
    if nested is not None:
        if not isinstance(nested, dict):
            raise CheckpointError(f"{processor_path}: field 'image_processor' must be an object")
        preprocessor = nested
        files.preprocessor = f"{processor_path} (image_processor)"
    else:
        preprocessor = _read_json(preprocessor_path)
        if preprocessor is None:
            raise CheckpointError(f"{folder}: no {PREPROCESSOR_FILE} (nor an 'image_processor' object in "
                                  f"{PROCESSOR_FILE}); copy it from the base model's folder")
    processor = {k: v for k, v in processor.items() if k != "image_processor"}
    return preprocessor, processor, model_config, files


def processor_class(model_type: str, source: str) -> type[ImageProcessor]:
    target = PROCESSORS.get(model_type)
    if target is None:
        raise UnsupportedError(f"{source}: model_type '{model_type}' has no image processor in velotune; "
                               f"supported: {', '.join(sorted(PROCESSORS))}")
    module, name = target.split(":")
    return getattr(import_module(module), name)


def image_processor_for(model_dir) -> ImageProcessor:
    """The image processor of a vision-language checkpoint folder, chosen by config.json's model_type."""
    model_path = Path(model_dir) / MODEL_CONFIG_FILE
    model_config = _read_json(model_path)
    if model_config is None:
        raise CheckpointError(f"{model_path}: not found; a model folder needs its config.json")
    model_type = model_config.get("model_type")
    cls = processor_class(model_type if isinstance(model_type, str) else repr(model_type), str(model_path))
    return cls.from_dir(model_dir)


# config.json model_type -> "module:class" of its video processor; a family not here reads images only.
VIDEO_PROCESSORS = {
    "qwen2_vl": "velotune.vision.qwen2_vl_video:Qwen2VLVideoProcessor",
    "qwen2_5_vl": "velotune.vision.qwen2_vl_video:Qwen2VLVideoProcessor",
}
VIDEO_PREPROCESSOR_FILE = "video_preprocessor_config.json"


def video_processor_for(model_dir):
    """The video processor of a checkpoint folder, or None for a family that reads images only. Its settings are
    found where transformers' AutoVideoProcessor looks: processor_config.json's "video_processor", else
    video_preprocessor_config.json, else preprocessor_config.json (video processors fall back to the image
    processor's file), else processor_config.json's "image_processor"."""
    folder = Path(model_dir)
    model_path = folder / MODEL_CONFIG_FILE
    model_config = _read_json(model_path)
    if model_config is None:
        raise CheckpointError(f"{model_path}: not found; a model folder needs its config.json")
    target = VIDEO_PROCESSORS.get(model_config.get("model_type"))
    if target is None:
        return None
    processor_path = folder / PROCESSOR_FILE
    processor = _read_json(processor_path) or {}
    found = None
    for name, where in (("video_processor", f"{processor_path} (video_processor)"),
                        (None, str(folder / VIDEO_PREPROCESSOR_FILE)), (None, str(folder / PREPROCESSOR_FILE)),
                        ("image_processor", f"{processor_path} (image_processor)")):
        settings = processor.get(name) if name else _read_json(Path(where))
        if settings is not None:
            if not isinstance(settings, dict):
                raise CheckpointError(f"{where}: expected a JSON object, got {type(settings).__name__}")
            found = settings, where
            break
    if found is None:
        raise CheckpointError(f"{folder}: no video processor settings ({VIDEO_PREPROCESSOR_FILE} or "
                              f"{PREPROCESSOR_FILE}); copy them from the base model's folder")
    module, name = target.split(":")
    cls = getattr(import_module(module), name)
    return cls.from_config(found[0], model_config, files=ProcessorFiles(found[1], str(processor_path),
                                                                        str(model_path)))


def stack(arrays: list[np.ndarray]) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(np.stack(arrays)))


__all__ = [
    "PROCESSORS",
    "ImageProcessor",
    "ProcessedImages",
    "ProcessorFiles",
    "Settings",
    "image_processor_for",
    "processor_class",
    "read_processor_files",
    "video_processor_for",
]
