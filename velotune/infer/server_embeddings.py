"""POST /v1/embeddings: OpenAI's embeddings API over sentence-transformers models and their LoRA adapters.

Request {model, input: str | [str] | [int] | [[int]], encoding_format "float" | "base64", dimensions, user};
velotune's extra `prompt_name` picks one of the model's named prompts (query/document prefixes); without it
the model's default prompt applies, as in sentence-transformers. Token-id inputs are the model's own token ids
(not OpenAI's tiktoken ids); they are decoded and embedded as that text. `dimensions` keeps the first N values
and normalises them again (Matryoshka models). Answer {"object": "list", "data": [{"object": "embedding",
"index", "embedding"}], "model", "usage"}, base64 being the little-endian float32 bytes, as OpenAI's.

What one request may cost is bounded (EmbeddingLimits): the number of inputs, the tokens of one input (over
the cap: a 400 naming the input; between the model's max_seq_length and the cap: truncated, as
sentence-transformers does, counted in the X-Velotune-Truncated-Inputs header and the log), and the tokens of
the whole request after truncation. Parsing and validation run in the server's prepare threads; counting
tokens and encoding run in one worker thread that owns every embedding model and its tokenizer (a tokenizer
changes its truncation settings per call, so it is never used from two threads at once), off the event loop.
"""
from __future__ import annotations

import asyncio
import base64
import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr, ValidationError

from ..errors import ConfigError
from .server_guards import read_json_body
from .server_schema import APIError, bad_request, parse_body

log = logging.getLogger("velotune")

DISCONNECT_POLL_S = 0.25
TRUNCATED_HEADER = "X-Velotune-Truncated-Inputs"


@dataclass
class EmbeddingLimits:
    max_inputs: int = 2048               # OpenAI's limit per request
    max_input_tokens: int | None = None  # None: the larger of 8192 (OpenAI's) and the model's max_seq_length
    max_request_tokens: int = 300_000    # OpenAI's, summed over the inputs after truncation
    batch_size: int = 32                 # texts encoded together


class EmbeddingRequest(BaseModel):
    model_config = ConfigDict(extra="allow")   # clients send fields we do not use
    model: StrictStr
    input: StrictStr | list[StrictStr] | list[StrictInt] | list[list[StrictInt]]
    encoding_format: Literal["float", "base64"] | None = None
    dimensions: Annotated[StrictInt, Field(ge=1)] | None = None
    user: StrictStr | None = None
    prompt_name: StrictStr | None = None


@dataclass
class _Served:
    """One embedding model: the encoder, its tokenizer and its adapters (none merged)."""
    name: str
    encoder: object
    tokenizer: object
    adapters: object                      # an AdapterSet over the encoder
    vocab_size: int                       # read once: the tokenizer is the worker's (see the module's note)

    def input_token_cap(self, limits: EmbeddingLimits) -> int:
        return limits.max_input_tokens or max(8192, self.encoder.max_seq_length or 0)


@dataclass(eq=False)   # hashed by identity: the service keeps the awaited jobs in a set
class _Job:
    served: _Served
    adapter: str | None
    request: EmbeddingRequest
    texts: list
    cancelled: threading.Event = field(default_factory=threading.Event)


class _Cancelled(Exception):
    """Raised from encode's progress callback when the client has gone: the rest of the batches are skipped."""


def _validate(data: dict) -> EmbeddingRequest:
    try:
        return EmbeddingRequest.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        names = set(EmbeddingRequest.model_fields)
        param = ".".join(str(p) for p in first["loc"] if isinstance(p, int) or p in names) or None
        raise bad_request(f"'{param}': {first['msg']}" if param else first["msg"], param=param) from None


