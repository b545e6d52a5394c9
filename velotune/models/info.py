"""`velotune info MODEL [--adapter DIR]`: what a checkpoint is, read from its files without loading the weights.

Architecture, whether velotune runs it with its own model file or through the generic (slower) path, parameter count
and stored dtype (from the safetensors headers), context length, the chat template (and where it comes from), and
the adapter's LoRA settings. Cheap enough to run on a 70B checkpoint: no tensor data is read.
"""
from __future__ import annotations

import json
from pathlib import Path

from ..errors import CheckpointError


def add_info_parser(subparsers):
    """Adds the `info` subcommand to the `velotune` command's subparsers."""
    p = subparsers.add_parser("info", help="describe a model directory (and adapter) without loading the weights")
    p.add_argument("model", help="Hugging Face model directory")
    p.add_argument("--adapter", help="a LoRA adapter directory (PEFT format) to describe as well")
    p.add_argument("--json", action="store_true", help="print the facts as one JSON object")
    p.set_defaults(func=run_info)
    return p


def run_info(ns):
    facts = model_info(ns.model, ns.adapter)
    print(json.dumps(facts, indent=2) if ns.json else format_info(facts))


def model_info(model_path, adapter=None) -> dict:
    """The facts `velotune info` prints, as a dict."""
    from . import checkpoint as ckpt
    from .registry import architecture
    model_dir = Path(model_path).expanduser()
    if not model_dir.is_dir():
        raise CheckpointError(f"{model_dir}: no such model directory")
    config = ckpt.read_config(model_dir)
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else config
    params, dtypes = _weights_summary(ckpt.weight_files(model_dir))
    facts = {
        "path": str(model_dir),
        "model_type": config["model_type"],
        "architectures": config.get("architectures") or [],
        "velotune_path": "native" if architecture(config["model_type"]) is not None else "generic (transformers)",
        "parameters": params,
        "stored_dtypes": dtypes,
        "layers": text.get("num_hidden_layers"),
        "hidden_size": text.get("hidden_size"),
        "vocab_size": text.get("vocab_size"),
        "context_length": text.get("max_position_embeddings"),
        "rope_scaling": text.get("rope_scaling"),
        "chat_template": _template_facts(model_dir, adapter),
    }
    if adapter:
        facts["adapter"] = _adapter_facts(Path(adapter))
    return facts


def _weights_summary(files) -> tuple[int, dict]:
    """(parameter count, {dtype: count}) from safetensors headers only."""
    from safetensors import safe_open
    total, dtypes = 0, {}
    for file in files:
        try:
            with safe_open(str(file), framework="pt") as f:
                for name in f.keys():
                    piece = f.get_slice(name)
                    count = 1
                    for size in piece.get_shape():
                        count *= size
                    total += count
                    dtype = piece.get_dtype()
                    dtypes[dtype] = dtypes.get(dtype, 0) + count
        except Exception as exc:
            raise CheckpointError(f"{file}: cannot read the safetensors header ({exc})") from None
    return total, dtypes


def _template_facts(model_dir: Path, adapter) -> dict:
    """Which chat template inference would use: the adapter's saved one over the base's."""
    from ..data.templates import saved_chat_template
    from ..exporting.modelfile import chat_format
    for source, directory in (("adapter", adapter), ("model", model_dir)):
        if directory is None:
            continue
        template = saved_chat_template(Path(directory))
        if template:
            found = chat_format(template)
            return {"source": f"{source} ({directory})", "format": found[0] if found else "other",
                    "length": len(template)}
    return {"source": None, "format": None, "length": 0}


def _adapter_facts(adapter_dir: Path) -> dict:
    from ..lora.peft_io import read_adapter_config
    config = read_adapter_config(adapter_dir)
    return {"path": str(adapter_dir), "r": config.get("r"), "alpha": config.get("lora_alpha"),
            "targets": config.get("target_modules"), "dora": bool(config.get("use_dora")),
            "rslora": bool(config.get("use_rslora")), "base": config.get("base_model_name_or_path")}


def format_info(facts: dict) -> str:
    def size(n):
        for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
            if n >= scale:
                return f"{n / scale:.2f}{unit}"
        return str(n)
    template = facts["chat_template"]
    lines = [
        f"model         {facts['path']}",
        f"architecture  {facts['model_type']} ({', '.join(facts['architectures']) or 'no architectures field'})",
        f"runs on       velotune's {facts['velotune_path']} path",
        f"parameters    {size(facts['parameters'])} ({facts['parameters']:,}); stored as "
        + ", ".join(f"{d} ({size(n)})" for d, n in facts["stored_dtypes"].items()),
        f"shape         {facts['layers']} layers, hidden {facts['hidden_size']}, vocab {facts['vocab_size']}",
        f"context       {facts['context_length']} tokens"
        + (f" (rope scaling {facts['rope_scaling']})" if facts["rope_scaling"] else ""),
        f"chat template {template['format'] + ' from the ' + template['source'] if template['source'] else 'none'}",
    ]
    adapter = facts.get("adapter")
    if adapter:
        lines.append(f"adapter       {adapter['path']}: LoRA r={adapter['r']} alpha={adapter['alpha']} "
                     f"targets={adapter['targets']}" + (" DoRA" if adapter["dora"] else "")
                     + (" rsLoRA" if adapter["rslora"] else ""))
    return "\n".join(lines)
