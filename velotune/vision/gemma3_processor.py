"""Gemma 3's image processing, matching transformers' `Gemma3ImageProcessorPil` and the image side of
`Gemma3Processor` (model_type "gemma3").

Every image is resized (bilinear unless preprocessor_config.json's `resample` says otherwise) to the fixed `size`,
which must be the SigLIP tower's square `vision_config.image_size`, then rescaled and normalised (Gemma 3's
mean = std = 0.5): pixel_values [images, 3, H, W].

The chat template writes `<start_of_image>` per image; it becomes "\\n\\n<start_of_image>", image_seq_length
`<image_soft_token>` tokens and "<end_of_image>\\n\\n", as Gemma3Processor writes it. The model finds the image
runs from the soft tokens of input_ids, which is all transformers' `token_type_ids` marks, so no text-side tensor
travels with the images.

Pan-and-scan (extra crops of very wide or tall images) is refused: transformers' Gemma3Processor itself overrides
the file's `do_pan_and_scan` with its own default (off), so a file that turns it on is ambiguous.
"""
from __future__ import annotations

from PIL import Image

from ..errors import CheckpointError, DataError, UnsupportedError
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

HALF = (0.5, 0.5, 0.5)
BILINEAR = 2
DEFAULT_SIZE = 224           # Gemma3ImageProcessor's class default, and SigLIP's default image_size
DEFAULT_SEQ_LENGTH = 256     # Gemma3Processor's image_seq_length, Gemma3Config's mm_tokens_per_image
BOI, EOI, IMAGE_TOKEN = "<start_of_image>", "<end_of_image>", "<image_soft_token>"
TYPES = ("Gemma3ImageProcessor", "Gemma3ImageProcessorFast", "Gemma3ImageProcessorPil")


def image_sequence(count: int) -> str:
    """The text that replaces one `<start_of_image>` (Gemma3Processor's full_image_sequence)."""
    return f"\n\n{BOI}{IMAGE_TOKEN * count}{EOI}\n\n"