class EmbeddingService:
    """The served embedding models by name (bases and adapters) and the worker thread that runs them."""

    def __init__(self, limits: EmbeddingLimits | None = None):
        self.limits = limits or EmbeddingLimits()
        self.routes: dict[str, tuple[_Served, str | None]] = {}   # served name -> (model, adapter or None)
        self.chat_names: list[str] = []                           # for errors naming the other endpoint
        self.worker = ThreadPoolExecutor(1, thread_name_prefix="velotune-embeddings")
        self.stats = {"embedding_requests": 0, "embedded_inputs": 0}
        self.waiting: set = set()   # jobs whose answer is awaited: stopped when the server shuts down

    # ---- setup ----------------------------------------------------------------------------------------------
    def add_model(self, name: str, encoder, tokenizer) -> None:
        from ..embeddings.model import SentenceEncoder
        from .server_adapters import AdapterSet
        if not isinstance(encoder, SentenceEncoder):
            raise ConfigError(f"embedding model {name!r}: {type(encoder).__name__} is not a SentenceEncoder")
        self._check_free(name)
        self.routes[name] = (_Served(name, encoder.eval(), tokenizer, AdapterSet(encoder), len(tokenizer)), None)

    def add_adapter(self, base: str, name: str, adapter_dir) -> None:
        served, adapter = self.routes[base]
        if adapter is not None:
            raise ConfigError(f"embedding adapter {name!r}: {base!r} is itself an adapter")
        self._check_free(name)
        served.adapters.add(name, adapter_dir)
        self.routes[name] = (served, name)

    def serve_beside(self, chat_names) -> None:
        """Records the chat models' names (one namespace for the `model` field of every endpoint)."""
        clash = [name for name in chat_names if name in self.routes]
        if clash:
            raise ConfigError(f"the served model name {clash[0]!r} is both a chat and an embedding model's")
        self.chat_names = list(chat_names)

    def _check_free(self, name: str):
        if name in self.routes or name in self.chat_names:
            raise ConfigError(f"the served model name {name!r} is given twice")

    def model_ids(self) -> list[str]:
        return list(self.routes)

    def root_of(self, name: str) -> str:
        return self.routes[name][0].name

    def close(self):
        for job in list(self.waiting):   # an encode under way stops at its next batch
            job.cancelled.set()
        self.worker.shutdown(wait=False, cancel_futures=True)

    # ---- names across endpoints -----------------------------------------------------------------------------
    def route(self, model_id: str):
        if model_id in self.routes:
            return self.routes[model_id]
        if model_id in self.chat_names:
            raise bad_request(f"`{model_id}` is a chat model; /v1/embeddings needs an embedding model (served: "
                              f"{', '.join(self.routes) or 'none'})", "model", "model_not_supported")
        raise _not_found(model_id, self.chat_names + self.model_ids())

    def not_for_chat(self, model_id: str) -> APIError:
        """The error of a chat or completion request naming `model_id` when no chat model serves it."""
        if model_id in self.routes:
            return bad_request(f"`{model_id}` is an embedding model: call /v1/embeddings (chat models served: "
                               f"{', '.join(self.chat_names) or 'none'})", "model", "model_not_supported")
        return _not_found(model_id, self.chat_names + self.model_ids())

    # ---- a request ------------------------------------------------------------------------------------------
    async def respond(self, http_request, max_body_bytes: int, preparing):
        """The HTTP answer to one POST /v1/embeddings."""
        from fastapi.responses import JSONResponse
        raw = await read_json_body(http_request, max_body_bytes)
        if raw is None:
            return JSONResponse(APIError(499, "client closed the request").body(), status_code=499)
        loop = asyncio.get_running_loop()
        job = await loop.run_in_executor(preparing, self.prepare, raw)
        future = asyncio.wrap_future(self.worker.submit(self.run, job))
        self.waiting.add(job)
        try:
            while not future.done():   # a long batch: stop it if nobody waits for the answer any more
                await asyncio.wait({future}, timeout=DISCONNECT_POLL_S)
                if not future.done() and await http_request.is_disconnected():
                    job.cancelled.set()
                    future.add_done_callback(lambda f: f.cancelled() or f.exception())   # nobody reads it now
                    return JSONResponse(APIError(499, "client closed the request").body(), status_code=499)
        finally:
            self.waiting.discard(job)
        body, truncated = future.result()
        return JSONResponse(body, headers={TRUNCATED_HEADER: str(truncated)})

    def prepare(self, raw: bytes) -> _Job:
        """The validated request as a job (prepare threads): everything checked that needs no tokenizer."""
        request = _validate(parse_body(raw))
        served, adapter = self.route(request.model)
        items = [request.input] if isinstance(request.input, str) else request.input
        if items and isinstance(items[0], int):   # one input given as token ids
            items = [items]
        if not items:
            raise bad_request("'input' is empty: give a text or a list of texts", "input")
        if len(items) > self.limits.max_inputs:
            raise bad_request(f"'input' has {len(items)} items; this server takes at most {self.limits.max_inputs} "
                              "per request", "input", "too_many_inputs")
        if request.dimensions is not None and request.dimensions > served.encoder.dimension:
            raise bad_request(f"'dimensions' {request.dimensions} is more than the model's {served.encoder.dimension}",
                              "dimensions")
        if request.prompt_name is not None and request.prompt_name not in served.encoder.settings.prompts:
            known = ", ".join(sorted(served.encoder.settings.prompts)) or "none"
            raise bad_request(f"'prompt_name' {request.prompt_name!r} is not one of the model's prompts ({known})",
                              "prompt_name")
        cap, vocab = served.input_token_cap(self.limits), served.vocab_size
        for i, item in enumerate(items):
            if not item:
                raise bad_request(f"input[{i}] is empty", f"input.{i}")
            if isinstance(item, list):
                if len(item) > cap:
                    raise _too_long(i, len(item), cap)
                bad = next((t for t in item if not 0 <= t < vocab), None)
                if bad is not None:
                    raise bad_request(f"input[{i}]: token id {bad} is outside the model's vocabulary (0..{vocab - 1})",
                                      f"input.{i}")
        return _Job(served, adapter, request, items)

    def run(self, job: _Job):
        """(response body, inputs truncated): tokens counted and checked, then the embeddings (worker thread)."""
        served, request = job.served, job.request
        encoder, tokenizer = served.encoder, served.tokenizer
        if job.cancelled.is_set():
            raise _Cancelled()
        texts = [tokenizer.decode(item, skip_special_tokens=True) if isinstance(item, list) else item
                 for item in job.texts]
        prefix = encoder.prompt_text(None, request.prompt_name)
        lengths = encoder.token_lengths(tokenizer, texts, prefix)
        cap, limit = served.input_token_cap(self.limits), encoder.max_seq_length or max(lengths)
        over = next((i for i, n in enumerate(lengths) if n > cap), None)
        if over is not None:
            raise _too_long(over, lengths[over], cap)
        used = sum(min(n, limit) for n in lengths)
        if used > self.limits.max_request_tokens:
            raise bad_request(f"the inputs take {used} tokens together; this server takes at most "
                              f"{self.limits.max_request_tokens} per request", "input", "too_many_tokens")
        truncated = sum(n > limit for n in lengths)
        if truncated:
            log.info("embeddings for %s: %d of %d input(s) longer than %d tokens were truncated", request.model,
                     truncated, len(texts), limit)

        def progress(done, total):
            if job.cancelled.is_set():
                raise _Cancelled()
        served.adapters.activate(job.adapter)
        vectors = encoder.encode(tokenizer, texts, batch_size=self.limits.batch_size, prompt=prefix,
                                 progress=progress)
        self.stats["embedding_requests"] += 1
        self.stats["embedded_inputs"] += len(texts)
        return _body(request, vectors, used), truncated


