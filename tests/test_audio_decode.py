"""Decoding audio files to float32 mono 16 kHz: formats, mixdown, resampling, and a clear error per bad file."""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch

pytest.importorskip("soundfile")
pytest.importorskip("soxr")
import soundfile

from velotune.audio.decode import (
    decode_audio_bytes,
    is_silent,
    load_audio,
    loudest_frame_db,
    prepare_samples,
)
from velotune.errors import DataError


def sine(freq: float, seconds: float, rate: int, amplitude: float = 0.5) -> np.ndarray:
    return (amplitude * np.sin(2 * np.pi * freq * np.arange(round(seconds * rate)) / rate)).astype(np.float32)


def dominant_hz(audio: np.ndarray, rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(audio * np.hanning(audio.size)))
    return float(np.argmax(spectrum)) * rate / audio.size


def test_float_wav_at_16k_decodes_exactly(tmp_path):
    samples = sine(440, 1.0, 16000)
    path = tmp_path / "a.wav"
    soundfile.write(path, samples, 16000, subtype="FLOAT")
    audio, info = load_audio(path)
    assert audio.dtype == np.float32 and audio.ndim == 1 and audio.flags["C_CONTIGUOUS"]
    np.testing.assert_array_equal(audio, samples)
    assert (info.original_sample_rate, info.sample_rate, info.channels) == (16000, 16000, 1)
    assert not info.resampled and not info.mixed_down
    assert info.format == "WAV" and info.num_samples == 16000 and info.duration_s == 1.0


def test_pcm16_wav_and_flac_match_within_quantisation(tmp_path):
    samples = sine(300, 0.5, 16000)
    for name in ("a.wav", "a.flac"):
        soundfile.write(tmp_path / name, samples, 16000, subtype="PCM_16")
        audio, info = load_audio(tmp_path / name)
        assert np.abs(audio - samples).max() < 1 / 32768 + 1e-6, name
    assert info.format == "FLAC"


@pytest.mark.parametrize("name,kwargs", [("a.ogg", {"subtype": "VORBIS"}), ("a.mp3", {}),
                                         ("a.opus", {"format": "OGG", "subtype": "OPUS"})])
def test_lossy_formats_keep_length_and_pitch(tmp_path, name, kwargs):
    rate = 48000 if name.endswith(".opus") else 16000  # Opus only runs at 48 kHz and a few lower rates
    path = tmp_path / name
    try:
        soundfile.write(path, sine(440, 1.0, rate), rate, **kwargs)
    except (soundfile.LibsndfileError, TypeError, ValueError):
        pytest.skip(f"this libsndfile cannot write {name}")
    audio, info = load_audio(path)
    assert info.original_sample_rate == rate and info.sample_rate == 16000
    assert abs(audio.size - 16000) < 0.1 * 16000  # encoders may add a few ms of padding
    assert abs(dominant_hz(audio, 16000) - 440) < 3
    assert 0.3 < np.abs(audio).max() < 0.7


def test_8k_file_is_resampled_and_keeps_its_frequency(tmp_path):
    path = tmp_path / "phone.wav"
    soundfile.write(path, sine(1000, 1.0, 8000), 8000)
    audio, info = load_audio(path)
    assert info.original_sample_rate == 8000 and info.resampled and info.original_frames == 8000
    assert audio.size == 16000 == info.num_samples
    assert abs(dominant_hz(audio, 16000) - 1000) < 2
    # away from the edges, the resampled wave is the 16 kHz sine itself
    np.testing.assert_allclose(audio[2000:-2000], sine(1000, 1.0, 16000)[2000:-2000], atol=5e-3)


def test_44k_stereo_is_mixed_down_then_resampled(tmp_path):
    left = sine(3000, 0.5, 44100)
    stereo = np.stack([left, np.zeros_like(left)], axis=1)
    path = tmp_path / "music.flac"
    soundfile.write(path, stereo, 44100)
    audio, info = load_audio(path)
    assert info.channels == 2 and info.mixed_down and info.resampled and info.original_sample_rate == 44100
    assert audio.size == 8000
    assert abs(dominant_hz(audio, 16000) - 3000) < 3
    assert abs(np.abs(audio[1000:-1000]).max() - 0.25) < 0.01  # the average of the sine and silence


def test_other_target_rate(tmp_path):
    soundfile.write(tmp_path / "a.wav", sine(440, 1.0, 16000), 16000)
    audio, info = load_audio(tmp_path / "a.wav", sample_rate=8000)
    assert audio.size == 8000 and info.sample_rate == 8000 and info.resampled


