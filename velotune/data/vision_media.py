"""A vision record's media: video references, and reading and processing a record's images and videos with the
family's processors (images through vision/images.py, video files through vision/video.py, both processed by the
family's image and video processors). data/vision_data.py turns records into examples with these."""
from __future__ import annotations

import math
import os
import re
import weakref
from dataclasses import dataclass
from pathlib import Path

from ..errors import DataError

VIDEO_FAMILIES = "Qwen2-VL or Qwen2.5-VL"


@dataclass(frozen=True)
class VideoRef:
    """A video among a record's references (which are otherwise image references, all in prompt order): a file
    path, or its frames (a tuple of image references). `fps`: the rate a file is sampled at (None: video.py's
    default), or the rate of the listed frames (None: unknown)."""
    video: str | tuple
    fps: float | None = None

    @property
    def rereadable(self) -> bool:
        if isinstance(self.video, str):
            return True
        return all(isinstance(frame, str) for frame in self.video)


def video_ref(video, fps, at: str) -> VideoRef:
    """A video part's (or the `videos` column's) reference: a file path or a list of frames."""
    if fps is not None and (not isinstance(fps, (int, float)) or isinstance(fps, bool) or not 0 < fps < math.inf):
        raise DataError(f"{at}: a video's fps must be a positive number, got {fps!r}")
    if isinstance(video, VideoRef):
        return video
    if isinstance(video, (list, tuple)):
        if not video:
            raise DataError(f"{at}: a video given as frames needs at least one frame")
        return VideoRef(tuple(video), fps)
    if isinstance(video, os.PathLike):
        video = os.fspath(video)
    if not isinstance(video, str) or not video.strip():
        raise DataError(f"{at}: a video must be a file path or a list of frames (images), got {video!r:.80}")
    return VideoRef(video, fps)


_VIDEO_PROCESSORS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def video_processor_of(processor):
    """The video processor that goes with an image processor (None: the family reads images only): the folder's
    own when the processor was read from one (vision/processor.py video_processor_for), else built from the image
    settings, which transformers' video processors fall back to. Made once per image processor."""
    try:
        return _VIDEO_PROCESSORS[processor]
    except KeyError:
        pass
    except TypeError:   # an object that takes no weak reference: not cached
        return _make_video_processor(processor)
    made = _VIDEO_PROCESSORS[processor] = _make_video_processor(processor)
    return made


def _make_video_processor(processor):
    from ..vision.processor import video_processor_for
    folder = getattr(processor, "source_dir", None)
    if folder is not None:
        return video_processor_for(folder)
    types = getattr(processor, "model_types", ())
    if "qwen2_vl" in types:
        from ..vision.qwen2_vl_video import Qwen2VLVideoProcessor
        return Qwen2VLVideoProcessor.from_config(processor.to_dict(), {"model_type": processor.model_type})
    return None


def video_placeholder_of(processor) -> str | None:
    """The text placeholder of the family's videos, or None for a family that reads images only (known from the
    image processor, without reading the video settings: data without videos never needs them)."""
    from importlib import import_module

    from ..vision.processor import VIDEO_PROCESSORS
    target = next((VIDEO_PROCESSORS[t] for t in getattr(processor, "model_types", ()) if t in VIDEO_PROCESSORS), None)
    if target is None:
        return None
    module, name = target.split(":")
    return getattr(import_module(module), name).placeholder


def family_of(processor) -> str:
    types = getattr(processor, "model_types", ())
    return types[0] if types else "this model"


def process_media(refs: list, processor, *, base_dir=None, where: str, allow_files: bool = True):
    """(ProcessedImages or None, ProcessedVideos or None) of one record's references (images and VideoRefs, each
    kind in prompt order)."""
    from ..vision.images import load_image
    image_refs = [r for r in refs if not isinstance(r, VideoRef)]
    video_refs = [r for r in refs if isinstance(r, VideoRef)]
    images = [load_image(ref, base_dir=base_dir, source=where, allow_files=allow_files) for ref in image_refs]
    processed = processor(images, source=where) if images else None
    if not video_refs:
        return processed, None
    video_processor = video_processor_of(processor)
    if video_processor is None:
        raise DataError(f"{where}: a video part, but {family_of(processor)} reads images only (videos need a "
                        f"{VIDEO_FAMILIES} model)")
    clips, rates = [], []
    for number, ref in enumerate(video_refs, 1):
        frames, rate = _read_video(ref, video_processor, base_dir, f"{where}: video {number}", allow_files)
        clips.append(frames)
        rates.append(rate)
    return processed, video_processor(clips, fps=rates, source=where)


def _read_video(ref: VideoRef, video_processor, base_dir, where: str, allow_files: bool):
    """(frames: a uint8 array [T, H, W, 3] or a list of PIL images, their frame rate) of one video."""
    from ..vision.images import load_image
    from ..vision.qwen2_vl_video import UNKNOWN_FPS
    if isinstance(ref.video, tuple):
        frames = [load_image(frame, base_dir=base_dir, source=f"{where}, frame {k}", allow_files=allow_files)
                  for k, frame in enumerate(ref.video)]
        return frames, float(ref.fps or UNKNOWN_FPS)
    from ..vision.video import DEFAULT_FPS, read_video
    text = ref.video.strip()
    if text[:5].lower() == "data:" or re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*://", text):
        raise DataError(f"{where}: videos are read from files; URLs and data URIs are not ({text[:80]}); give the "
                        "file's path, or the video's frames as a list of images")
    if not allow_files:
        raise DataError(f"{where}: file paths are not accepted here ({text[:80]}); send the video as a list of "
                        "frames (data:image/...;base64 URIs)")
    path = Path(text)
    if base_dir is not None and not path.is_absolute():
        path = Path(base_dir) / path
    try:
        video = read_video(path, fps=float(ref.fps or DEFAULT_FPS), frame_factor=video_processor.temporal_patch_size)
    except DataError as exc:
        raise DataError(f"{where}: {exc}") from None
    return video.frames, video.fps


def media_tensors(images, videos) -> dict:
    """One record's tensors under transformers' names (its images' and its videos')."""
    return {**(images.tensors if images is not None else {}), **(videos.tensors if videos is not None else {})}


__all__ = ["VIDEO_FAMILIES", "VideoRef", "family_of", "media_tensors", "process_media", "video_placeholder_of",
           "video_processor_of", "video_ref"]
