"""`velotune chat` and `velotune generate`: a terminal chat with history and streaming, and one-shot generation."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from ..errors import VelotuneError

HELP = "commands: /reset (clear history)  /params (sampling settings and their sources)  /system TEXT  /quit"


def load_for_inference(model_path, adapter=None, dtype=None, quantize=None, device=None):
    from ..models.loader import load
    model, tokenizer = load(model_path, dtype=dtype, quantize=quantize, device=device)
    if adapter:
        from ..lora import load_adapter
        load_adapter(model, adapter, trainable=False)
    if tokenizer is None:
        raise VelotuneError(f"{model_path}: no tokenizer files; chat and generate need a tokenizer")
    return model.eval(), tokenizer


def sampling_from_args(ns) -> dict:
    keys = ("temperature", "top_k", "top_p", "min_p", "repetition_penalty", "seed", "max_new_tokens")
    return {k: getattr(ns, k) for k in keys if getattr(ns, k, None) is not None}


def run_generate(ns):
    from .generate import generate
    model, tokenizer = load_for_inference(ns.model, ns.adapter, ns.dtype, ns.quantize, ns.device)
    if ns.messages:
        path = Path(ns.messages)
        try:
            prompt = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise VelotuneError(f"{path}: cannot read a JSON list of messages ({exc})") from None
    elif ns.prompt is not None:
        prompt = [{"role": "user", "content": ns.prompt}] if tokenizer.chat_template and not ns.raw else ns.prompt
    else:
        raise VelotuneError("give --prompt TEXT or --messages FILE.json")
    print(generate(model, tokenizer, prompt, **sampling_from_args(ns)))


def run_chat(ns, input_fn=input, out=sys.stdout):
    from .defaults import resolve_sampling
    from .generate import stream
    model, tokenizer = load_for_inference(ns.model, ns.adapter, ns.dtype, ns.quantize, ns.device)
    request = sampling_from_args(ns)
    resolved = resolve_sampling(request, None, model)
    print(f"velotune chat - {ns.model}" + (f" + adapter {ns.adapter}" if ns.adapter else ""), file=out)
    print(resolved.describe(), file=out)
    print(HELP, file=out)
    system, history = ns.system, []
    while True:
        try:
            line = input_fn("> ")
        except (EOFError, KeyboardInterrupt):
            print(file=out)
            return
        if not line.strip():
            continue
        if line.strip() in ("/quit", "/exit"):
            return
        if line.strip() == "/reset":
            history = []
            print("(history cleared)", file=out)
            continue
        if line.strip() == "/params":
            print(resolve_sampling(request, None, model).describe(), file=out)
            continue
        if line.startswith("/system"):
            system = line[len("/system"):].strip() or None
            history = []
            print(f"(system prompt {'set' if system else 'cleared'}; history cleared)", file=out)
            continue
        history.append({"role": "user", "content": line})
        messages = ([{"role": "system", "content": system}] if system else []) + history
        reply, start, pieces = "", time.perf_counter(), 0
        for piece in stream(model, tokenizer, messages, **resolve_sampling(request, None, model).values):
            reply += piece
            pieces += 1
            print(piece, end="", file=out, flush=True)
        elapsed = time.perf_counter() - start
        tokens = len(tokenizer(reply, add_special_tokens=False)["input_ids"]) if reply else 0
        print(f"\n[{tokens} tokens, {tokens / elapsed if elapsed > 0 else 0:.1f} tokens/s]", file=out)
        history.append({"role": "assistant", "content": reply})