def test_bad_files_raise_data_errors_naming_the_file(tmp_path):
    good = tmp_path / "good.wav"
    soundfile.write(good, sine(440, 0.5, 16000), 16000)
    no_samples = tmp_path / "no_samples.wav"
    soundfile.write(no_samples, np.zeros(0, np.float32), 16000)
    zero_bytes = tmp_path / "zero_bytes.wav"
    zero_bytes.write_bytes(b"")
    text = tmp_path / "notes.wav"
    text.write_text("this is a text file renamed to .wav\n")
    torn_header = tmp_path / "torn.wav"
    torn_header.write_bytes(good.read_bytes()[:30])
    flac = tmp_path / "good.flac"
    soundfile.write(flac, sine(440, 1.0, 16000), 16000)
    raw = flac.read_bytes()
    garbled = tmp_path / "garbled.flac"
    garbled.write_bytes(raw[:200] + bytes(300) + raw[500:])
    nan_wav = tmp_path / "nan.wav"
    soundfile.write(nan_wav, np.array([0.1, np.nan, 0.2], np.float32), 16000, subtype="FLOAT")
    m4a = tmp_path / "voice.m4a"
    m4a.write_bytes(b"\0\0\0\x20ftypM4A ")
    no_ext = tmp_path / "voice"
    no_ext.write_bytes(good.read_bytes())
    (tmp_path / "folder.wav").mkdir()

    cases = {
        tmp_path / "missing.wav": "not found",
        tmp_path / "folder.wav": "not a file",
        zero_bytes: "empty (0 bytes)",
        no_samples: "no samples",
        text: "not readable as audio",
        torn_header: "not readable as audio",
        garbled: "not readable as audio",
        nan_wav: "NaN",
        m4a: "unsupported audio format ('.m4a')",
        no_ext: "unsupported audio format (no extension)",
    }
    for path, reason in cases.items():
        with pytest.raises(DataError) as caught:
            load_audio(path)
        message = str(caught.value)
        assert message.startswith(str(path)), message
        assert reason in message, message


def test_decode_bytes():
    buffer = io.BytesIO()
    soundfile.write(buffer, sine(440, 0.5, 8000), 8000, format="WAV")
    audio, info = decode_audio_bytes(buffer.getvalue(), source="row 7")
    assert audio.size == 8000 and info.source == "row 7" and info.resampled
    for data, reason in ((b"", "empty"), (b"not audio at all", "not readable as audio")):
        with pytest.raises(DataError, match=f"^row 7: .*{reason}"):
            decode_audio_bytes(data, source="row 7")


def test_prepare_samples_accepts_mono_and_both_stereo_layouts():
    left = sine(440, 0.5, 16000)
    mono, info = prepare_samples(left.astype(np.float64), 16000, source="x")
    assert mono.dtype == np.float32 and not info.resampled and info.format == "array"
    np.testing.assert_array_equal(mono, left)
    for layout in (np.stack([left, -left], axis=1), np.stack([left, -left])):
        mixed, info = prepare_samples(layout, 16000, source="x")
        assert info.channels == 2 and np.abs(mixed).max() == 0.0
    resampled, info = prepare_samples(sine(440, 0.5, 22050), 22050, source="x")
    assert resampled.size == 8000 and info.original_sample_rate == 22050
    for samples, rate, reason in (([], 16000, "no samples"), (np.zeros((2, 2, 2)), 16000, "1-D"),
                                  ([0.1, 0.2], 0, "sampling rate"), (["a"], 16000, "numeric"),
                                  ([0.1], 44100, "too short to resample")):
        with pytest.raises(DataError, match=f"^row 2: .*{reason}"):
            prepare_samples(samples, rate, source="row 2")


def test_is_silent():
    rng = np.random.default_rng(0)
    assert is_silent(np.zeros(16000, np.float32))
    assert is_silent(np.zeros(0, np.float32))
    assert is_silent(rng.standard_normal(16000) * 10 ** (-80 / 20))  # noise at -80 dBFS RMS
    assert not is_silent(rng.standard_normal(16000) * 10 ** (-50 / 20))
    word = np.zeros(16000 * 3, np.float32)
    word[20000:20400] = sine(200, 400 / 16000, 16000, amplitude=0.05)  # 25 ms of speech-level sound
    assert not is_silent(word)
    assert not is_silent(torch.from_numpy(word))
    assert is_silent(word, threshold_db=-20.0)
    assert loudest_frame_db(sine(440, 1.0, 16000, amplitude=1.0)) == pytest.approx(-3.01, abs=0.05)
    # a short tail frame is measured over its own samples, not diluted by padding
    assert loudest_frame_db(np.full(10, 0.5)) == pytest.approx(20 * np.log10(0.5))
