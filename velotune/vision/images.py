"""Reading the images a data set or a request refers to into RGB PIL images.

An image is given as a PIL image, a file path (relative to the data set's folder), the bytes of an image file, or
a `data:image/...;base64,` URI. URLs are refused: velotune runs offline, and a server must never fetch what a
request points at. Every failure is a `DataError` that names where the image was referred to (`source`, e.g.
"train.jsonl line 3") and the file: missing, empty, not an image, truncated, or over the pixel cap that guards
against decompression bombs. EXIF orientation is applied; palette, alpha, greyscale, 16-bit and CMYK images
become 8-bit RGB (transparency composited on white, as transformers does).
"""
from __future__ import annotations

import base64
import binascii
import io
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from ..errors import DataError
from .processor import to_rgb

DEFAULT_MAX_PIXELS = 64_000_000      # 64 MP: above any camera photo a model would see; a bomb stops here
# Decoders we let PIL use: the common photo and screenshot formats. Others (EPS runs Ghostscript, and so on)
# are refused rather than handed to a plugin nobody meant to expose.
FORMATS = ("AVIF", "BMP", "GIF", "JPEG", "PNG", "PPM", "TIFF", "WEBP")

_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*://")
_DATA_URI = re.compile(r"^data:([^,;]*)((?:;[^,;]*)*),(.*)$", re.DOTALL)
_EXIF_ORIENTATION = 0x0112


@dataclass
class ImageCounters:
    """Running counts for a data set or a server: images seen, and how many were shrunk because they were over
    the processor's maximum size (detail the model never sees), converted to RGB, or rotated by EXIF."""
    images: int = 0
    resized: int = 0
    converted: int = 0
    rotated: int = 0

    def add(self, processed) -> None:
        """Count a record's `ProcessedImages`."""
        self.images += len(processed.expansions)
        self.resized += processed.resized

    def summary(self) -> str:
        parts = [f"{self.images} image(s)"]
        if self.resized:
            parts.append(f"{self.resized} shrunk to the processor's maximum size")
        if self.converted:
            parts.append(f"{self.converted} converted to RGB")
        if self.rotated:
            parts.append(f"{self.rotated} rotated by their EXIF orientation")
        return ", ".join(parts)


def load_image(ref, *, base_dir=None, source: str, max_pixels: int = DEFAULT_MAX_PIXELS,
               allow_files: bool = True, counters: ImageCounters | None = None) -> Image.Image:
    """An RGB PIL image from `ref`: a PIL image, a path (relative to `base_dir` when not absolute), the bytes of
    an image file, or a `data:image/...;base64,` URI.

    `source` names the reference in errors. `max_pixels` caps width * height before decoding. A server passes
    `allow_files=False` so a request cannot read the server's disk. `counters` counts conversions."""
    if not isinstance(max_pixels, int) or isinstance(max_pixels, bool) or max_pixels <= 0:
        raise ValueError(f"max_pixels must be a positive integer, got {max_pixels!r}")
    if isinstance(ref, Image.Image):
        return _finish(ref, f"{source}: the image", max_pixels, counters)
    if isinstance(ref, (bytes, bytearray, memoryview)):
        data = bytes(ref)
        if not data:
            raise DataError(f"{source}: the image is empty (0 bytes)")
        return _decode(io.BytesIO(data), f"{source}: the image (bytes)", max_pixels, counters)
    if isinstance(ref, os.PathLike):
        ref = os.fspath(ref)
    if not isinstance(ref, str):
        raise DataError(f"{source}: an image must be a file path, a data:image/...;base64 URI or an image, "
                        f"got {type(ref).__name__}")
    text = ref.strip()
    if not text:
        raise DataError(f"{source}: the image reference is empty")
    if text[:5].lower() == "data:":
        return _decode(io.BytesIO(data_uri_bytes(text, source)), f"{source}: the data URI image", max_pixels,
                       counters)
    if _URL.match(text):
        raise DataError(f"{source}: image URLs are not fetched ({_shorten(text)}); velotune works offline and a "
                        "server never downloads what a request names. Download the file and give its path, or "
                        "send the image inline as a data:image/...;base64 URI")
    if not allow_files:
        raise DataError(f"{source}: file paths are not accepted here ({_shorten(text)}); send the image inline "
                        "as a data:image/...;base64 URI")
    path = Path(ref)
    if base_dir is not None and not path.is_absolute():
        path = Path(base_dir) / path
    where = f"{source}: image file {_shorten(str(path), 240)}"
    try:
        if not path.exists():
            raise DataError(f"{where} not found")
        if not path.is_file():
            raise DataError(f"{where} is not a file (a folder?)")
        if path.stat().st_size == 0:
            raise DataError(f"{where} is empty (0 bytes)")
        with open(path, "rb") as handle:
            return _decode(handle, where, max_pixels, counters)
    except PermissionError:
        raise DataError(f"{where} cannot be read (permission denied)") from None
    except OSError as exc:     # a name too long for the file system, and the like
        raise DataError(f"{where} cannot be read ({exc.strerror or exc})") from None


