"""`velotune serve MODEL [--adapter NAME=DIR ...]`: the command line of the OpenAI-compatible server."""
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


def add_serve_parser(subparsers):
    """Adds the `serve` subcommand to the `velotune` command's subparsers."""
    p = subparsers.add_parser("serve", help="OpenAI-compatible HTTP server (chat, completions, models; adapters)")
    p.add_argument("model", help="Hugging Face model directory or hub id (the base)")
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
    p.add_argument("--log-level", dest="log_level", default="info",
                   choices=["critical", "error", "warning", "info", "debug"])
    p.set_defaults(func=run_serve)
    return p


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
    adapters = parse_adapters(ns.adapter)
    settings = parse_settings(ns.settings)
    if ns.chat_template:   # a bad name or file is refused before the model loads
        from ..data.templates import load_chat_template
        load_chat_template(ns.chat_template, source="--chat-template")
    import torch

    from .chat_cli import load_for_inference
    from .server import build_server, serve
    if ns.threads:
        torch.set_num_threads(ns.threads)
    model, tokenizer = load_for_inference(ns.model, None, ns.dtype, ns.quantize, ns.device)
    if ns.max_seq_length:
        model.max_seq_length = ns.max_seq_length
    server = build_server(model, tokenizer, ns.name or ns.model, adapters, api_key=ns.api_key,
                          sampling_config=settings, max_batch_size=ns.max_batch_size,
                          max_body_bytes=ns.max_body_bytes, max_tokens_limit=ns.max_tokens_limit,
                          chat_template=ns.chat_template)
    serve(server, ns.host, ns.port, ns.log_level, allow_hosts=ns.allow_hosts)
