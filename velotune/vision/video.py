"""Reading a video file into the frames a vision-language model sees: decoded with PyAV (`av`, imported only
when a video is read), sampled at a frame rate (Qwen's default 2 per second) and bounded in frames and in total
pixels, so one training sample cannot cost more than the caps allow whatever the file holds.

The sampled frames keep their spacing in time: `VideoFrames.fps` is the rate of the frames returned (frames
taken / frames in the file * the file's frame rate, as transformers' VideoMetadata.sampled_fps computes it), which
Qwen2.5-VL's processor turns into `second_per_grid_ts`.

`read_video_bytes` reads a video held in memory (a server's upload) the same way, never writing it to disk, opened
only as MP4/MOV, Matroska/WebM or AVI, and with bounds on the decoding work (frame size, pixels decoded in all) as
well as on what is kept.
"""
from __future__ import annotations

import io
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from ..errors import DataError, UnsupportedError

DEFAULT_FPS = 2.0
MIN_FRAMES = 4
MAX_FRAMES = 256
# About 16k Qwen2-VL patches of 28 x 28 pixels: a bound on one sample's decoded pixels (frames * height * width).
MAX_TOTAL_PIXELS = 16384 * 28 * 28
UNKNOWN_RATE = 24.0  # transformers' assumption for a video whose frame rate is not known
# Bounds on decoding an untrusted upload (read_video_bytes): one frame at most 4096 x 4096, and all frames decoded
# (to count them, or up to the last one kept) at most 4e9 pixels, about a minute of 1080p at 30 frames a second.
MAX_UPLOAD_FRAME_PIXELS = 4096 * 4096
MAX_UPLOAD_DECODED_PIXELS = 4_000_000_000
# Demuxers an upload may be opened with: MP4 / MOV, Matroska / WebM and AVI (FFmpeg's names).
UPLOAD_FORMATS = "mov,matroska,webm,avi"


@dataclass
class VideoFrames:
    """Sampled frames [T, H, W, 3] uint8, their frame rate, and where they came from."""
    frames: np.ndarray
    fps: float
    source_fps: float
    total_frames: int
    indices: list[int] = field(default_factory=list)

    def __len__(self) -> int:
        return int(self.frames.shape[0])


def sample_indices(total_frames: int, source_fps: float, *, fps: float = DEFAULT_FPS, min_frames: int = MIN_FRAMES,
                   max_frames: int = MAX_FRAMES, frame_factor: int = 2) -> list[int]:
    """Which frames to keep: `fps` per second of video, at least min_frames and at most max_frames (never more than
    the file has), a multiple of frame_factor (the model's temporal patch) when the file allows, spread evenly
    from the first frame to the last."""
    if total_frames <= 0:
        return []
    wanted = total_frames / source_fps * fps
    ceiling = min(max_frames, total_frames)
    wanted = min(max(wanted, min_frames), ceiling)
    count = math.floor(wanted / frame_factor) * frame_factor
    if count < 1:  # fewer frames than one temporal patch: keep them all (the processor pads the last one)
        count = min(total_frames, max(1, int(wanted)))
    if count == 1:
        return [0]
    return [round(i * (total_frames - 1) / (count - 1)) for i in range(count)]


def read_video(path, *, fps: float = DEFAULT_FPS, min_frames: int = MIN_FRAMES, max_frames: int = MAX_FRAMES,
               max_total_pixels: int = MAX_TOTAL_PIXELS, frame_factor: int = 2) -> VideoFrames:
    """Decode `path` and sample it (see `sample_indices`). Frames whose total pixels would pass max_total_pixels
    are shrunk (bicubic, aspect kept) to fit; the processor resizes them to the model's grid anyway.

    A missing or unreadable file, or a file without a video stream, is a DataError naming the file; a missing
    PyAV an UnsupportedError saying what to install."""
    path = Path(path)
    _check_settings(fps, min_frames, max_frames, max_total_pixels)
    av = _import_av(str(path))
    if not path.is_file():
        raise DataError(f"{path}: video file not found")
    return _read(lambda: av.open(str(path)), str(path), fps=fps, min_frames=min_frames, max_frames=max_frames,
                 max_total_pixels=max_total_pixels, frame_factor=frame_factor)


def read_video_bytes(data: bytes, *, source: str = "the video", fps: float = DEFAULT_FPS,
                     min_frames: int = MIN_FRAMES, max_frames: int = MAX_FRAMES,
                     max_total_pixels: int = MAX_TOTAL_PIXELS, frame_factor: int = 2,
                     max_frame_pixels: int = MAX_UPLOAD_FRAME_PIXELS,
                     max_decoded_pixels: int = MAX_UPLOAD_DECODED_PIXELS) -> VideoFrames:
    """`read_video` for a video held in memory (an upload): decoded from `data` without touching the disk, with the
    same sampling and caps, and two more bounds on the work an untrusted file can cause, checked while decoding:
    `max_frame_pixels` (one frame's width * height) and `max_decoded_pixels` (all frames decoded, counted or kept).
    Only the container formats in UPLOAD_FORMATS are opened. Every failure is a DataError naming `source`."""
    _check_settings(fps, min_frames, max_frames, max_total_pixels)
    for name, value in (("max_frame_pixels", max_frame_pixels), ("max_decoded_pixels", max_decoded_pixels)):
        if not value > 0:
            raise ValueError(f"read_video_bytes: {name} must be positive, got {value!r}")
    data = bytes(data)
    if not data:
        raise DataError(f"{source}: the video is empty (0 bytes)")
    av = _import_av(source)
    # format_whitelist: FFmpeg refuses every other demuxer (playlists, concat lists, ...), so the bytes can never
    # make it open another file or a URL.
    budget = _Budget(max_frame_pixels, max_decoded_pixels, source)
    return _read(lambda: av.open(io.BytesIO(data), options={"format_whitelist": UPLOAD_FORMATS}), source,
                 fps=fps, min_frames=min_frames, max_frames=max_frames, max_total_pixels=max_total_pixels,
                 frame_factor=frame_factor, budget=budget)


