"""Whisper's log-mel spectrogram input, computed in torch for a batch of clips on the CPU or a GPU.

The recipe is the one Whisper was trained on, so features must match it closely (to about 1e-5): each clip is cut
or zero-padded to 30 s (480,000 samples at 16 kHz); a centred STFT (Hann window of 400, hop 160, reflect padding)
gives 3001 frames, of which the last is dropped; power spectra go through a Slaney-scale, Slaney-normalised mel
filter bank (80 or 128 filters, 0-8 kHz); then log10 of the mel power floored at 1e-10, a floor at 8 below the
clip's own maximum (80 dB of dynamic range), and the (x + 4) / 4 scaling.
"""
from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import numpy as np
import torch

SAMPLE_RATE = 16000
N_FFT = 400
HOP_LENGTH = 160
CHUNK_SECONDS = 30
N_SAMPLES = CHUNK_SECONDS * SAMPLE_RATE        # 480,000 samples in one Whisper input window
N_FRAMES = N_SAMPLES // HOP_LENGTH             # 3,000 feature frames in one window
MEL_SIZES = (80, 128)                          # Whisper v1/v2 use 80 filters; large-v3 and turbo use 128


def _hz_to_slaney_mel(hz: np.ndarray) -> np.ndarray:
    # The Slaney scale is linear (3 mels per 200 Hz) up to 1 kHz and logarithmic above it.
    hz = np.asarray(hz, dtype=np.float64)
    linear = 3.0 * hz / 200.0
    log_part = 15.0 + np.log(np.maximum(hz, 1e-300) / 1000.0) * (27.0 / np.log(6.4))
    return np.where(hz >= 1000.0, log_part, linear)


def _slaney_mel_to_hz(mel: np.ndarray) -> np.ndarray:
    mel = np.asarray(mel, dtype=np.float64)
    linear = 200.0 * mel / 3.0
    log_part = 1000.0 * np.exp((mel - 15.0) * (np.log(6.4) / 27.0))
    return np.where(mel >= 15.0, log_part, linear)


