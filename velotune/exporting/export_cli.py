"""`velotune export MODEL [--adapter DIR] --format merged|adapter|gguf [--quant q8_0] [--dtype bfloat16]
[--chat-template NAME|FILE] --out PATH`.

Everything that can be checked before loading the model (the output path, the format's options, the chat
template) is; the adapter is then matched against the base (names and shapes) before anything is written. The
export carries the chat template the adapter was trained with (saved in its directory) unless --chat-template
names another; without either, the base's own."""
from __future__ import annotations

import json
import logging
from pathlib import Path

log = logging.getLogger("velotune")

DTYPE_CHOICES = ("float32", "bfloat16", "float16")


def add_export_parser(subparsers):
    from . import FORMATS
    p = subparsers.add_parser("export", help="write a merged checkpoint, a PEFT adapter, or GGUF (llama.cpp / "
                                             "Ollama)")
    p.add_argument("model", help="base model: a Hugging Face model directory or hub id")
    p.add_argument("--adapter", help="LoRA adapter directory (PEFT format) to merge or export")
    p.add_argument("--format", choices=FORMATS, default="merged", help="default: merged")
    p.add_argument("--out", required=True, help="output directory (gguf: a directory, or a file ending in .gguf)")
    p.add_argument("--dtype", choices=DTYPE_CHOICES, help="merged: weight dtype (default: the checkpoint's)")
    p.add_argument("--quant", help="gguf: f32, f16, bf16, q8_0, q4_0, q4_1, q5_0 or q5_1 (default: f16)")
    p.add_argument("--quantize", choices=["nf4", "int8"],
                   help="load the base quantized, as during QLoRA training; it is dequantized in fp32 to merge")
    p.add_argument("--device", help="where to load and merge (default: cuda when available)")
    p.add_argument("--chat-template", dest="chat_template", metavar="NAME|FILE",
                   help="the chat template to write: a built-in name (alpaca, chatml, llama-3 ...) or a Jinja file; "
                        "default: the one saved with the adapter, else the model's own")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing output (only the files velotune wrote there; others are kept)")
    p.set_defaults(func=run_export)
    return p


def run_export(ns):
    from ..data.templates import load_chat_template
    from ..errors import ConfigError
    from .gguf_writer import check_gguf_output, resolve_quant
    from .output import check_output
    if ns.format == "adapter" and not ns.adapter:
        raise ConfigError("--format adapter exports an adapter: pass it with --adapter DIR")
    if ns.format != "gguf" and ns.quant:
        raise ConfigError("--quant applies to --format gguf; use --dtype for a merged export")
    if ns.format == "gguf":
        resolve_quant(ns.quant, ns.dtype)
        check_gguf_output(ns.out, ns.overwrite)
    else:
        check_output(Path(ns.out), ns.overwrite)
    if ns.chat_template:
        load_chat_template(ns.chat_template, source="--chat-template")
    model, tokenizer = _load(ns)
    from . import export
    path = export(model, tokenizer, ns.out, format=ns.format, dtype=ns.dtype, quant=ns.quant,
                  overwrite=ns.overwrite, adapter_dir=ns.adapter)
    print(f"wrote {path}")


def _load(ns):
    from ..data.templates import set_inference_template
    from ..lora import load_adapter
    from ..models.checkpoint import resolve_model_dir
    from ..models.loader import load
    model_dir = resolve_model_dir(ns.model)
    if _model_type(model_dir) == "whisper":   # a speech encoder-decoder: our Whisper, not the causal-LM loader
        from ..models.tokenizer import load_tokenizer
        from ..models.whisper import load_whisper
        model = load_whisper(model_dir, dtype=_source_dtype(model_dir), device=ns.device)
        if ns.adapter:
            load_adapter(model, ns.adapter, trainable=False)
        return model, load_tokenizer(Path(ns.adapter) if ns.adapter and _has_tokenizer(ns.adapter) else model_dir)
    model, tokenizer = load(model_dir, dtype=_source_dtype(model_dir), quantize=ns.quantize, device=ns.device)
    if ns.adapter:
        load_adapter(model, ns.adapter, trainable=False)  # names and shapes checked here: nothing written yet
    if tokenizer is not None:
        set_inference_template(tokenizer, ns.chat_template, ns.adapter)
    return model, tokenizer


def _source_dtype(model_dir: Path) -> str:
    """The checkpoint's own dtype: merging upcasts each layer to fp32 anyway, so loading wider gains nothing."""
    try:
        config = json.loads((Path(model_dir) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return "float32"
    dtype = config.get("dtype") or config.get("torch_dtype")
    return dtype if dtype in DTYPE_CHOICES else "float32"


def _model_type(model_dir: Path) -> str | None:
    try:
        return json.loads((Path(model_dir) / "config.json").read_text(encoding="utf-8")).get("model_type")
    except (OSError, ValueError, AttributeError):
        return None


def _has_tokenizer(directory) -> bool:
    return any((Path(directory) / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json"))
