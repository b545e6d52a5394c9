"""Reading audio files (or in-memory samples) into the float32 mono 16 kHz arrays speech models take.

Files are decoded with soundfile (libsndfile: WAV, FLAC, Ogg Vorbis/Opus, MP3) and resampled with soxr when their
rate differs. Every failure is a `DataError` that names the file: missing, empty, not audio, corrupt, or a format
we do not read. The returned `AudioInfo` keeps the file's own rate and channel count, so a caller can count how
many files were resampled or mixed down.
"""
from __future__ import annotations

import importlib
import io
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import DataError, UnsupportedError

SAMPLE_RATE = 16000
# Extensions we accept; libsndfile identifies the real format from the file's header, the extension only
# keeps obviously wrong files (a .txt, an .m4a that libsndfile cannot read) out with a clear message.
SUPPORTED_EXTENSIONS = (".flac", ".mp3", ".ogg", ".oga", ".opus", ".wav")


@dataclass(frozen=True)
class AudioInfo:
    """What the source held before we converted it, and what we made of it."""

    source: str                 # the file path, or a description such as "dataset row 3"
    original_sample_rate: int
    channels: int
    original_frames: int        # samples per channel in the source
    format: str                 # libsndfile's name ("WAV", "FLAC", "MP3", "OGG") or "array"
    sample_rate: int            # the rate of the returned samples
    num_samples: int            # length of the returned samples

    @property
    def resampled(self) -> bool:
        return self.original_sample_rate != self.sample_rate

    @property
    def mixed_down(self) -> bool:
        return self.channels > 1

    @property
    def duration_s(self) -> float:
        return self.num_samples / self.sample_rate


def load_audio(path: str | Path, *, sample_rate: int = SAMPLE_RATE) -> tuple[np.ndarray, AudioInfo]:
    """Decode an audio file to float32 mono samples at `sample_rate` (shape (num_samples,)), with its `AudioInfo`.

    Stereo and multi-channel files are averaged to mono; other rates are resampled with soxr (high quality).
    Raises `DataError` naming the file when it is missing, a folder, empty, not a supported format, unreadable,
    holds no samples, or holds non-finite samples.
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: audio file not found")
    if not path.is_file():
        raise DataError(f"{path}: not a file (a folder?); expected an audio file")
    suffix = path.suffix.lower()
    if suffix not in SUPPORTED_EXTENSIONS:
        shown = f"'{path.suffix}'" if path.suffix else "no extension"
        raise DataError(f"{path}: unsupported audio format ({shown}); velotune reads "
                        f"{', '.join(SUPPORTED_EXTENSIONS)}")
    if path.stat().st_size == 0:
        raise DataError(f"{path}: the file is empty (0 bytes)")
    return _decode(path, str(path), sample_rate)


def decode_audio_bytes(data: bytes, *, source: str, sample_rate: int = SAMPLE_RATE) -> tuple[np.ndarray, AudioInfo]:
    """Like `load_audio` for the bytes of an audio file (e.g. a `datasets` Audio column stored as bytes);
    `source` names where the bytes came from in error messages."""
    if not data:
        raise DataError(f"{source}: the audio is empty (0 bytes)")
    return _decode(io.BytesIO(data), source, sample_rate)


def prepare_samples(samples, original_rate: int, *, source: str,
                    sample_rate: int = SAMPLE_RATE) -> tuple[np.ndarray, AudioInfo]:
    """Float32 mono samples at `sample_rate` from an in-memory array at `original_rate`.

    A 1-D array is mono; a 2-D array is taken to hold channels along its shorter side (either (frames, channels)
    or (channels, frames)) and is averaged to mono.
    """
    try:
        array = np.asarray(samples, dtype=np.float32)
    except (TypeError, ValueError):
        raise DataError(f"{source}: audio samples are not a numeric array") from None
    if not isinstance(original_rate, (int, np.integer)) or isinstance(original_rate, bool) or original_rate <= 0:
        raise DataError(f"{source}: sampling rate must be a positive whole number, got {original_rate!r}")
    if array.ndim == 1:
        frames = array[:, None]
    elif array.ndim == 2:
        frames = array if array.shape[0] >= array.shape[1] else array.T
    else:
        raise DataError(f"{source}: expected 1-D (mono) or 2-D (multi-channel) samples, got shape {array.shape}")
    return _finish(frames, int(original_rate), source, "array", sample_rate)


def _require(module: str):
    """Import an audio library, or say how to install it (both are optional dependencies of velotune)."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise UnsupportedError(f"reading audio needs the '{module}' package: pip install 'velotune[audio]' "
                               "(or bash scripts/setup.sh)") from None


