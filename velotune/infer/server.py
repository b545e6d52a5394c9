"""`velotune serve`: an OpenAI-compatible HTTP server (FastAPI + uvicorn) over one base model and its adapters.

    POST /v1/chat/completions   POST /v1/completions   POST /v1/embeddings   POST /v1/audio/transcriptions
    POST /v1/audio/speech   GET /v1/models
    GET /health (not OpenAI's)

Chat messages may hold OpenAI's image_url parts for a vision-language model, and video_url parts
(`{"type": "video_url", "video_url": {"url": "data:video/mp4;base64,..."}}`, as vLLM takes them) for one that reads
videos (Qwen2-VL, Qwen2.5-VL): data: URIs only, decoded in memory (server_schema.py bounds how many and how large).

The request's `model` field picks the base (its served name) or an adapter (the name given with
`--adapter NAME=DIR`); for /v1/embeddings, an embedding model or one of its adapters (server_embeddings.py); for
/v1/audio/transcriptions, a Whisper model (server_speech.py); for /v1/audio/speech, a model trained with objective
tts (server_tts.py).
A server may hold a chat model, embedding models, or both.

Answers and `stream: true` chunks (server-sent events ending with `data: [DONE]`) have
OpenAI's shape, with `usage` token counts; errors have OpenAI's body {"error": {message, type, param, code}}.

A request first passes the guards (server_guards.py: API key or Host, JSON content type, body size). Its body
is received on the event loop; parsing, validation, chat template and tokenizing run in a small thread pool,
so that a large request never holds up the others (or /health). The job is then queued; one worker thread
owns the model and decodes (server_queue.py). A client that disconnects cancels its job: a streaming response
is cancelled by the server, a waiting non-streaming one polls for the disconnect.
"""
import asyncio
import json
import logging
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

from ..errors import VelotuneError
from .server_embeddings import EmbeddingService
from .server_guards import DEFAULT_MAX_BODY_BYTES, RequestGuard, read_json_body
from .server_jobs import JobBuilder, chat_templates_for
from .server_queue import Scheduler
from .server_schema import (APIError, ChatRequest, CompletionRequest, check_video_parts, include_usage, parse_body,
                            validate)

log = logging.getLogger("velotune")

DISCONNECT_POLL_S = 0.25   # how often a waiting non-streaming request checks that its client is still there
PREPARE_THREADS = 4        # requests parsed and tokenized at once (each holds at most one body)


class _ChatShape:
    """OpenAI's chat completion objects."""
    id_prefix, object, chunk_object = "chatcmpl-", "chat.completion", "chat.completion.chunk"

    @staticmethod
    def choice(text, finish_reason):
        return {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                "finish_reason": finish_reason}

    @staticmethod
    def delta(text=None, finish_reason=None, first=False):
        delta = {"role": "assistant", "content": ""} if first else ({"content": text} if text is not None else {})
        return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}


class _CompletionShape:
    """OpenAI's (legacy) text completion objects."""
    id_prefix, object, chunk_object = "cmpl-", "text_completion", "text_completion"

    @staticmethod
    def choice(text, finish_reason):
        return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}

    @staticmethod
    def delta(text=None, finish_reason=None, first=False):
        if first:   # no opening chunk: there is no role to announce
            return None
        return {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish_reason}


def usage(finish) -> dict:
    return {"prompt_tokens": finish.prompt_tokens, "completion_tokens": finish.completion_tokens,
            "total_tokens": finish.prompt_tokens + finish.completion_tokens}


def _sse(payload) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


def _channel(loop):
    """A queue the worker thread fills (through the event loop) and a request handler awaits."""
    queue: asyncio.Queue = asyncio.Queue()

    def deliver(item):
        try:
            loop.call_soon_threadsafe(queue.put_nowait, item)
        except RuntimeError:   # the event loop is closed: the server is shutting down
            pass
    return queue, deliver


