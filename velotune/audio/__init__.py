"""Speech input for Whisper fine-tuning: decoding audio files, Whisper's log-mel features, and reading manifests
or `datasets` sets of (audio, transcript) rows into checked examples.

Audio decoding needs `soundfile` and `soxr` (the `audio` extra); features need only torch.
"""
from .decode import (
    SUPPORTED_EXTENSIONS,
    AudioInfo,
    decode_audio_bytes,
    is_silent,
    load_audio,
    loudest_frame_db,
    prepare_samples,
)
from .examples import AudioExample, AudioStats, ClipRules
from .features import (
    N_FRAMES,
    N_SAMPLES,
    log_mel_spectrogram,
    mel_filter_bank,
    num_real_frames,
    pad_or_trim,
)
from .hf_dataset import read_audio_dataset
from .manifest import read_manifest

__all__ = [
    "N_FRAMES",
    "N_SAMPLES",
    "SUPPORTED_EXTENSIONS",
    "AudioExample",
    "AudioInfo",
    "AudioStats",
    "ClipRules",
    "decode_audio_bytes",
    "is_silent",
    "load_audio",
    "log_mel_spectrogram",
    "loudest_frame_db",
    "mel_filter_bank",
    "num_real_frames",
    "pad_or_trim",
    "prepare_samples",
    "read_audio_dataset",
    "read_manifest",
]