def _decode(file, source: str, sample_rate: int) -> tuple[np.ndarray, AudioInfo]:
    soundfile = _require("soundfile")

    try:
        with soundfile.SoundFile(file) as sound:
            file_format = sound.format
            rate = sound.samplerate
            frames = sound.read(dtype="float32", always_2d=True)
    except soundfile.LibsndfileError as exc:
        raise DataError(f"{source}: not readable as audio (corrupt, or not a WAV/FLAC/Ogg/MP3 file: "
                        f"{_libsndfile_reason(exc)})") from None
    except (RuntimeError, ValueError, TypeError) as exc:
        # soundfile raises plain RuntimeError/ValueError for some malformed headers and torn files
        raise DataError(f"{source}: not readable as audio (corrupt or truncated: {exc})") from None
    return _finish(frames, rate, source, file_format, sample_rate)


def _libsndfile_reason(exc) -> str:
    return getattr(exc, "error_string", None) or str(exc)


def _finish(frames: np.ndarray, rate: int, source: str, file_format: str,
            sample_rate: int) -> tuple[np.ndarray, AudioInfo]:
    """Mix (frames, channels) down to mono, resample to `sample_rate`, and check the result."""
    num_frames, channels = frames.shape
    if num_frames == 0 or channels == 0:
        raise DataError(f"{source}: the audio holds no samples (0 frames)")
    if not np.isfinite(frames).all():
        raise DataError(f"{source}: the audio holds NaN or infinite samples (a corrupt float file?)")
    # Averaging rather than summing keeps a full-scale stereo file within [-1, 1].
    mono = frames[:, 0] if channels == 1 else frames.mean(axis=1, dtype=np.float32)
    if rate != sample_rate:
        mono = _resample(mono, rate, sample_rate)
        if mono.size == 0:
            raise DataError(f"{source}: the audio is too short to resample ({num_frames} frames at {rate} Hz)")
    mono = np.ascontiguousarray(mono, dtype=np.float32)
    info = AudioInfo(source=source, original_sample_rate=int(rate), channels=int(channels),
                     original_frames=int(num_frames), format=str(file_format), sample_rate=sample_rate,
                     num_samples=int(mono.shape[0]))
    return mono, info


def _resample(mono: np.ndarray, rate: int, target: int) -> np.ndarray:
    return _require("soxr").resample(mono, rate, target, quality="HQ")


def loudest_frame_db(audio, *, frame_length: int = 400) -> float:
    """The RMS level, in dB relative to full scale (1.0), of the loudest `frame_length`-sample stretch.

    400 samples is 25 ms at 16 kHz, one feature window: short enough that a single word in a long pause counts.
    Returns -inf for empty or all-zero audio.
    """
    samples = np.asarray(audio.detach().cpu() if hasattr(audio, "detach") else audio, dtype=np.float64).ravel()
    if samples.size == 0:
        return -math.inf
    pad = (-samples.size) % frame_length
    if pad:
        samples = np.concatenate([samples, np.zeros(pad)])
    frames = samples.reshape(-1, frame_length)
    # Only the frames' real samples count: a short tail frame is averaged over its own length, not the padding.
    lengths = np.full(frames.shape[0], frame_length, dtype=np.float64)
    lengths[-1] = frame_length - pad
    rms = np.sqrt((frames ** 2).sum(axis=1) / lengths)
    loudest = float(rms.max())
    return 20.0 * math.log10(loudest) if loudest > 0 else -math.inf


def is_silent(audio, *, threshold_db: float = -60.0, frame_length: int = 400) -> bool:
    """True when no `frame_length`-sample stretch of `audio` is louder than `threshold_db` dBFS (RMS).

    The default -60 dBFS sits below quiet speech (around -40 dBFS and up) and above digital silence and a clean
    recording's noise floor, so a clip holding any speech is kept; a clip of room hiss louder than -60 dBFS is
    not called silent.
    """
    return loudest_frame_db(audio, frame_length=frame_length) < threshold_db
