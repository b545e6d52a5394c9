"""velotune.vision.images: every way an image can be referred to, the RGB conversions (checked against
transformers' own convert_to_rgb), EXIF orientation, and every bad input as a DataError naming source and file."""
from __future__ import annotations

import base64
import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from velotune.errors import DataError
from velotune.vision.images import ImageCounters, load_image
from velotune.vision.processor import ProcessedImages

SOURCE = "train.jsonl line 3"


def _noise(width: int, height: int, mode: str = "RGB", seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    image = Image.fromarray(rng.integers(0, 256, (height, width, 4), dtype=np.uint8), "RGBA")
    return image if mode == "RGBA" else image.convert(mode)


def _png_bytes(image: Image.Image, **save) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", **save)
    return buffer.getvalue()


def _data_uri(data: bytes, media: str = "image/png") -> str:
    return f"data:{media};base64," + base64.b64encode(data).decode()


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height (no pixel data): what a decompression bomb looks like before
    decoding."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


# ---- the ways to refer to an image -----------------------------------------------------------------------------
def test_path_relative_to_base_dir_pil_bytes_and_data_uri_agree(tmp_path):
    image = _noise(13, 7)
    (tmp_path / "pics").mkdir()
    (tmp_path / "pics" / "a.png").write_bytes(_png_bytes(image))
    expected = np.asarray(image)
    for ref, base in (("pics/a.png", tmp_path), (str(tmp_path / "pics" / "a.png"), None),
                      (tmp_path / "pics" / "a.png", None), (image, None), (_png_bytes(image), None),
                      (_data_uri(_png_bytes(image)), None)):
        loaded = load_image(ref, base_dir=base, source=SOURCE)
        assert loaded.mode == "RGB" and loaded.size == (13, 7)
        np.testing.assert_array_equal(np.asarray(loaded), expected)


def test_data_uri_with_line_breaks_and_jpeg():
    buffer = io.BytesIO()
    _noise(16, 16).save(buffer, format="JPEG")
    encoded = base64.b64encode(buffer.getvalue()).decode()
    wrapped = "\n".join(encoded[i:i + 60] for i in range(0, len(encoded), 60))
    assert load_image("data:image/jpeg;base64," + wrapped, source=SOURCE).size == (16, 16)


# ---- conversions ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["RGBA", "LA", "L", "P", "1", "CMYK"])
def test_modes_become_rgb_as_transformers_converts_them(mode):
    from transformers.image_transforms import convert_to_rgb

    image = _noise(11, 9, mode)
    counters = ImageCounters()
    ours = load_image(image, source=SOURCE, counters=counters)
    assert ours.mode == "RGB" and counters.converted == 1
    np.testing.assert_array_equal(np.asarray(ours), convert_to_rgb(image, return_numpy=True))


def test_alpha_is_composited_on_white():
    image = Image.new("RGBA", (4, 4), (10, 20, 30, 0))       # fully transparent
    assert np.asarray(load_image(image, source=SOURCE)).min() == 255
    palette = Image.new("P", (4, 4), 0)
    palette.putpalette([0, 0, 0] * 256)
    palette.info["transparency"] = 0
    loaded = load_image(_png_bytes(palette, transparency=0), source=SOURCE)
    assert np.asarray(loaded).min() == 255


def test_sixteen_bit_greyscale_is_scaled_not_clipped():
    values = np.array([[0, 257 * 100, 65535]], dtype=np.uint16)
    loaded = load_image(_png_bytes(Image.fromarray(values)), source=SOURCE)
    np.testing.assert_array_equal(np.asarray(loaded)[0, :, 0], [0, 100, 255])


def test_exif_orientation_is_applied(tmp_path):
    image = _noise(6, 4)
    exif = Image.Exif()
    exif[0x0112] = 6                         # "rotate 90 CW to view"
    path = tmp_path / "turned.png"
    image.save(path, exif=exif)
    counters = ImageCounters()
    loaded = load_image(path, source=SOURCE, counters=counters)
    assert loaded.size == (4, 6) and counters.rotated == 1
    np.testing.assert_array_equal(np.asarray(loaded), np.asarray(image.transpose(Image.Transpose.ROTATE_270)))


# ---- bad input ----------------------------------------------------------------------------------------------------
def _refused(ref, *words, **kwargs):
    with pytest.raises(DataError) as caught:
        load_image(ref, source=SOURCE, **kwargs)
    message = str(caught.value)
    assert SOURCE in message, message
    for word in words:
        assert word in message, message
    return message


def test_missing_file_names_source_and_path(tmp_path):
    _refused("nope.png", "nope.png", "not found", base_dir=tmp_path)


def test_not_an_image_empty_file_and_folder(tmp_path):
    (tmp_path / "notes.png").write_text("this is text, not a picture")
    _refused(tmp_path / "notes.png", "notes.png", "not an image")
    (tmp_path / "empty.jpg").write_bytes(b"")
    _refused(tmp_path / "empty.jpg", "empty.jpg", "empty")
    _refused(tmp_path, "not a file")
    _refused(b"", "empty")
    _refused(b"GIF89a garbage", "not an image")


def test_truncated_image(tmp_path):
    data = _png_bytes(_noise(64, 64))
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    _refused(tmp_path / "cut.png", "cut.png", "cannot be decoded")


@pytest.mark.parametrize("url", ["http://example.com/cat.png", "https://example.com/cat.png",
                                 "file:///etc/passwd", "ftp://host/a.jpg", "s3://bucket/key.png"])
def test_urls_are_refused(url):
    _refused(url, "not fetched", "offline")


def test_bad_data_uris():
    _refused("data:text/plain;base64,aGVsbG8=", "not an image")
    _refused("data:image/png,rawbytes", "not base64-encoded")
    _refused("data:image/png;base64,@@@@", "not valid base64")
    _refused("data:image/png;base64,", "empty")
    _refused(_data_uri(b"definitely not a png"), "not an image")
    _refused("data:image/png", "malformed")


def test_server_mode_refuses_paths_but_takes_data_uris(tmp_path):
    (tmp_path / "a.png").write_bytes(_png_bytes(_noise(3, 3)))
    _refused(str(tmp_path / "a.png"), "file paths are not accepted", allow_files=False)
    assert load_image(_data_uri(_png_bytes(_noise(3, 3))), source=SOURCE, allow_files=False).size == (3, 3)


def test_decompression_bomb_guard(tmp_path):
    # 9000 x 9000 = 81 MP: over our default 64 MP cap, refused from the header before any decoding.
    (tmp_path / "bomb.png").write_bytes(_png_header_only(9000, 9000))
    _refused(tmp_path / "bomb.png", "bomb.png", "9000x9000", "64 MP limit")
    # Far past PIL's own limit, PIL refuses at open; still our DataError.
    _refused(_png_header_only(30000, 30000), "decompression bomb")
    # A caller's cap applies to real images and to images already in memory.
    _refused(_png_bytes(_noise(40, 30)), "40x30", max_pixels=1000)
    _refused(_noise(40, 30), "40x30", max_pixels=1000)


def test_wrong_reference_type():
    _refused(12345, "int")
    _refused("   ", "empty")
    _refused("iVBORw0KGgo" * 100, "cannot be read")    # base64 without its data: prefix, taken as a file name


def test_counters_add_processed_images():
    counters = ImageCounters()
    counters.add(ProcessedImages({}, ["a", "b", "c"], [1, 1, 1], resized=2))
    counters.add(ProcessedImages({}, [], [], 0))
    assert (counters.images, counters.resized) == (3, 2)
    assert "2 shrunk" in counters.summary() and "3 image(s)" in counters.summary()
