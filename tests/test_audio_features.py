"""Whisper log-mel features: equal to transformers' WhisperFeatureExtractor (80 and 128 mels) within 1e-5."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from velotune.audio.features import (
    N_FRAMES,
    N_SAMPLES,
    log_mel_spectrogram,
    mel_filter_bank,
    num_real_frames,
    pad_or_trim,
)

whisper = pytest.importorskip("transformers.models.whisper.feature_extraction_whisper")

RATE = 16000
TOLERANCE = 1e-5


def clips() -> list[np.ndarray]:
    rng = np.random.default_rng(7)
    t30 = np.arange(30 * RATE) / RATE
    return [
        (0.1 * rng.standard_normal(3 * RATE)).astype(np.float32),                  # noise, 3 s
        (0.5 * np.sin(2 * np.pi * 440 * np.arange(5 * RATE) / RATE)                # two sines, 5 s
         + 0.2 * np.sin(2 * np.pi * 3100 * np.arange(5 * RATE) / RATE)).astype(np.float32),
        rng.standard_normal(100).astype(np.float32),                               # shorter than one window
        (0.3 * np.sin(2 * np.pi * 1234.5 * t30)).astype(np.float32),              # exactly 30 s
        (0.01 * rng.standard_normal(33 * RATE)).astype(np.float32),                # 33 s: truncated
        (1e-4 * rng.standard_normal(2 * RATE)).astype(np.float32),                 # very quiet
    ]


@pytest.fixture(scope="module")
def extractors():
    return {n: whisper.WhisperFeatureExtractor(feature_size=n) for n in (80, 128)}


@pytest.mark.parametrize("n_mels", [80, 128])
def test_filter_bank_equals_transformers(extractors, n_mels):
    ours = mel_filter_bank(n_mels)
    assert ours.shape == (201, n_mels) and ours.dtype == torch.float64
    np.testing.assert_allclose(ours.numpy(), extractors[n_mels].mel_filters, rtol=0, atol=1e-12)


@pytest.mark.parametrize("n_mels", [80, 128])
def test_batched_features_equal_transformers(extractors, n_mels):
    batch = clips()
    expected = extractors[n_mels](batch, sampling_rate=RATE, return_tensors="np")["input_features"]
    ours = log_mel_spectrogram(batch, n_mels=n_mels)
    assert ours.shape == (len(batch), n_mels, N_FRAMES) and ours.dtype == torch.float32
    assert np.abs(ours.numpy() - expected).max() <= TOLERANCE


@pytest.mark.parametrize("n_mels", [80, 128])
def test_single_clips_equal_transformers(extractors, n_mels):
    for i, clip in enumerate(clips()):
        expected = extractors[n_mels](clip, sampling_rate=RATE, return_tensors="np")["input_features"]
        ours = log_mel_spectrogram(clip, n_mels=n_mels)
        assert ours.shape == (1, n_mels, N_FRAMES)
        assert np.abs(ours.numpy() - expected).max() <= TOLERANCE, f"clip {i}"


def test_input_kinds_give_the_same_features():
    batch = clips()[:3]
    reference = log_mel_spectrogram(batch)
    as_tensors = [torch.from_numpy(c) for c in batch]
    as_float64 = [c.astype(np.float64) for c in batch]
    padded = np.stack([np.pad(c, (0, N_SAMPLES - c.size)) for c in batch])
    for other in (as_tensors, as_float64, padded, torch.from_numpy(padded), [c.tolist() for c in batch]):
        assert torch.equal(log_mel_spectrogram(other), reference)
    assert torch.equal(log_mel_spectrogram(batch[2].tolist()), reference[2:3])


def test_truncation_and_per_clip_dynamic_range():
    loud, quiet = clips()[4], clips()[5]
    # a clip over 30 s gives the features of its first 30 s
    assert torch.equal(log_mel_spectrogram(loud), log_mel_spectrogram(loud[:N_SAMPLES]))
    # batching a quiet clip with a loud one does not change the quiet clip's floor
    together = log_mel_spectrogram([loud, quiet])
    assert torch.equal(together[1], log_mel_spectrogram(quiet)[0])
    assert together[1].max() < together[0].max()


def test_pad_or_trim():
    x = torch.arange(5.0)
    assert torch.equal(pad_or_trim(x, 3), torch.tensor([0.0, 1.0, 2.0]))
    assert torch.equal(pad_or_trim(x, 7), torch.tensor([0.0, 1.0, 2.0, 3.0, 4.0, 0.0, 0.0]))
    assert pad_or_trim(x, 5) is x
    assert pad_or_trim(torch.zeros(2, 10), 4).shape == (2, 4)


def test_num_real_frames_matches_the_extractors_attention_mask(extractors):
    rng = np.random.default_rng(1)
    for length in (1, 159, 160, 161, 16000, 479_999, N_SAMPLES, N_SAMPLES + 5000):
        mask = extractors[80](rng.standard_normal(length).astype(np.float32), sampling_rate=RATE,
                              return_attention_mask=True, return_tensors="np")["attention_mask"]
        assert num_real_frames(length) == int(mask.sum()), length
    assert num_real_frames(0) == 0
    with pytest.raises(ValueError):
        num_real_frames(-1)


def test_bad_arguments():
    with pytest.raises(ValueError, match="n_mels"):
        log_mel_spectrogram(np.zeros(10, np.float32), n_mels=64)
    for bad in ([], "audio", np.zeros((2, 2, 2)), [np.zeros((2, 2))]):
        with pytest.raises(ValueError):
            log_mel_spectrogram(bad)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_features_equal_transformers(extractors):
    batch = clips()
    for n_mels in (80, 128):
        expected = extractors[n_mels](batch, sampling_rate=RATE, return_tensors="np")["input_features"]
        ours = log_mel_spectrogram([torch.from_numpy(c).cuda() for c in batch], n_mels=n_mels)
        assert ours.device.type == "cuda"
        assert np.abs(ours.cpu().numpy() - expected).max() <= TOLERANCE
