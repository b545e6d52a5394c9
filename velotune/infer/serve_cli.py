"""`velotune serve [MODEL] [--adapter NAME=DIR ...] [--embedding-model NAME=PATH [--embedding-adapter NAME=DIR ...]
...]`: the command line of the OpenAI-compatible server."""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from ..errors import ConfigError

API_KEY_ENV = "VELOTUNE_API_KEY"


def _int_in(low: int, high: int | None = None):
    """An argparse type: an integer in [low, high]; anything else is argparse's one-line usage error."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low or (high is not None and value > high):
            expected = f"in {low}..{high}" if high is not None else f">= {low}"
            raise argparse.ArgumentTypeError(f"expected an integer {expected}, got {value}")
        return value
    return parse


positive_int = _int_in(1)


SERVE_DESCRIPTION = """OpenAI-compatible HTTP server. MODEL (a chat model, with its --adapter's) answers
/v1/chat/completions and /v1/completions; each --embedding-model (with the --embedding-adapter's given after it)
answers /v1/embeddings. Give a chat model, embedding models, or both; every served name (the request's `model`)
is unique across them, and GET /v1/models lists them all."""


def add_serve_parser(subparsers):
    """Adds the `serve` subcommand to the `velotune` command's subparsers."""
    p = subparsers.add_parser("serve", help="OpenAI-compatible HTTP server (chat, completions, embeddings, models; "
                                            "adapters)", description=SERVE_DESCRIPTION)
    p.add_argument("model", nargs="?", help="the chat model: a Hugging Face model directory or hub id (the base); "
                                            "optional when --embedding-model is given")
    p.add_argument("--adapter", action="append", default=[], metavar="NAME=DIR",
                   help="a LoRA adapter served as model NAME (repeatable; DIR alone: named after the directory)")
    p.add_argument("--name", help="the base model's name in requests (default: MODEL as given)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=_int_in(1, 65535), default=8000)
    p.add_argument("--allow-host", dest="allow_hosts", action="append", default=[], metavar="NAME[:PORT]",
                   help="without --api-key, requests must be addressed (Host header) to 127.0.0.1, localhost, ::1 "
                        "or --host; this adds a name clients use (repeatable)")
    p.add_argument("--api-key", dest="api_key", default=os.environ.get(API_KEY_ENV),
                   help=f"require 'Authorization: Bearer KEY' on every request (default: ${API_KEY_ENV})")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="default: bf16 on a GPU; on a CPU, a bf16 checkpoint stays bf16 where "
                        "the CPU multiplies bf16 natively (AVX512-BF16, AMX), else fp32")
    p.add_argument("--quantize", choices=["nf4", "int8"], help="load the base quantized (bitsandbytes)")
    p.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    p.add_argument("--max-seq-length", dest="max_seq_length", type=positive_int,
                   help="context length: prompt + max_tokens (default: the model's max_position_embeddings, "
                        "else 4096)")
    p.add_argument("--max-tokens-limit", dest="max_tokens_limit", type=positive_int,
                   help="the most completion tokens one request may ask for (default: what the context holds)")
    p.add_argument("--max-batch-size", dest="max_batch_size", type=positive_int, default=16,
                   help="requests decoded together at most (default: 16)")
    p.add_argument("--max-body-bytes", dest="max_body_bytes", type=positive_int,
                   help="larger request bodies are refused with 413 (default: 4 MiB)")
    p.add_argument("--chat-template", dest="chat_template", metavar="NAME|FILE",
                   help="the chat template of every served model: a built-in name (chatml, alpaca, llama-3, ...), "
                        "a Jinja file or Jinja text (default: each adapter's saved template, else the base's)")
    p.add_argument("--set", dest="settings", action="append", default=[], metavar="KEY=VALUE",
                   help="a default sampling setting for requests that do not give it, e.g. temperature=0.2")
    p.add_argument("--threads", type=positive_int, help="torch CPU threads")
    add_embedding_args(p)
    add_speech_args(p)
    p.add_argument("--log-level", dest="log_level", default="info",
                   choices=["critical", "error", "warning", "info", "debug"])
    p.set_defaults(func=run_serve)
    return p


def add_speech_args(p):
    p.add_argument("--speech-model", dest="speech", action="append", default=[], metavar="NAME=PATH",
                   type=lambda item: ("model", item),
                   help="a Whisper model served on /v1/audio/transcriptions as NAME (repeatable)")
    p.add_argument("--speech-adapter", dest="speech", action="append", metavar="NAME=DIR",
                   type=lambda item: ("adapter", item),
                   help="a LoRA adapter of the --speech-model given before it, served as NAME (a copy of the model "
                        "with the adapter applied)")
    p.add_argument("--max-upload-bytes", dest="max_upload_bytes", type=positive_int, default=25 * 1024 * 1024,
                   help="audio files larger than this are refused with 413 (default: 25 MiB, as OpenAI)")
    p.add_argument("--max-audio-seconds", dest="max_audio_seconds", type=positive_int, default=600,
                   help="longer audio is refused (default: 600)")
    p.add_argument("--tts-model", dest="tts", action="append", default=[], metavar="NAME=PATH",
                   help="a model (or adapter) trained with objective tts, served on /v1/audio/speech as NAME "
                        "(repeatable)")
    p.add_argument("--tts-codec", dest="tts_codec", metavar="DIR",
                   help="the codec directory (default: the one each model's tts_config.json names)")
    p.add_argument("--tts-max-new-tokens", dest="tts_max_new_tokens", type=positive_int, default=1200,
                   help="speech codes one request may generate (default: 1200, about 14 s of SNAC 24 kHz)")


def add_embedding_args(p):
    # Both options append to one list, so that each adapter is read with the embedding model given before it.
    p.add_argument("--embedding-model", dest="embedding", action="append", default=[], metavar="NAME=PATH",
                   type=lambda item: ("model", item),
                   help="a sentence-transformers model served on /v1/embeddings as NAME (repeatable; PATH alone: "
                        "named PATH as given); --dtype, --device and --threads apply to it")
    p.add_argument("--embedding-adapter", dest="embedding", action="append", metavar="NAME=DIR",
                   type=lambda item: ("adapter", item),
                   help="a LoRA adapter of the --embedding-model given before it, served as NAME (repeatable; DIR "
                        "alone: named after the directory)")
    p.add_argument("--max-embedding-inputs", dest="max_embedding_inputs", type=positive_int, default=2048,
                   help="inputs one /v1/embeddings request may hold (default: 2048, as OpenAI)")
    p.add_argument("--max-embedding-input-tokens", dest="max_embedding_input_tokens", type=positive_int,
                   help="longer inputs are refused with 400; shorter ones over the model's max_seq_length are "
                        "truncated (default: the larger of 8192 and the model's max_seq_length)")
    p.add_argument("--max-embedding-request-tokens", dest="max_embedding_request_tokens", type=positive_int,
                   default=300_000, help="tokens one request may embed, after truncation (default: 300000)")
    p.add_argument("--embedding-batch-size", dest="embedding_batch_size", type=positive_int, default=32,
                   help="texts encoded together (default: 32)")


def parse_adapters(items) -> dict:
    """['name=dir', 'dir'] -> {name: dir}; a name may appear once."""
    adapters = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep:
            name, path = Path(item).name, item
        if not name or not path:
            raise ConfigError(f"--adapter {item!r}: expected NAME=DIR")
        if name in adapters:
            raise ConfigError(f"--adapter: the name {name!r} is given twice")
        adapters[name] = path
    return adapters


def parse_settings(items) -> dict:
    """['temperature=0.2', 'stop=["\\n"]'] -> {'temperature': 0.2, 'stop': ['\\n']} (JSON values, else text)."""
    from .sampling import FIELDS
    settings = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or key not in FIELDS:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE with KEY one of {', '.join(FIELDS)}")
        try:
            settings[key] = json.loads(raw)
        except json.JSONDecodeError:
            settings[key] = raw
    return settings


def run_serve(ns):
    from ..extras import require_extra
    require_extra("serve", "velotune serve")   # before minutes of loading, not after
    from .server_embeddings import EmbeddingLimits, load_embedding_service, parse_embedding_options
    if ns.model is None and not ns.embedding and not ns.speech and not ns.tts:
        raise ConfigError("nothing to serve: give a chat MODEL, --embedding-model PATH or --speech-model PATH")
    if ns.model is None and ns.adapter:
        raise ConfigError("--adapter applies to the chat MODEL; for an embedding model use --embedding-adapter")
    adapters = parse_adapters(ns.adapter)
    chat_names = [ns.name or ns.model, *adapters] if ns.model is not None else []
    embedding_specs = parse_embedding_options(ns.embedding, taken=chat_names)
    settings = parse_settings(ns.settings)
    if ns.chat_template:   # a bad name or file is refused before the model loads
        from ..data.templates import load_chat_template
        load_chat_template(ns.chat_template, source="--chat-template")
    import torch

    from .chat_cli import load_for_inference
    from .server import build_server, serve
    if ns.threads:
        torch.set_num_threads(ns.threads)
    model = tokenizer = None
    if ns.model is not None:
        model, tokenizer = load_for_inference(ns.model, None, ns.dtype, ns.quantize, ns.device)
        if ns.max_seq_length:
            model.max_seq_length = ns.max_seq_length
    limits = EmbeddingLimits(ns.max_embedding_inputs, ns.max_embedding_input_tokens,
                             ns.max_embedding_request_tokens, ns.embedding_batch_size)
    embeddings = load_embedding_service(embedding_specs, limits, ns.dtype, ns.device)
    speech = None
    if ns.speech:
        require_extra("audio", "velotune serve --speech-model")
        from .server_speech import SpeechLimits, load_speech_service
        speech = load_speech_service(ns.speech, SpeechLimits(ns.max_upload_bytes, ns.max_audio_seconds), ns.device)
    tts = None
    if ns.tts:
        require_extra("tts", "velotune serve --tts-model")
        from .server_tts import load_tts_service
        tts = load_tts_service(ns.tts, ns.tts_codec, ns.device, ns.tts_max_new_tokens)
    server = build_server(model, tokenizer, ns.name or ns.model, adapters, api_key=ns.api_key,
                          sampling_config=settings, max_batch_size=ns.max_batch_size,
                          max_body_bytes=ns.max_body_bytes, max_tokens_limit=ns.max_tokens_limit,
                          chat_template=ns.chat_template, embeddings=embeddings, speech=speech, tts=tts)
    serve(server, ns.host, ns.port, ns.log_level, allow_hosts=ns.allow_hosts)