def data_uri_bytes(text: str, source: str, kind: str = "image", also: tuple[str, ...] = ()) -> bytes:
    """The bytes of a `data:<kind>/<type>;base64,<data>` URI (media types `also` accepted too), or a DataError
    naming `source` and what is wrong. Images and uploaded videos (infer/vision_prompt.py) read theirs here."""
    expected = f"expected data:{kind}/<type>;base64,<data>"
    match = _DATA_URI.match(text)
    if match is None:
        raise DataError(f"{source}: malformed data URI ({expected})")
    media_type, params, payload = match.group(1).strip().lower(), match.group(2).lower(), match.group(3)
    if not media_type.startswith(kind + "/") and media_type not in also:
        article = "an" if kind[0] in "aeiou" else "a"
        raise DataError(f"{source}: the data URI holds '{media_type or 'text/plain'}', not {article} {kind} "
                        f"({expected})")
    if ";base64" not in params:
        raise DataError(f"{source}: the data URI {kind} is not base64-encoded (expected ;base64,)")
    payload = re.sub(r"\s+", "", payload)
    if not payload:
        raise DataError(f"{source}: the data URI {kind} is empty")
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise DataError(f"{source}: the data URI {kind} is not valid base64") from None
    if not data:
        raise DataError(f"{source}: the data URI {kind} is empty")
    return data


def _decode(handle, where: str, max_pixels: int, counters: ImageCounters | None) -> Image.Image:
    formats = [f for f in FORMATS if f in _registered()]
    try:
        with warnings.catch_warnings():
            # Our own cap (checked before decoding) is the guard; PIL's warning would only repeat it.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(handle, formats=formats) as image:
                _check_pixels(image, where, max_pixels)
                image.load()
                rotated = _orientation(image) not in (0, 1)
                loaded = ImageOps.exif_transpose(image)   # a decoded copy, turned upright
    except DataError:
        raise
    except Image.DecompressionBombError as exc:
        raise DataError(f"{where}: refused as a decompression bomb ({exc})") from None
    except UnidentifiedImageError:
        raise DataError(f"{where} is not an image velotune reads (formats: {', '.join(formats)})") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise DataError(f"{where} cannot be decoded (truncated or corrupt?): {exc}") from None
    if rotated and counters is not None:
        counters.rotated += 1
    return _to_rgb_checked(loaded, where, counters)


def _registered() -> set[str]:
    Image.init()
    return set(Image.OPEN)


def _check_pixels(image: Image.Image, where: str, max_pixels: int) -> None:
    width, height = image.size
    if width <= 0 or height <= 0:
        raise DataError(f"{where} has no pixels ({width}x{height})")
    if width * height > max_pixels:
        raise DataError(f"{where} is {width}x{height} = {width * height / 1e6:.1f} MP, over the "
                        f"{max_pixels / 1e6:g} MP limit (a guard against decompression bombs); shrink it first")


def _finish(image: Image.Image, where: str, max_pixels: int, counters: ImageCounters | None) -> Image.Image:
    """A caller's PIL image: checked, turned upright, RGB."""
    _check_pixels(image, where, max_pixels)
    if _orientation(image) not in (0, 1):
        image = ImageOps.exif_transpose(image)
        if counters is not None:
            counters.rotated += 1
    return _to_rgb_checked(image, where, counters)


def _orientation(image: Image.Image) -> int:
    try:
        return int(image.getexif().get(_EXIF_ORIENTATION, 1))
    except (OSError, ValueError, TypeError):
        return 1    # unreadable EXIF: keep the pixels as stored


def _to_rgb_checked(image: Image.Image, where: str, counters: ImageCounters | None) -> Image.Image:
    if image.mode == "RGB":
        return image
    try:
        image = to_rgb(_to_8bit(image))
    except (OSError, ValueError) as exc:
        raise DataError(f"{where}: cannot convert its colour mode '{image.mode}' to RGB ({exc})") from None
    if counters is not None:
        counters.converted += 1
    return image


def _to_8bit(image: Image.Image) -> Image.Image:
    """Greyscale with more than 8 bits (16-bit PNG, TIFF) scaled to 0..255; PIL's own conversion would clip
    everything above 255 to white."""
    if image.mode.startswith("I;16"):
        values = np.asarray(image, dtype=np.float64)
        return Image.fromarray(np.clip(np.round(values / 257.0), 0, 255).astype(np.uint8))
    if image.mode == "I":
        values = np.asarray(image, dtype=np.float64)
        if values.size and values.max() > 255:
            values = values / 257.0
        return Image.fromarray(np.clip(np.round(values), 0, 255).astype(np.uint8))
    if image.mode == "F":
        values = np.asarray(image, dtype=np.float64)
        finite = values[np.isfinite(values)]
        if finite.size and finite.min() >= 0 and finite.max() <= 1:
            values = values * 255.0
        return Image.fromarray(np.clip(np.nan_to_num(np.round(values)), 0, 255).astype(np.uint8))
    return image


def _shorten(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


__all__ = ["DEFAULT_MAX_PIXELS", "FORMATS", "ImageCounters", "data_uri_bytes", "load_image"]
