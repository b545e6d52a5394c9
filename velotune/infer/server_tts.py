"""POST /v1/audio/speech: OpenAI's text-to-speech API over models trained with objective tts.

Request (JSON) {model, input, voice, response_format "wav", speed 1.0}: `voice` is the speaker name the model
was trained with (as in its rows; "" or a name it never saw still speaks, in no particular voice), `input` the
text. Answer: the WAV bytes (audio/wav). Only WAV is written (no encoder is bundled for mp3/opus/aac) and speed
1.0 only; other values are refused rather than ignored.

What one request may cost is bounded: the input's characters (OpenAI's 4096) and the codes generated
(`max_new_tokens`, about 14 s of audio by default). Generation runs in one worker thread that owns the models.
"""
from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from ..errors import ConfigError
from .server_schema import APIError, bad_request, parse_body

log = logging.getLogger("velotune")

MAX_INPUT_CHARS = 4096


@dataclass
class _Speaker:
    model: object
    tokenizer: object
    tts: dict
    codec: object


class TTSService:
    def __init__(self, max_new_tokens: int = 1200):
        self.max_new_tokens = max_new_tokens
        self.routes: dict[str, _Speaker] = {}
        self.worker = ThreadPoolExecutor(1, thread_name_prefix="velotune-tts")

    def add_model(self, name: str, path, codec=None, device=None):
        from .speak_cli import load_speaker
        if name in self.routes:
            raise ConfigError(f"the served model name {name!r} is given twice")
        model, tokenizer, tts, loaded = load_speaker(path, codec=codec, device=device)
        self.routes[name] = _Speaker(model.eval(), tokenizer, tts, loaded)

    def model_ids(self) -> list[str]:
        return list(self.routes)

    def close(self):
        self.worker.shutdown(wait=False, cancel_futures=True)

    async def respond(self, http_request, max_body_bytes: int):
        from fastapi.responses import Response

        from .server_guards import read_json_body
        raw = await read_json_body(http_request, max_body_bytes)
        if raw is None:
            raise APIError(499, "client closed the request")
        body = parse_body(raw)
        name = body.get("model")
        if name not in self.routes:
            raise APIError(404, f"The model `{name}` does not exist. Speech models: {', '.join(self.routes)}",
                           "invalid_request_error", "model", "model_not_found")
        text = body.get("input")
        if not isinstance(text, str) or not text.strip():
            raise bad_request("'input' is required: the text to speak", "input")
        if len(text) > MAX_INPUT_CHARS:
            raise bad_request(f"'input' holds {len(text)} characters; at most {MAX_INPUT_CHARS}", "input")
        if body.get("response_format", "wav") != "wav":
            raise bad_request(f"'response_format' {body.get('response_format')!r}: this server writes wav only",
                              "response_format")
        if body.get("speed", 1.0) != 1.0:
            raise bad_request("'speed': only 1.0 is served", "speed")
        voice = body.get("voice")
        if voice is not None and not isinstance(voice, str):
            raise bad_request("'voice' must be a string (a speaker name the model was trained with)", "voice")
        speaker = self.routes[name]
        future = self.worker.submit(self._speak, speaker, text, voice or None)
        return Response(await asyncio.wrap_future(future), media_type="audio/wav")

    def _speak(self, speaker: _Speaker, text: str, voice: str | None) -> bytes:
        from .speak_cli import speak, wav_bytes
        speech = speak(speaker.model, speaker.tokenizer, text, speaker.codec, speaker=voice,
                       max_new_tokens=self.max_new_tokens, tokens=speaker.tts["tokens"], temperature=0.0)
        return wav_bytes(speech.waveform, speech.sample_rate)


def load_tts_service(items, codec=None, device=None, max_new_tokens: int = 1200) -> TTSService:
    """`items`: "NAME=PATH" (a tts run's model or adapter directory) from --tts-model."""
    from pathlib import Path
    service = TTSService(max_new_tokens)
    for item in items:
        name, _, path = item.partition("=")
        if not path:
            name, path = Path(item).name, item
        service.add_model(name, path, codec=codec, device=device)
    return service