class Gemma3ImageProcessor(ImageProcessor):
    """Fixed-size SigLIP image processing for Gemma 3."""

    model_types = ("gemma3",)
    placeholder = BOI
    image_token = IMAGE_TOKEN
    tensor_names = ("pixel_values",)

    def __init__(self, *, height: int = DEFAULT_SIZE, width: int = DEFAULT_SIZE, do_resize: bool = True,
                 resample: int = BILINEAR, do_rescale: bool = True, rescale_factor: float = 1 / 255,
                 do_normalize: bool = True, image_mean=HALF, image_std=HALF,
                 image_seq_length: int = DEFAULT_SEQ_LENGTH):
        self.height = height
        self.width = width
        self.do_resize = do_resize
        self.resample = resample
        self.do_rescale = do_rescale
        self.rescale_factor = rescale_factor
        self.do_normalize = do_normalize
        self.image_mean = tuple(image_mean)
        self.image_std = tuple(image_std)
        self.image_seq_length = image_seq_length

    # ---- settings ---------------------------------------------------------------------------------------------
    @classmethod
    def from_config(cls, preprocessor: dict, processor: dict, model_config: dict, *,
                    files: ProcessorFiles | None = None) -> Gemma3ImageProcessor:
        files = files or ProcessorFiles()
        pre = Settings(preprocessor, files.preprocessor)
        proc = Settings(processor, files.processor)
        kind = preprocessor.get("image_processor_type")
        if kind is not None and kind not in TYPES:
            raise UnsupportedError(f"{files.preprocessor}: image_processor_type {kind!r} is not Gemma 3's "
                                   f"({', '.join(TYPES)})")
        if pre.flag("do_pan_and_scan", False):
            raise UnsupportedError(
                f"{files.preprocessor}: field 'do_pan_and_scan' is true; velotune does not do Gemma 3's "
                "pan-and-scan crops (transformers' Gemma3Processor also leaves them off unless asked per call). "
                "Set it to false or null to process each image whole")
        height, width = _size(pre)
        do_resize = pre.flag("do_resize", True)
        if model_config.get("vision_config"):
            side = vision_settings(model_config, files).positive_int("image_size", DEFAULT_SIZE)
            if (height, width) != (side, side):
                raise CheckpointError(
                    f"{files.preprocessor}: field 'size' is {{height: {height}, width: {width}}} but the vision "
                    f"tower takes {side} x {side} images ({files.model}: vision_config.image_size); they must agree")
        return cls(height=height, width=width, do_resize=do_resize, resample=pre.resample("resample", BILINEAR),
                   do_rescale=pre.flag("do_rescale", True),
                   rescale_factor=pre.positive_number("rescale_factor", 1 / 255),
                   do_normalize=pre.flag("do_normalize", True), image_mean=pre.channels("image_mean", HALF),
                   image_std=pre.channels("image_std", HALF, positive=True),
                   image_seq_length=_seq_length(proc, pre, Settings(model_config, files.model)))

    def to_dict(self) -> dict:
        return {"image_processor_type": "Gemma3ImageProcessor", "do_resize": self.do_resize,
                "size": {"height": self.height, "width": self.width}, "resample": self.resample,
                "do_rescale": self.do_rescale, "rescale_factor": self.rescale_factor,
                "do_normalize": self.do_normalize, "image_mean": list(self.image_mean),
                "image_std": list(self.image_std), "do_convert_rgb": True, "do_pan_and_scan": False}

    def processor_dict(self) -> dict:
        return {"processor_class": "Gemma3Processor", "image_seq_length": self.image_seq_length}

    # ---- images -----------------------------------------------------------------------------------------------
    def __call__(self, images: list[Image.Image], *, source: str = "images") -> ProcessedImages:
        arrays, resized = [], 0
        for number, image in enumerate(images, 1):
            array = chw(to_rgb(image))
            height, width = array.shape[1:]
            if self.do_resize:
                resized += height > self.height or width > self.width
                array = resize(array, self.height, self.width, self.resample)
            elif (height, width) != (self.height, self.width):
                # Without a resize every image must already be the tower's size (they are stacked).
                raise DataError(f"{source}: image {number} is {width} x {height} pixels but the processor does not "
                                f"resize (do_resize false) and the model takes {self.width} x {self.height}")
            arrays.append(rescale_normalize(array, self.do_rescale, self.rescale_factor, self.do_normalize,
                                            self.image_mean, self.image_std))
        if not arrays:
            return ProcessedImages({}, [], [], 0)
        count = self.image_seq_length
        return ProcessedImages({"pixel_values": stack(arrays)}, [image_sequence(count)] * len(arrays),
                               [count] * len(arrays), resized)


def _size(pre: Settings) -> tuple[int, int]:
    """(height, width) of `size`: an int (a square, as Gemma 3's default_to_square), [height, width] or
    {height, width}."""
    value = pre.data.get("size")
    if isinstance(value, int) and not isinstance(value, bool):
        value = {"height": value, "width": value}
    elif isinstance(value, (list, tuple)) and len(value) == 2:
        value = {"height": value[0], "width": value[1]}
    size = Settings({"size": value}, pre.source).size("size", {"height": DEFAULT_SIZE, "width": DEFAULT_SIZE},
                                                      (("height", "width"),))
    return size["height"], size["width"]


def _seq_length(proc: Settings, pre: Settings, model: Settings) -> int:
    """Image tokens per image: processor_config.json's image_seq_length (older hub folders also keep it in
    preprocessor_config.json), else config.json's mm_tokens_per_image; the two must agree, or the model's
    feature rows would not fit the prompt's tokens."""
    tokens = model.positive_int("mm_tokens_per_image", None)
    for settings in (proc, pre):
        length = settings.positive_int("image_seq_length", None)
        if length is None:
            continue
        if tokens is not None and length != tokens:
            raise CheckpointError(f"{settings.source}: field 'image_seq_length' is {length} but the model makes "
                                  f"{tokens} features per image ({model.source}: mm_tokens_per_image)")
        return length
    return tokens if tokens is not None else DEFAULT_SEQ_LENGTH


__all__ = ["Gemma3ImageProcessor", "image_sequence"]
