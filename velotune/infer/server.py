"""`velotune serve`: an OpenAI-compatible HTTP server (FastAPI + uvicorn) over one base model and its adapters.

    POST /v1/chat/completions   POST /v1/completions   GET /v1/models   GET /health (not OpenAI's)

The request's `model` field picks the base (its served name) or an adapter (the name given with
`--adapter NAME=DIR`). Answers and `stream: true` chunks (server-sent events ending with `data: [DONE]`) have
OpenAI's shape, with `usage` token counts; errors have OpenAI's body {"error": {message, type, param, code}}.

Requests are validated and tokenized on the event loop, then queued; one worker thread owns the model and
decodes (server_queue.py). A client that disconnects cancels its job: a streaming response is cancelled by the
server, a waiting non-streaming one polls for the disconnect.
"""
import asyncio
import hmac
import json
import logging
import time
import uuid

from .server_jobs import JobBuilder
from .server_queue import Scheduler
from .server_schema import APIError, ChatRequest, CompletionRequest, include_usage, parse_body, validate

log = logging.getLogger("velotune")

DISCONNECT_POLL_S = 0.25   # how often a waiting non-streaming request checks that its client is still there
OPEN_PATHS = ("/health",)  # answered without the API key


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
    return APIError(500, f"generation failed: {type(exc).__name__}: {exc}", "server_error", None, "internal_error")


class Server:
    """The app's state: the job builder (names, tokenizer, limits) and the worker that owns the model."""

    def __init__(self, builder: JobBuilder, scheduler: Scheduler, api_key: str | None = None):
        self.builder, self.scheduler, self.api_key = builder, scheduler, api_key
        self.created = int(time.time())

    def authorized(self, header: str | None) -> bool:
        if not self.api_key:
            return True
        expected = f"Bearer {self.api_key}"
        return header is not None and hmac.compare_digest(header.encode(), expected.encode())

    def models(self) -> dict:
        base = self.builder.base_name
        return {"object": "list", "data": [
            {"id": name, "object": "model", "created": self.created, "owned_by": "velotune",
             "root": base, "parent": None if name == base else base} for name in self.builder.model_ids()]}

    async def complete(self, http_request, request_cls, shape):
        request = validate(request_cls, parse_body(await http_request.body()))
        queue, deliver = _channel(asyncio.get_running_loop())
        job = self.builder.build(request, deliver)
        self.scheduler.submit(job)
        head = {"id": shape.id_prefix + uuid.uuid4().hex, "created": int(time.time()), "model": request.model}
        if request.stream:
            from fastapi.responses import StreamingResponse
            return StreamingResponse(self._stream(job, queue, head, shape, include_usage(request)),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        from fastapi.responses import JSONResponse
        collected = await self._collect(http_request, job, queue)
        if collected is None:   # nobody is listening any more
            return JSONResponse(APIError(499, "client closed the request").body(), status_code=499)
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
        return {"status": "ok", "models": self.builder.model_ids(), "queued": self.scheduler.queued(),
                **self.scheduler.stats}


class _RequireApiKey:
    """Answers 401 to requests without the server's key. A plain ASGI middleware: one built on
    BaseHTTPMiddleware would hide a client's disconnect from the handlers (they poll for it)."""

    def __init__(self, app, server: Server, respond):
        self.app, self.server, self.respond = app, server, respond

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"] not in OPEN_PATHS:
            from starlette.datastructures import Headers
            if not self.server.authorized(Headers(scope=scope).get("authorization")):
                response = self.respond(APIError(401, "Incorrect or missing API key: send 'Authorization: Bearer "
                                                      "KEY'.", "invalid_request_error", None, "invalid_api_key"))
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


def create_app(server: Server):
    """The FastAPI app over a Server. (No `from __future__ import annotations` in this file: FastAPI reads the
    handlers' annotations, e.g. `Request`, at run time.)"""
    from contextlib import asynccontextmanager

    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse
    from starlette.exceptions import HTTPException

    @asynccontextmanager
    async def lifespan(app):
        yield
        server.scheduler.close()

    app = FastAPI(title="velotune", lifespan=lifespan)

    def error_response(error: APIError):
        return JSONResponse(error.body(), status_code=error.status)

    app.add_middleware(_RequireApiKey, server=server, respond=error_response)

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

    return app


def build_server(model, tokenizer, base_name: str, adapters: dict | None = None, *, api_key: str | None = None,
                 sampling_config: dict | None = None, max_batch_size: int = 16) -> Server:
    """A Server over a loaded model and tokenizer; `adapters` maps served names to adapter directories."""
    from ..errors import ConfigError
    from .server_adapters import AdapterSet
    adapter_set = AdapterSet(model)
    for name, path in (adapters or {}).items():
        if name == base_name:
            raise ConfigError(f"--adapter {name}=...: {name!r} is already the base model's name")
        adapter_set.add(name, path)
    if sampling_config:   # bad defaults fail now, not on every request
        from .defaults import resolve_sampling
        resolve_sampling(None, sampling_config, model).params()
    builder = JobBuilder(model, tokenizer, base_name, adapter_set.names(), sampling_config)
    scheduler = Scheduler(model, tokenizer, adapter_set, max_batch_size=max_batch_size)
    return Server(builder, scheduler, api_key)


def serve(server: Server, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info"):
    """Runs the server until interrupted."""
    import uvicorn
    log.info("serving %s on http://%s:%d/v1", ", ".join(server.builder.model_ids()), host, port)
    # A bounded graceful shutdown: open connections get a few seconds, then the worker's jobs are cancelled.
    uvicorn.run(create_app(server), host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5)
