"""Qwen2-VL / Qwen2.5-VL video processing: sampled frames -> `pixel_values_videos`, `video_grid_thw` (and for
Qwen2.5-VL `second_per_grid_ts`) and the `<|video_pad|>` expansion, matching transformers' Qwen2VLVideoProcessor
and the video side of Qwen2VLProcessor / Qwen2_5_VLProcessor.

transformers' video processor runs on torchvision tensors, not PIL, so its numbers differ from the image
processor's: frames are resized as uint8 tensors by torch's antialiased bicubic (torchvision's native uint8 path on
CPU), then normalized in float32 with the mean and std folded into the 0..255 scale. Every frame of a video gets
the same smart_resize size (from the video's min / max pixels); frames are grouped temporal_patch_size at a time,
an odd count padded by repeating the last frame; patches are flattened in the order the vision tower reads them.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..errors import CheckpointError, DataError
from .processor import ProcessorFiles, Settings, to_rgb, vision_settings
from .qwen2_vl_processor import (BICUBIC, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, VISION_END, VISION_START, patch_shapes,
                                 smart_resize)

# transformers' Qwen2VLVideoProcessor.size defaults (larger floor, smaller ceiling than the image processor's).
VIDEO_MIN_PIXELS = 128 * 28 * 28
VIDEO_MAX_PIXELS = 28 * 28 * 768
UNKNOWN_FPS = 24.0  # transformers' VideoMetadata.sampled_fps when nothing says the frame rate
# PIL filter numbers -> torch interpolate modes (those torch has: no lanczos, box or hamming).
_MODES = {0: "nearest-exact", 2: "bilinear", 3: "bicubic"}


@dataclass
class ProcessedVideos:
    """The videos of one record: tensors under transformers' names, per video the text replacing its
    placeholder and its number of video tokens."""
    tensors: dict[str, torch.Tensor]
    expansions: list[str]
    tokens_per_video: list[int]

    def __len__(self) -> int:
        return len(self.expansions)


class Qwen2VLVideoProcessor:
    """Frames to Qwen2-VL video inputs. `videos` are each a list of PIL images or a uint8 array [T, H, W, C]
    (C = 3, or 1 for grey); `fps` is each video's sampled frame rate (video.VideoFrames.fps), read only by
    Qwen2.5-VL's `second_per_grid_ts` (temporal_patch_size / fps)."""

    model_types = ("qwen2_vl", "qwen2_5_vl")
    placeholder = "<|video_pad|>"    # the template writes <|vision_start|><|video_pad|><|vision_end|>
    video_token = "<|video_pad|>"

    def __init__(self, *, min_pixels: int = VIDEO_MIN_PIXELS, max_pixels: int = VIDEO_MAX_PIXELS,
                 patch_size: int = 14, temporal_patch_size: int = 2, merge_size: int = 2, do_resize: bool = True,
                 resample: int = BICUBIC, do_rescale: bool = True, rescale_factor: float = 1 / 255,
                 do_normalize: bool = True, image_mean=OPENAI_CLIP_MEAN, image_std=OPENAI_CLIP_STD,
                 model_type: str = "qwen2_vl"):
        if min_pixels > max_pixels:
            raise ValueError(f"min_pixels ({min_pixels}) is above max_pixels ({max_pixels})")
        if resample not in _MODES:
            raise ValueError(f"resample {resample}: video frames are resized by torch, which has PIL filters "
                             f"{sorted(_MODES)} only")
        self.min_pixels, self.max_pixels = min_pixels, max_pixels
        self.patch_size, self.temporal_patch_size, self.merge_size = patch_size, temporal_patch_size, merge_size
        self.do_resize, self.resample = do_resize, resample
        self.do_rescale, self.rescale_factor = do_rescale, rescale_factor
        self.do_normalize = do_normalize
        self.image_mean, self.image_std = tuple(image_mean), tuple(image_std)
        self.model_type = model_type

    @property
    def factor(self) -> int:
        return self.patch_size * self.merge_size

    @property
    def tensor_names(self) -> tuple[str, ...]:
        base = ("pixel_values_videos", "video_grid_thw")
        return (*base, "second_per_grid_ts") if self.model_type == "qwen2_5_vl" else base

    @classmethod
    def from_config(cls, preprocessor: dict, model_config: dict, *,
                    files: ProcessorFiles | None = None) -> Qwen2VLVideoProcessor:
        """From video_preprocessor_config.json (or, for checkpoints without one, the dict transformers falls back
        to) and config.json; `files.preprocessor` names the first in errors."""
        files = files or ProcessorFiles()
        pre = Settings(preprocessor, files.preprocessor)
        vision = vision_settings(model_config, files)
        size = pre.size("size", {"shortest_edge": VIDEO_MIN_PIXELS, "longest_edge": VIDEO_MAX_PIXELS},
                        (("shortest_edge", "longest_edge"),))
        min_pixels = pre.positive_int("min_pixels", size["shortest_edge"])
        max_pixels = pre.positive_int("max_pixels", size["longest_edge"])
        if min_pixels > max_pixels:
            raise CheckpointError(f"{files.preprocessor}: min_pixels ({min_pixels}) is above max_pixels "
                                  f"({max_pixels})")
        shapes = patch_shapes(pre, vision, files, "videos")
        resample = pre.resample("resample", BICUBIC)
        if resample not in _MODES:
            raise CheckpointError(f"{files.preprocessor}: field 'resample' ({resample}) is not a filter video "
                                  f"frames can be resized with; supported: {sorted(_MODES)}")
        model_type = model_config.get("model_type") if model_config.get("model_type") in cls.model_types \
            else "qwen2_vl"
        return cls(min_pixels=min_pixels, max_pixels=max_pixels, **shapes, do_resize=pre.flag("do_resize", True),
                   resample=resample, do_rescale=pre.flag("do_rescale", True),
                   rescale_factor=pre.positive_number("rescale_factor", 1 / 255),
                   do_normalize=pre.flag("do_normalize", True),
                   image_mean=pre.channels("image_mean", OPENAI_CLIP_MEAN),
                   image_std=pre.channels("image_std", OPENAI_CLIP_STD, positive=True), model_type=model_type)

    # ---- videos -----------------------------------------------------------------------------------------------
    def __call__(self, videos: list, *, fps=None, source: str = "videos") -> ProcessedVideos:
        """Process the videos of one record (in prompt order). `fps`: one rate for all, one per video, or None
        (transformers' 24)."""
        rates = _rates(fps, len(videos), source)
        patches, grids = [], []
        for number, video in enumerate(videos, 1):
            frames = self.frames_tensor(video, f"{source}: video {number}")
            flat, grid = self.patchify(self.normalize(self.resize(frames, f"{source}: video {number}")))
            patches.append(flat)
            grids.append(grid)
        if not patches:
            return ProcessedVideos({}, [], [])
        counts = [t * h * w // self.merge_size ** 2 for t, h, w in grids]
        tensors = {"pixel_values_videos": torch.cat(patches), "video_grid_thw": torch.tensor(grids, dtype=torch.int64)}
        if self.model_type == "qwen2_5_vl":  # python floats made a tensor, as transformers' BatchFeature does
            tensors["second_per_grid_ts"] = torch.tensor([self.temporal_patch_size / r for r in rates])
        return ProcessedVideos(tensors, [self.video_token * n for n in counts], counts)

    def frames_tensor(self, video, where: str) -> torch.Tensor:
        """uint8 [T, 3, H, W] of a list of PIL images or a [T, H, W, C] uint8 array."""
        if isinstance(video, (list, tuple)):
            if not video or not all(isinstance(f, Image.Image) for f in video):
                raise DataError(f"{where}: a video as a list must hold PIL images (at least one)")
            arrays = [np.asarray(to_rgb(f), dtype=np.uint8) for f in video]
            if len({a.shape for a in arrays}) != 1:
                raise DataError(f"{where}: frames of different sizes {sorted({a.shape[:2] for a in arrays})}")
            video = np.stack(arrays)
        if isinstance(video, torch.Tensor):
            video = video.numpy()
        if not isinstance(video, np.ndarray) or video.dtype != np.uint8 or video.ndim != 4 \
                or video.shape[-1] not in (1, 3) or video.shape[0] == 0:
            shape = getattr(video, "shape", None)
            raise DataError(f"{where}: expected uint8 frames [T, H, W, 3] (or a list of PIL images), got "
                            f"{type(video).__name__} of shape {list(shape) if shape is not None else '?'} "
                            f"dtype {getattr(video, 'dtype', '?')}")
        frames = torch.from_numpy(np.ascontiguousarray(video)).permute(0, 3, 1, 2).contiguous()
        return frames.expand(-1, 3, -1, -1).contiguous() if frames.shape[1] == 1 else frames

    def resize(self, frames: torch.Tensor, where: str) -> torch.Tensor:
        height, width = frames.shape[-2:]
        if not self.do_resize:
            if height % self.factor or width % self.factor:
                raise DataError(f"{where} is {width}x{height}; with do_resize off both sides must be multiples of "
                                f"{self.factor}")
            return frames
        try:
            new_h, new_w = smart_resize(height, width, self.factor, self.min_pixels, self.max_pixels)
        except ValueError as exc:
            raise DataError(f"{where} ({width}x{height}): {exc}; crop it first") from None
        if (new_h, new_w) == (height, width):
            return frames
        mode = _MODES[self.resample]
        smooth = mode != "nearest-exact"
        # torchvision's CPU path: uint8 in, uint8 out for bicubic (bilinear and nearest run on uint8 as well).
        return F.interpolate(frames, size=(new_h, new_w), mode=mode, antialias=smooth,
                             align_corners=False if smooth else None)

    def normalize(self, frames: torch.Tensor) -> torch.Tensor:
        """float32 frames: (pixel - mean * 255) / (std * 255) when both steps are on, as transformers fuses them."""
        if self.do_rescale and self.do_normalize:
            mean = torch.tensor(self.image_mean) * (1.0 / self.rescale_factor)
            std = torch.tensor(self.image_std) * (1.0 / self.rescale_factor)
            return frames.to(torch.float32).sub(mean.view(-1, 1, 1)).div_(std.view(-1, 1, 1))
        if self.do_normalize:
            mean = torch.tensor(self.image_mean, dtype=torch.float32).view(-1, 1, 1)
            std = torch.tensor(self.image_std, dtype=torch.float32).view(-1, 1, 1)
            return frames.to(torch.float32).sub(mean).div_(std)
        if self.do_rescale:
            return frames * self.rescale_factor
        return frames.to(torch.float32)

    def patchify(self, frames: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int, int]]:
        """[T, C, H, W] -> ([t * h * w patches, C * temporal_patch_size * patch_size^2], (t, h, w))."""
        p, m, tp = self.patch_size, self.merge_size, self.temporal_patch_size
        if pad := -frames.shape[0] % tp:  # an incomplete last temporal patch repeats the last frame
            frames = torch.cat([frames, frames[-1:].expand(pad, -1, -1, -1)])
        count, channels, height, width = frames.shape
        grid_t, grid_h, grid_w = count // tp, height // p, width // p
        blocks = frames.reshape(grid_t, tp, channels, grid_h // m, m, p, grid_w // m, m, p)
        # (t, h blocks, w blocks, m, m, C, tp, p, p): merge blocks row-major, then each patch's values
        blocks = blocks.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
        return blocks.reshape(grid_t * grid_h * grid_w, channels * tp * p * p), (grid_t, grid_h, grid_w)

    # ---- the prompt side ------------------------------------------------------------------------------------
    def wrap(self, expansion: str) -> str:
        return VISION_START + expansion + VISION_END

    def expand(self, text: str, processed: ProcessedVideos, source: str) -> str:
        """`text` with each `<|video_pad|>` replaced, in order, by its video's expansion; a count mismatch is a
        DataError naming `source`."""
        pieces = text.split(self.placeholder)
        if len(pieces) - 1 != len(processed):
            raise DataError(f"{source}: the text has {len(pieces) - 1} video placeholder(s) ('{self.placeholder}') "
                            f"but {len(processed)} video(s) were given; each video needs exactly one placeholder")
        out = [pieces[0]]
        for expansion, piece in zip(processed.expansions, pieces[1:]):
            out += [expansion, piece]
        return "".join(out)

    def collate(self, records: list[ProcessedVideos]) -> dict[str, torch.Tensor]:
        """The video tensors of a batch, records in order; {} if no record has a video."""
        present = [r for r in records if len(r)]
        if not present:
            return {}
        return {name: torch.cat([r.tensors[name] for r in present]) for name in self.tensor_names}


def _rates(fps, count: int, source: str) -> list[float]:
    if fps is None:
        return [UNKNOWN_FPS] * count
    rates = [fps] * count if isinstance(fps, (int, float)) else list(fps)
    if len(rates) != count or not all(isinstance(r, (int, float)) and r > 0 for r in rates):
        raise DataError(f"{source}: fps must be one positive number or one per video ({count}), got {fps!r}")
    return [float(r) for r in rates]


__all__ = ["ProcessedVideos", "Qwen2VLVideoProcessor", "VIDEO_MAX_PIXELS", "VIDEO_MIN_PIXELS"]