@functools.lru_cache(maxsize=8)
def _mel_filter_bank_array(n_mels: int, sample_rate: int, n_fft: int, f_min: float, f_max: float) -> np.ndarray:
    n_bins = n_fft // 2 + 1
    bin_hz = np.linspace(0.0, sample_rate // 2, n_bins)
    edges_mel = np.linspace(_hz_to_slaney_mel(f_min), _hz_to_slaney_mel(f_max), n_mels + 2)
    edges_hz = _slaney_mel_to_hz(edges_mel)
    lower, centre, upper = edges_hz[:-2], edges_hz[1:-1], edges_hz[2:]
    # Each filter is a triangle rising from its lower edge to its centre and falling to its upper edge.
    rising = (bin_hz[:, None] - lower[None, :]) / (centre - lower)[None, :]
    falling = (upper[None, :] - bin_hz[:, None]) / (upper - centre)[None, :]
    weights = np.maximum(0.0, np.minimum(rising, falling))
    # Slaney normalisation gives every filter the same area, so wide high-frequency bands are not louder.
    weights *= (2.0 / (upper - lower))[None, :]
    weights.setflags(write=False)
    return weights


def mel_filter_bank(n_mels: int = 80, *, sample_rate: int = SAMPLE_RATE, n_fft: int = N_FFT,
                    f_min: float = 0.0, f_max: float | None = None) -> torch.Tensor:
    """The Slaney-scale, Slaney-normalised mel filter bank, float64, shape (n_fft // 2 + 1, n_mels).

    `f_max` defaults to half the sample rate (8 kHz for Whisper).
    """
    if n_mels < 1:
        raise ValueError(f"n_mels must be positive, got {n_mels}")
    top = sample_rate / 2 if f_max is None else float(f_max)
    if not 0.0 <= f_min < top:
        raise ValueError(f"need 0 <= f_min < f_max, got f_min={f_min}, f_max={top}")
    return torch.from_numpy(_mel_filter_bank_array(n_mels, sample_rate, n_fft, float(f_min), top).copy())


def pad_or_trim(audio: torch.Tensor, length: int = N_SAMPLES) -> torch.Tensor:
    """Cut the last dimension of `audio` to `length` samples, or zero-pad it on the right to `length`."""
    size = audio.shape[-1]
    if size > length:
        return audio[..., :length]
    if size < length:
        return torch.nn.functional.pad(audio, (0, length - size))
    return audio


def num_real_frames(num_samples: int) -> int:
    """How many of the 3000 feature frames start inside the clip's real audio (the rest see only padding).

    This is the count of ones in the attention mask Hugging Face's Whisper feature extractor returns: one frame per
    started hop of 160 samples, at most 3000.
    """
    if num_samples < 0:
        raise ValueError(f"num_samples must be >= 0, got {num_samples}")
    return min(math.ceil(num_samples / HOP_LENGTH), N_FRAMES)


def _as_batch(audio, device: torch.device | str | None) -> torch.Tensor:
    """(batch, N_SAMPLES) float32 on `device` from one clip, a 2-D batch, or a sequence of clips of any lengths."""
    if isinstance(audio, (torch.Tensor, np.ndarray)) and audio.ndim in (1, 2):
        clips = [audio] if audio.ndim == 1 else list(audio)
    elif isinstance(audio, Sequence) and not isinstance(audio, (str, bytes)) and len(audio) > 0 \
            and all(isinstance(c, (torch.Tensor, np.ndarray, Sequence)) for c in audio):
        clips = list(audio)
    elif isinstance(audio, Sequence) and len(audio) > 0 and all(isinstance(c, (int, float)) for c in audio):
        clips = [audio]  # one clip given as a plain list of numbers
    else:
        raise ValueError("audio must be a 1-D clip, a 2-D (batch, samples) array or tensor, or a non-empty "
                         "list of 1-D clips")
    if device is None:
        device = clips[0].device if isinstance(clips[0], torch.Tensor) else "cpu"
    rows = []
    for i, clip in enumerate(clips):
        tensor = clip if isinstance(clip, torch.Tensor) else torch.as_tensor(np.asarray(clip, dtype=np.float32))
        if tensor.ndim != 1:
            raise ValueError(f"audio clip {i}: expected 1-D mono samples, got shape {tuple(tensor.shape)}")
        rows.append(pad_or_trim(tensor.to(device=device, dtype=torch.float32)))
    return torch.stack(rows)


def log_mel_spectrogram(audio, *, n_mels: int = 80, device: torch.device | str | None = None) -> torch.Tensor:
    """Whisper input features, float32, shape (batch, n_mels, 3000), on `device`.

    `audio`: 16 kHz mono samples as one 1-D clip (a batch of one), a 2-D (batch, samples) array or tensor, or a
    list of 1-D clips of any lengths (numpy arrays, tensors or lists). Each clip is cut or zero-padded to 30 s.
    `device` defaults to the clips' own device (CPU for numpy input).
    """
    if n_mels not in MEL_SIZES:
        raise ValueError(f"n_mels must be one of {MEL_SIZES} (Whisper's filter bank sizes), got {n_mels}")
    waves = _as_batch(audio, device)
    window = torch.hann_window(N_FFT, device=waves.device)
    spectrum = torch.stft(waves, N_FFT, HOP_LENGTH, window=window, center=True, pad_mode="reflect",
                          return_complex=True)
    # The centred STFT of 480,000 samples has 3001 frames; Whisper drops the last, which is half padding.
    power = (spectrum[..., :-1].abs() ** 2).contiguous()
    filters = mel_filter_bank(n_mels).to(device=waves.device, dtype=torch.float32)
    mel = filters.T @ power
    log_mel = torch.clamp(mel, min=1e-10).log10()
    # The dynamic-range floor is per clip: a quiet clip in a batch must not be floored by a loud one.
    peak = log_mel.amax(dim=(1, 2), keepdim=True)
    log_mel = torch.maximum(log_mel, peak - 8.0)
    return (log_mel + 4.0) / 4.0