def _check_settings(fps, min_frames, max_frames, max_total_pixels) -> None:
    for name, value in (("fps", fps), ("max_total_pixels", max_total_pixels)):
        if not value > 0:
            raise ValueError(f"read_video: {name} must be positive, got {value!r}")
    if not 1 <= min_frames <= max_frames:
        raise ValueError(f"read_video: need 1 <= min_frames ({min_frames}) <= max_frames ({max_frames})")


class _Budget:
    """The decoding work left to an untrusted video: one frame's pixels, and all frames' pixels together (a small
    file can hold a great many tiny, cheap-to-store frames, or a few huge ones)."""

    def __init__(self, frame_pixels: int | None, total_pixels: int | None, label: str):
        self.frame_pixels, self.left, self.label = frame_pixels, total_pixels, label

    def check_size(self, width: int, height: int) -> None:
        if self.frame_pixels is not None and width * height > self.frame_pixels:
            raise DataError(f"{self.label}: the video's frames are {width}x{height}, over the {self.frame_pixels} "
                            "pixels a frame may have here")

    def spend(self, frame) -> None:
        self.check_size(frame.width, frame.height)
        if self.left is not None:
            self.left -= frame.width * frame.height
            if self.left < 0:
                raise DataError(f"{self.label}: the video holds more frames than may be decoded here (over "
                                "the decoded-pixel budget); send a shorter or smaller clip")


def _read(opener, label: str, *, fps: float, min_frames: int, max_frames: int, max_total_pixels: int,
          frame_factor: int, budget: _Budget | None = None) -> VideoFrames:
    try:
        total, rate = _count_frames(opener, label, budget)
        if total == 0:
            raise DataError(f"{label}: the video stream holds no frames")
        indices = sample_indices(total, rate, fps=fps, min_frames=min_frames, max_frames=max_frames,
                                 frame_factor=frame_factor)
        frames = _decode(opener, label, indices, budget)
    except DataError:
        raise
    except Exception as exc:  # PyAV's errors (FFmpegError, ...) and broken streams alike
        raise DataError(f"{label}: cannot read the video ({type(exc).__name__}: {exc})") from None
    if len(frames) < len(indices):
        raise DataError(f"{label}: the video ended after {len(frames)} of the {len(indices)} frames sampled")
    stacked = _fit_pixels(np.stack(frames), max_total_pixels)
    return VideoFrames(stacked, len(indices) / total * rate, rate, total, indices)


def _import_av(label: str):
    try:
        import av
    except ImportError:
        raise UnsupportedError(f"{label}: reading videos needs PyAV (`pip install 'velotune[video]'`), which is not "
                               "installed") from None
    return av


def _open(opener, label: str, budget: _Budget | None):
    container = opener()
    if not container.streams.video:
        container.close()
        raise DataError(f"{label}: the file has no video stream")
    if budget is not None:   # the header's size, before any frame is decoded (each frame is checked again)
        context = container.streams.video[0].codec_context
        try:
            budget.check_size(int(context.width or 0), int(context.height or 0))
        except DataError:
            container.close()
            raise
    return container


def _count_frames(opener, label: str, budget: _Budget | None) -> tuple[int, float]:
    """(frames in the first video stream, its frame rate). Containers that do not record the count are decoded
    once to count (frames are not kept)."""
    with _open(opener, label, budget) as container:
        stream = container.streams.video[0]
        rate = stream.average_rate or stream.guessed_rate
        rate = float(rate) if rate else UNKNOWN_RATE
        total = int(stream.frames or 0)
        if total <= 0:
            total = 0
            for frame in container.decode(stream):
                if budget is not None:
                    budget.spend(frame)
                total += 1
    return total, rate


def _decode(opener, label: str, indices: list[int], budget: _Budget | None) -> list[np.ndarray]:
    """RGB uint8 arrays of the frames at `indices` (sorted, possibly repeated), decoding the stream once."""
    wanted: dict[int, int] = {}
    for i in indices:
        wanted[i] = wanted.get(i, 0) + 1
    out: list[np.ndarray] = []
    last = max(indices)
    with _open(opener, label, budget) as container:
        for number, frame in enumerate(container.decode(container.streams.video[0])):
            if budget is not None:
                budget.spend(frame)
            if number in wanted:
                array = frame.to_ndarray(format="rgb24")
                out.extend(array for _ in range(wanted[number]))
            if number >= last:
                break
    return out


def _fit_pixels(frames: np.ndarray, max_total_pixels: int) -> np.ndarray:
    count, height, width = frames.shape[:3]
    if count * height * width <= max_total_pixels:
        return frames
    scale = math.sqrt(max_total_pixels / (count * height * width))
    new_h, new_w = max(1, int(height * scale)), max(1, int(width * scale))
    return np.stack([np.asarray(Image.fromarray(f).resize((new_w, new_h), resample=Image.BICUBIC)) for f in frames])


__all__ = ["DEFAULT_FPS", "MAX_FRAMES", "MAX_TOTAL_PIXELS", "MAX_UPLOAD_DECODED_PIXELS", "MAX_UPLOAD_FRAME_PIXELS",
           "MIN_FRAMES", "UPLOAD_FORMATS", "VideoFrames", "read_video", "read_video_bytes", "sample_indices"]