def _worker_error(exc) -> APIError:
    if isinstance(exc, VelotuneError):   # a failure its message explains (e.g. non-finite logits)
        return APIError(500, str(exc), "server_error", None, "generation_failed")
    return APIError(500, f"generation failed: {type(exc).__name__}: {exc}", "server_error", None, "internal_error")


def _client_gone():
    from fastapi.responses import JSONResponse
    return JSONResponse(APIError(499, "client closed the request").body(), status_code=499)


class Server:
    """The app's state: the job builder (names, tokenizer, limits), the threads that prepare requests, the
    worker that owns the model, and the embedding models. Without a chat model, `builder` and `scheduler` are
    None and chat requests are answered with 404 (or 400 naming /v1/embeddings)."""

    def __init__(self, builder: JobBuilder | None, scheduler: Scheduler | None, api_key: str | None = None,
                 max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, embeddings: EmbeddingService | None = None,
                 speech=None, tts=None):
        self.builder, self.scheduler, self.api_key = builder, scheduler, api_key
        self.embeddings = embeddings or EmbeddingService()
        self.speech = speech   # server_speech.SpeechService, or None
        self.tts = tts         # server_tts.TTSService, or None
        self.max_body_bytes = max_body_bytes
        self.preparing = ThreadPoolExecutor(PREPARE_THREADS, thread_name_prefix="velotune-prepare")
        self.created = int(time.time())

    def model_ids(self) -> list[str]:
        return ((self.builder.model_ids() if self.builder else []) + self.embeddings.model_ids()
                + (self.speech.model_ids() if self.speech else []) + (self.tts.model_ids() if self.tts else []))

    def models(self) -> dict:
        chat = self.builder.model_ids() if self.builder else []
        roots = {name: self.builder.base_name for name in chat}
        roots.update({name: self.embeddings.root_of(name) for name in self.embeddings.model_ids()})
        roots.update({name: name for name in (self.speech.model_ids() if self.speech else [])})
        roots.update({name: name for name in (self.tts.model_ids() if self.tts else [])})
        return {"object": "list", "data": [
            {"id": name, "object": "model", "created": self.created, "owned_by": "velotune",
             "root": root, "parent": None if name == root else root} for name, root in roots.items()]}

    def prepare(self, raw: bytes, request_cls, deliver):
        """The validated request and its job (runs in the `preparing` pool: it takes time with a large body)."""
        request = validate(request_cls, parse_body(raw))
        if self.builder is None or request.model in self.embeddings.routes:
            raise self.embeddings.not_for_chat(request.model)
        if isinstance(request, ChatRequest) and not getattr(self.builder.model, "takes_videos", False):
            from .vision_prompt import is_vision_model
            check_video_parts(request, "images" if is_vision_model(self.builder.model) else "text")
        return request, self.builder.build(request, deliver)

    async def complete(self, http_request, request_cls, shape):
        raw = await read_json_body(http_request, self.max_body_bytes)
        if raw is None:
            return _client_gone()
        return await self.answer(http_request, raw, request_cls, shape)

    async def answer(self, http_request, raw: bytes, request_cls, shape):
        """The answer to a request body already received (the Studio builds its bodies itself): a JSON response,
        or a streaming one for `stream: true`."""
        loop = asyncio.get_running_loop()
        queue, deliver = _channel(loop)
        request, job = await loop.run_in_executor(self.preparing, self.prepare, raw, request_cls, deliver)
        self.scheduler.submit(job)
        head = {"id": shape.id_prefix + uuid.uuid4().hex, "created": int(time.time()), "model": request.model}
        if request.stream:
            from fastapi.responses import StreamingResponse
            return StreamingResponse(self._stream(job, queue, head, shape, include_usage(request)),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        from fastapi.responses import JSONResponse
        collected = await self._collect(http_request, job, queue)
        if collected is None:   # nobody is listening any more
            return _client_gone()
        text, finish = collected
        return JSONResponse({**head, "object": shape.object, "choices": [shape.choice(text, finish.reason)],
                             "usage": usage(finish)})

    async def _collect(self, http_request, job, queue):
        """The whole text, or None when the client disconnected first (its job is then cancelled)."""
        pieces, finished = [], False
        next_check = time.monotonic() + DISCONNECT_POLL_S
        try:
            while True:
                try:
                    kind, value = await asyncio.wait_for(queue.get(), timeout=DISCONNECT_POLL_S)
                except asyncio.TimeoutError:
                    kind = value = None
                if time.monotonic() >= next_check:   # text may flow without pause: check by the clock
                    if await http_request.is_disconnected():
                        return None
                    next_check = time.monotonic() + DISCONNECT_POLL_S
                if kind == "text":
                    pieces.append(value)
                elif kind == "done":
                    finished = True
                    return "".join(pieces), value
                elif kind == "error":
                    finished = True
                    raise _worker_error(value)
        finally:
            if not finished:
                job.cancel()

    async def _stream(self, job, queue, head, shape, with_usage):
        chunk = {**head, "object": shape.chunk_object}
        finished = False
        try:
            opening = shape.delta(first=True)
            if opening is not None:
                yield _sse({**chunk, "choices": [opening]})
            while True:
                kind, value = await queue.get()
                if kind == "text":
                    yield _sse({**chunk, "choices": [shape.delta(value)]})
                    continue
                finished = True
                if kind == "done":
                    yield _sse({**chunk, "choices": [shape.delta(None, value.reason)]})
                    if with_usage:
                        yield _sse({**chunk, "choices": [], "usage": usage(value)})
                else:
                    yield _sse(_worker_error(value).body())
                yield "data: [DONE]\n\n"
                return
        finally:   # the client went away (the response was cancelled) before the end: stop the job
            if not finished:
                job.cancel()

    def health(self) -> dict:
        """What a health check needs, open to anyone: no model names or paths (those are behind the key)."""
        chat = {"queued": self.scheduler.queued(), **self.scheduler.stats} if self.scheduler else {}
        return {"status": "ok", "model_count": len(self.model_ids()), **chat, **self.embeddings.stats}

    def close(self):
        self.preparing.shutdown(wait=False, cancel_futures=True)
        self.embeddings.close()
        for service in (self.speech, self.tts):
            if service is not None:
                service.close()
        if self.scheduler is not None:
            self.scheduler.close()


def create_app(server: Server, allowed_hosts: frozenset | None = None):
    """The FastAPI app over a Server; `allowed_hosts`: the Host values answered without an API key (None: any;
    see server_guards.allowed_hosts). (No `from __future__ import annotations` in this file: FastAPI reads the
    handlers' annotations, e.g. `Request`, at run time.)"""
    from contextlib import asynccontextmanager

    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse
    from starlette.exceptions import HTTPException

    @asynccontextmanager
    async def lifespan(app):
        yield
        server.close()

    app = FastAPI(title="velotune", lifespan=lifespan)

    def error_response(error: APIError):
        return JSONResponse(error.body(), status_code=error.status)

    app.add_middleware(RequestGuard, api_key=server.api_key, allowed_hosts=allowed_hosts, respond=error_response)

    @app.exception_handler(APIError)
    async def api_error(request, exc: APIError):
        return error_response(exc)

    @app.exception_handler(HTTPException)
    async def http_error(request, exc: HTTPException):
        kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
        return error_response(APIError(exc.status_code, str(exc.detail), kind))

    @app.exception_handler(Exception)
    async def unexpected(request, exc: Exception):
        log.exception("request failed")
        return error_response(_worker_error(exc))

    @app.get("/v1/models")
    async def models():
        return server.models()

    @app.get("/health")
    async def health():
        return server.health()

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await server.complete(request, ChatRequest, _ChatShape)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await server.complete(request, CompletionRequest, _CompletionShape)

    @app.post("/v1/embeddings")
    async def embeddings(request: Request):
        return await server.embeddings.respond(request, server.max_body_bytes, server.preparing)

    @app.post("/v1/audio/transcriptions")
    async def transcriptions(request: Request):
        if server.speech is None or not server.speech.model_ids():
            raise APIError(404, "this server has no speech model (serve one with --speech-model NAME=PATH)",
                           "invalid_request_error", "model", "model_not_found")
        return await server.speech.respond(request)

    @app.post("/v1/audio/speech")
    async def speech(request: Request):
        if server.tts is None or not server.tts.model_ids():
            raise APIError(404, "this server has no text-to-speech model (serve one with --tts-model NAME=PATH)",
                           "invalid_request_error", "model", "model_not_found")
        return await server.tts.respond(request, server.max_body_bytes)

    return app


def build_server(model, tokenizer, base_name: str | None, adapters: dict | None = None, *,
                 api_key: str | None = None, sampling_config: dict | None = None, max_batch_size: int = 16,
                 max_body_bytes: int | None = None, max_tokens_limit: int | None = None,
                 chat_template: str | None = None, embeddings: EmbeddingService | None = None,
                 speech=None, tts=None) -> Server:
    """A Server over a loaded model and tokenizer; `adapters` maps served names to adapter directories.
    `chat_template` (a name, a file or Jinja text) renders the chat requests of every served model; without
    it each adapter uses the template saved with it, else the base's (see server_jobs.chat_templates_for).
    `embeddings`: the embedding models served beside it; with them, `model` may be None (no chat model)."""
    from ..errors import ConfigError
    from ..models.interface import require_model
    from .server_adapters import AdapterSet
    embeddings = embeddings or EmbeddingService()
    if model is None:
        if not embeddings.model_ids() and not (speech and speech.model_ids()) and not (tts and tts.model_ids()):
            raise ConfigError("nothing to serve: give a chat model, embedding models or speech models")
        return Server(None, None, api_key, max_body_bytes or DEFAULT_MAX_BODY_BYTES, embeddings, speech, tts)
    model = require_model(model, "serving")
    adapter_set = AdapterSet(model)
    for name, path in (adapters or {}).items():
        if name == base_name:
            raise ConfigError(f"--adapter {name}=...: {name!r} is already the base model's name")
        adapter_set.add(name, path)
    if sampling_config:   # bad defaults fail now, not on every request
        from .defaults import resolve_sampling
        resolve_sampling(None, sampling_config, model).params()
    templates = chat_templates_for(tokenizer, adapters or {}, chat_template)
    builder = JobBuilder(model, tokenizer, base_name, adapter_set.names(), sampling_config,
                         max_tokens_limit=max_tokens_limit, chat_templates=templates)
    embeddings.serve_beside(builder.model_ids())   # one namespace: a name may not be both
    scheduler = Scheduler(model, tokenizer, adapter_set, max_batch_size=max_batch_size)
    return Server(builder, scheduler, api_key, max_body_bytes or DEFAULT_MAX_BODY_BYTES, embeddings, speech, tts)


def serve(server: Server, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info", allow_hosts=()):
    """Runs the server until interrupted; without an API key it answers only requests addressed to this host
    (the local names, `host`, and `allow_hosts`)."""
    import uvicorn

    from .server_guards import ANY_ADDRESS, allowed_hosts
    hosts = None if server.api_key else allowed_hosts(host, port, allow_hosts)
    if hosts is not None and host in ANY_ADDRESS and not allow_hosts:
        log.warning("listening on every address without --api-key: only requests addressed to this machine's "
                    "local names are answered; add the names clients use with --allow-host NAME")
    log.info("serving %s on http://%s:%d/v1", ", ".join(server.model_ids()), host, port)
    # A bounded graceful shutdown: open connections get a few seconds, then the worker's jobs are cancelled.
    uvicorn.run(create_app(server, hosts), host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5)
