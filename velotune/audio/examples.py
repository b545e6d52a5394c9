"""Speech examples and the rules that admit a decoded clip into a training set.

Both the manifest reader and the `datasets` reader decode each row, then hand it here: clips longer than Whisper's
30 s window are refused or skipped (never split: a transcript cannot be cut to match a piece of audio without
timestamps), silent clips are skipped and counted, resampled files are counted. Row problems are gathered and
raised together, so a user fixes a manifest in one pass instead of one error per run.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import ConfigError, DataError
from .decode import SAMPLE_RATE, AudioInfo, loudest_frame_db

LONG_CLIP_POLICIES = ("refuse", "skip")
MAX_ERRORS_SHOWN = 20


@dataclass(frozen=True)
class ClipRules:
    """How rows are admitted. `long_clips`: "refuse" makes a clip over `max_seconds` an error naming its row;
    "skip" leaves it out and counts it. Clips whose loudest 25 ms is below `silence_threshold_db` dBFS are
    skipped when `skip_silent`. With `keep_audio=False` examples hold no samples, only a way to decode them again
    (`AudioExample.load()`), so a large set does not sit in memory."""

    sample_rate: int = SAMPLE_RATE
    max_seconds: float = 30.0
    long_clips: str = "refuse"
    skip_silent: bool = True
    silence_threshold_db: float = -60.0
    keep_audio: bool = True

    def __post_init__(self):
        if self.long_clips not in LONG_CLIP_POLICIES:
            raise ConfigError(f"long_clips: expected one of {', '.join(LONG_CLIP_POLICIES)}, "
                              f"got {self.long_clips!r}")
        if not self.max_seconds > 0:
            raise ConfigError(f"max_seconds: must be positive, got {self.max_seconds}")
        if not (isinstance(self.sample_rate, int) and self.sample_rate > 0):
            raise ConfigError(f"sample_rate: must be a positive whole number, got {self.sample_rate!r}")

    @property
    def max_samples(self) -> int:
        return round(self.max_seconds * self.sample_rate)


@dataclass
class AudioExample:
    """One admitted clip: its transcript, length, origin ("train.jsonl:4", "dataset row 3") and samples.

    `audio` is float32 mono at the rules' sample rate, or None when the set was read with `keep_audio=False`;
    `load()` returns the samples either way.
    """

    text: str
    duration_s: float
    origin: str
    path: Path | None = None
    audio: np.ndarray | None = field(default=None, repr=False)
    loader: Callable[[], np.ndarray] | None = field(default=None, repr=False)
    resampled_from: int | None = None   # the source's sample rate when it was not the target rate

    def load(self) -> np.ndarray:
        if self.audio is not None:
            return self.audio
        if self.loader is None:
            raise DataError(f"{self.origin}: this example holds no audio and no way to load it")
        return self.loader()


@dataclass
class AudioStats:
    """Counts from reading a set: rows seen, kept, skipped (and why), resampled among the kept."""

    rows: int = 0
    kept: int = 0
    skipped_silent: int = 0
    skipped_long: int = 0
    resampled: int = 0
    mixed_down: int = 0
    kept_seconds: float = 0.0
    skipped: list[str] = field(default_factory=list)   # "train.jsonl:7: silent (loudest 25 ms at -inf dBFS)"

    def summary(self) -> str:
        return (f"{self.kept} of {self.rows} clips kept ({self.kept_seconds / 60:.1f} min); "
                f"skipped {self.skipped_silent} silent and {self.skipped_long} too long; "
                f"resampled {self.resampled}, mixed to mono {self.mixed_down}")


class RowErrors:
    """Problems found in rows, raised together as one `DataError` that names each row."""

    def __init__(self, source: str):
        self.source = source
        self.messages: list[str] = []

    def add(self, origin: str, message: str):
        # Decoding errors for in-memory audio already start with the row's name.
        self.messages.append(message if message.startswith(f"{origin}: ") else f"{origin}: {message}")

    def raise_if_any(self):
        if not self.messages:
            return
        shown = self.messages[:MAX_ERRORS_SHOWN]
        more = len(self.messages) - len(shown)
        tail = f"\n  ... and {more} more" if more else ""
        count = "1 bad row" if len(self.messages) == 1 else f"{len(self.messages)} bad rows"
        raise DataError(f"{self.source}: {count}:\n  " + "\n  ".join(shown) + tail)


def check_text(value, origin: str, column: str, errors: RowErrors) -> str | None:
    """The transcript, or None after recording why it cannot be used."""
    if value is None:
        errors.add(origin, f"missing column '{column}' (the transcript)")
        return None
    if not isinstance(value, str):
        errors.add(origin, f"column '{column}' must be text, got {type(value).__name__}")
        return None
    if not value.strip():
        errors.add(origin, f"column '{column}' is empty: every clip needs its transcript")
        return None
    return value


def admit(audio: np.ndarray, info: AudioInfo, text: str, origin: str, rules: ClipRules, stats: AudioStats,
          errors: RowErrors, *, path: Path | None = None,
          loader: Callable[[], np.ndarray] | None = None) -> AudioExample | None:
    """Apply the length and silence rules to one decoded clip; update `stats`; the example, or None if left out."""
    if info.num_samples > rules.max_samples:
        if rules.long_clips == "refuse":
            errors.add(origin, f"clip is {info.duration_s:.1f} s, longer than {rules.max_seconds:g} s (Whisper's "
                               "window); cut it, or read with long_clips='skip' to leave such clips out")
        else:
            stats.skipped_long += 1
            stats.skipped.append(f"{origin}: longer than {rules.max_seconds:g} s ({info.duration_s:.1f} s)")
        return None
    if rules.skip_silent:
        level = loudest_frame_db(audio, frame_length=max(1, rules.sample_rate // 40))  # 25 ms
        if level < rules.silence_threshold_db:
            stats.skipped_silent += 1
            stats.skipped.append(f"{origin}: silent (loudest 25 ms at {level:.1f} dBFS)")
            return None
    stats.kept += 1
    stats.kept_seconds += info.duration_s
    if info.resampled:
        stats.resampled += 1
    if info.mixed_down:
        stats.mixed_down += 1
    return AudioExample(text=text, duration_s=info.duration_s, origin=origin, path=path,
                        audio=audio if rules.keep_audio or loader is None else None,
                        loader=loader, resampled_from=info.original_sample_rate if info.resampled else None)
