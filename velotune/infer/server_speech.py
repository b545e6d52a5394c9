"""POST /v1/audio/transcriptions: OpenAI's speech-to-text API over velotune's Whisper models (and adapters).

Request: multipart form with `file` (wav, flac, ogg, opus or mp3) and `model`; `language` (a multilingual
model's language code), `response_format` json (default) or text, `temperature` 0 only (decoding is greedy;
another value is refused rather than ignored). Answer {"text": ...} (or the text alone).

What one request may cost is bounded (SpeechLimits): the upload's bytes (checked from Content-Length before the
body is read, and again as the form is parsed) and the audio's duration (in 30-second windows). Parsing the
audio and decoding run in one worker thread that owns the models, off the event loop.
"""
from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from ..errors import ConfigError, VelotuneError
from .server_schema import APIError, bad_request

log = logging.getLogger("velotune")

RESPONSE_FORMATS = ("json", "text")


@dataclass
class SpeechLimits:
    max_upload_bytes: int = 25 * 1024 * 1024   # OpenAI's limit per file
    max_audio_seconds: float = 600.0


@dataclass
class _Served:
    name: str
    model: object
    tokenizer: object
    model_dir: Path


class SpeechService:
    def __init__(self, limits: SpeechLimits | None = None):
        self.limits = limits or SpeechLimits()
        self.routes: dict[str, _Served] = {}
        self.worker = ThreadPoolExecutor(1, thread_name_prefix="velotune-speech")
        self.stats = {"transcriptions": 0}

    def add_model(self, name: str, model_dir, adapter_dir=None, device=None):
        from ..models.tokenizer import load_tokenizer
        from ..models.whisper import load_whisper
        if name in self.routes:
            raise ConfigError(f"the served model name {name!r} is given twice")
        model = load_whisper(model_dir, device=device)
        if adapter_dir is not None:
            from ..lora import load_adapter
            load_adapter(model, adapter_dir, trainable=False)
        tokenizer = load_tokenizer(Path(model_dir))
        if tokenizer is None:
            raise ConfigError(f"--speech-model {name}: {model_dir} has no tokenizer files")
        self.routes[name] = _Served(name, model.eval(), tokenizer, Path(model_dir))

    def model_ids(self) -> list[str]:
        return list(self.routes)

    def close(self):
        self.worker.shutdown(wait=False, cancel_futures=True)

    async def respond(self, http_request):
        from fastapi.responses import JSONResponse, PlainTextResponse
        declared = http_request.headers.get("content-length")
        limit = self.limits.max_upload_bytes
        if declared is not None and declared.isdigit() and int(declared) > limit + 64 * 1024:
            raise APIError(413, f"the upload ({declared} bytes) is larger than this server's limit of {limit} bytes",
                           "invalid_request_error", "file", "request_too_large")
        media = (http_request.headers.get("content-type") or "").split(";")[0].strip().lower()
        if media != "multipart/form-data":
            raise APIError(415, "send the audio as multipart/form-data with a 'file' field (as OpenAI's clients do)",
                           "invalid_request_error", "file", "unsupported_media_type")
        form = await http_request.form(max_files=1, max_fields=16, max_part_size=64 * 1024)
        try:
            served, options, upload = self._checked(form)
            data = await upload.read(limit + 1)
            if len(data) > limit:
                raise APIError(413, f"the file is larger than this server's limit of {limit} bytes",
                               "invalid_request_error", "file", "request_too_large")
            future = self.worker.submit(self._transcribe, served, data, upload.filename or "audio", options)
            text = await asyncio.wrap_future(future)
        finally:
            await form.close()
        self.stats["transcriptions"] += 1
        if options["response_format"] == "text":
            return PlainTextResponse(text + "\n")
        return JSONResponse({"text": text})

    def _checked(self, form):
        upload = form.get("file")
        if upload is None or isinstance(upload, str):
            raise bad_request("'file' is required: the audio file, as a multipart file field", "file")
        name = form.get("model")
        if name not in self.routes:
            raise APIError(404, f"The model `{name}` does not exist. Speech models: {', '.join(self.routes)}",
                           "invalid_request_error", "model", "model_not_found")
        response_format = form.get("response_format") or "json"
        if response_format not in RESPONSE_FORMATS:
            raise bad_request(f"'response_format' {response_format!r}: this server answers "
                              f"{' or '.join(RESPONSE_FORMATS)}", "response_format")
        temperature = form.get("temperature")
        if temperature not in (None, "", "0", "0.0"):
            raise bad_request("'temperature': decoding is greedy here; only 0 is served", "temperature")
        return self.routes[name], {"language": form.get("language") or None,
                                   "response_format": response_format}, upload

    def _transcribe(self, served: _Served, data: bytes, filename: str, options: dict) -> str:
        from ..audio import decode_audio_bytes
        from .transcribe_cli import transcribe_audio
        try:
            audio, info = decode_audio_bytes(data, source=Path(filename).name)
        except VelotuneError as exc:
            raise bad_request(str(exc), "file") from None
        if info.duration_s > self.limits.max_audio_seconds:
            raise bad_request(f"the audio lasts {info.duration_s:.0f} s; this server transcribes at most "
                              f"{self.limits.max_audio_seconds:.0f} s per request", "file")
        try:
            return transcribe_audio(served.model, served.tokenizer, served.model_dir, audio,
                                    language=options["language"])
        except ConfigError as exc:
            raise bad_request(str(exc), "language") from None


def load_speech_service(specs, limits: SpeechLimits, device=None) -> SpeechService:
    """`specs`: [(kind, "NAME=PATH")] from --speech-model / --speech-adapter (an adapter serves the model given
    before it with the adapter applied, under its own name)."""
    service = SpeechService(limits)
    last = None
    for kind, item in specs:
        name, _, path = item.partition("=")
        if not path:
            name, path = Path(item).name, item
        if kind == "model":
            service.add_model(name, path, device=device)
            last = path
        else:
            if last is None:
                raise ConfigError(f"--speech-adapter {item}: give the --speech-model it adapts before it")
            service.add_model(name, last, adapter_dir=path, device=device)
    return service


__all__ = ["SpeechLimits", "SpeechService", "load_speech_service"]
