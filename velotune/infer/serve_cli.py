"""`velotune serve MODEL [--adapter NAME=DIR ...]`: the command line of the OpenAI-compatible server."""
from __future__ import annotations

import json
import os
from pathlib import Path

from ..errors import ConfigError

API_KEY_ENV = "VELOTUNE_API_KEY"


def add_serve_parser(subparsers):
    """Adds the `serve` subcommand to the `velotune` command's subparsers."""
    p = subparsers.add_parser("serve", help="OpenAI-compatible HTTP server (chat, completions, models; adapters)")
    p.add_argument("model", help="Hugging Face model directory or hub id (the base)")
    p.add_argument("--adapter", action="append", default=[], metavar="NAME=DIR",
                   help="a LoRA adapter served as model NAME (repeatable; DIR alone: named after the directory)")
    p.add_argument("--name", help="the base model's name in requests (default: MODEL as given)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", dest="api_key", default=os.environ.get(API_KEY_ENV),
                   help=f"require 'Authorization: Bearer KEY' on every request (default: ${API_KEY_ENV})")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="default: bf16 on GPU, fp32 on CPU")
    p.add_argument("--quantize", choices=["nf4", "int8"], help="load the base quantized (bitsandbytes)")
    p.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    p.add_argument("--max-seq-length", dest="max_seq_length", type=int,
                   help="context length: prompt + max_tokens (default: the model's max_position_embeddings)")
    p.add_argument("--max-batch-size", dest="max_batch_size", type=int, default=16,
                   help="requests decoded together at most (default: 16)")
    p.add_argument("--set", dest="settings", action="append", default=[], metavar="KEY=VALUE",
                   help="a default sampling setting for requests that do not give it, e.g. temperature=0.2")
    p.add_argument("--threads", type=int, help="torch CPU threads")
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
    import torch

    from .chat_cli import load_for_inference
    from .server import build_server, serve
    if ns.threads:
        torch.set_num_threads(ns.threads)
    adapters = parse_adapters(ns.adapter)
    settings = parse_settings(ns.settings)
    model, tokenizer = load_for_inference(ns.model, None, ns.dtype, ns.quantize, ns.device)
    if ns.max_seq_length:
        model.max_seq_length = ns.max_seq_length
    server = build_server(model, tokenizer, ns.name or ns.model, adapters, api_key=ns.api_key,
                          sampling_config=settings, max_batch_size=ns.max_batch_size)
    serve(server, ns.host, ns.port, ns.log_level)