def _body(request: EmbeddingRequest, vectors, tokens: int) -> dict:
    import torch
    if request.dimensions is not None:   # Matryoshka: the leading values, normalised again
        vectors = torch.nn.functional.normalize(vectors[:, :request.dimensions], p=2, dim=-1)
    if request.encoding_format == "base64":
        rows = [base64.b64encode(v.numpy().astype("<f4").tobytes()).decode("ascii") for v in vectors]
    else:
        rows = vectors.tolist()
    return {"object": "list", "model": request.model, "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
            "data": [{"object": "embedding", "index": i, "embedding": row} for i, row in enumerate(rows)]}


def _too_long(index: int, tokens: int, cap: int) -> APIError:
    return bad_request(f"input[{index}] is {tokens} tokens long; this server takes at most {cap} tokens per input "
                       "(inputs longer than the model's max_seq_length, up to that, are truncated)",
                       f"input.{index}", "context_length_exceeded")


def _not_found(model_id: str, served: list) -> APIError:
    return APIError(404, f"The model `{model_id}` does not exist. Served models: {', '.join(served)}",
                    "invalid_request_error", "model", "model_not_found")


# ---- the command line's embedding models -----------------------------------------------------------------------

def parse_embedding_options(items, taken=()) -> list[tuple[str, str, dict]]:
    """[("model", "NAME=PATH" | "PATH"), ("adapter", "NAME=DIR" | "DIR"), ...] in command-line order ->
    [(name, path, {adapter name: dir})]: each adapter belongs to the --embedding-model given before it. Names
    are unique, and not among `taken` (the chat models'), so a clash is refused before anything loads."""
    models, names = [], set(taken)
    for kind, item in items:
        name, sep, path = item.partition("=")
        if not sep:
            from pathlib import Path
            name, path = (item if kind == "model" else Path(item).name), item
        if not name or not path:
            raise ConfigError(f"--embedding-{kind} {item!r}: expected NAME=PATH")
        if name in names:
            raise ConfigError(f"--embedding-{kind} {item!r}: the served model name {name!r} is given twice")
        names.add(name)
        if kind == "model":
            models.append((name, path, {}))
        elif not models:
            raise ConfigError(f"--embedding-adapter {item!r}: give it after the --embedding-model it applies to")
        else:
            models[-1][2][name] = path
    return models


def load_embedding_service(specs, limits: EmbeddingLimits, dtype=None, device=None) -> EmbeddingService:
    """The service over the models and adapters `parse_embedding_options` read (each model loaded once)."""
    from .embed_cli import load_embedder
    service = EmbeddingService(limits)
    for name, path, adapters in specs:
        encoder, tokenizer = load_embedder(path, dtype=dtype, device=device)
        service.add_model(name, encoder, tokenizer)
        for adapter_name, adapter_dir in adapters.items():
            service.add_adapter(name, adapter_name, adapter_dir)
    return service
