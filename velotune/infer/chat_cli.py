"""`velotune chat` and `velotune generate`: a terminal chat with history and streaming, and one-shot generation."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from ..errors import VelotuneError

HELP = ("commands: /reset (clear history)  /params (sampling settings and their sources)  /system TEXT  "
        "/image FILE (vision models)  /video FILE (Qwen2-VL, Qwen2.5-VL)  /quit  /help\n"
        "(to send a message that starts with /, double the slash: //text sends /text)")


def add_model_args(p):
    """The model arguments shared by chat and generate."""
    p.add_argument("model", help="Hugging Face model directory or hub id")
    p.add_argument("--adapter", help="a LoRA adapter directory (PEFT format) to apply")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="default: bf16 on a GPU; on a CPU, a bf16 checkpoint stays bf16 where "
                        "the CPU multiplies bf16 natively (AVX512-BF16, AMX), else fp32")
    p.add_argument("--quantize", choices=["nf4", "int8"], help="load the base quantized (bitsandbytes)")
    p.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    p.add_argument("--chat-template", dest="chat_template", metavar="NAME|FILE",
                   help="the chat template: a built-in name (alpaca, chatml, llama-3 ...) or a Jinja file; "
                        "default: the one saved with the adapter, else the model's own")


def add_sampling_args(p):
    p.add_argument("--max-new-tokens", dest="max_new_tokens", type=int)
    p.add_argument("--temperature", type=float, help="0 = greedy")
    p.add_argument("--top-k", dest="top_k", type=int)
    p.add_argument("--top-p", dest="top_p", type=float)
    p.add_argument("--min-p", dest="min_p", type=float)
    p.add_argument("--repetition-penalty", dest="repetition_penalty", type=float)
    p.add_argument("--seed", type=int)


def add_chat_parsers(subparsers):
    """Adds the `chat` and `generate` subcommands to the `velotune` command's subparsers."""
    p = subparsers.add_parser("chat", help="interactive chat in the terminal (streaming, history, /reset /params "
                                           "/system)")
    add_model_args(p)
    add_sampling_args(p)
    p.add_argument("--system", help="system prompt")
    p.add_argument("--image", action="append", default=[], metavar="FILE",
                   help="an image for the first message (vision-language models; repeat for several; /image FILE "
                        "attaches one later)")
    p.add_argument("--video", action="append", default=[], metavar="FILE",
                   help="a video for the first message (models that read videos: Qwen2-VL, Qwen2.5-VL; repeat for "
                        "several; /video FILE attaches one later)")
    p.set_defaults(func=run_chat)

    p = subparsers.add_parser("generate", help="generate a reply to one prompt, for scripts")
    add_model_args(p)
    add_sampling_args(p)
    p.add_argument("--prompt", help="user message (or raw text with --raw)")
    p.add_argument("--messages", help="a JSON file holding a list of {role, content} messages")
    p.add_argument("--raw", action="store_true", help="use --prompt as raw text, without the chat template")
    p.add_argument("--image", action="append", default=[], metavar="FILE",
                   help="an image the prompt is about (vision-language models; repeat for several)")
    p.add_argument("--video", action="append", default=[], metavar="FILE",
                   help="a video the prompt is about (models that read videos: Qwen2-VL, Qwen2.5-VL; repeat for "
                        "several)")
    p.set_defaults(func=run_generate)


def load_for_inference(model_path, adapter=None, dtype=None, quantize=None, device=None, chat_template=None):
    """(model, tokenizer) ready to generate: the adapter applied, and the chat template by this order:
    `chat_template` (a name, file or Jinja text) > the one saved with the adapter > the base's own."""
    from ..data.templates import load_chat_template, set_inference_template
    from ..models.loader import load
    if chat_template:
        load_chat_template(chat_template, source="--chat-template")  # refused before the model loads
    model, tokenizer = load(model_path, dtype=dtype, quantize=quantize, device=device)
    if adapter:
        from ..lora import load_adapter
        load_adapter(model, adapter, trainable=False)
    if tokenizer is None:
        raise VelotuneError(f"{model_path}: no tokenizer files; chat and generate need a tokenizer")
    set_inference_template(tokenizer, chat_template, adapter)
    return model.eval(), tokenizer


def sampling_from_args(ns) -> dict:
    keys = ("temperature", "top_k", "top_p", "min_p", "repetition_penalty", "seed", "max_new_tokens")
    return {k: getattr(ns, k) for k in keys if getattr(ns, k, None) is not None}


def run_generate(ns):
    from .generation import generate
    videos = media_files(getattr(ns, "video", []), "--video")   # missing files fail before the model loads
    if videos and (ns.messages or ns.prompt is None):
        raise VelotuneError("--video goes with --prompt (the video and the prompt make one user message); with "
                            "--messages, put video parts in the messages")
    model, tokenizer = load_for_inference(ns.model, ns.adapter, ns.dtype, ns.quantize, ns.device,
                                          ns.chat_template)
    if videos:
        check_reads_videos(model, "--video")
    if ns.messages:
        path = Path(ns.messages)
        try:
            prompt = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise VelotuneError(f"{path}: cannot read a JSON list of messages ({exc})") from None
    elif ns.prompt is not None and (ns.image or videos):
        if ns.raw:
            flag = "--image" if ns.image else "--video"
            raise VelotuneError(f"{flag} needs the chat template (images and videos go in a user message): drop "
                                "--raw")
        prompt = [{"role": "user", "content": with_images(ns.prompt, image_files(ns.image), videos)}]
    elif ns.prompt is not None:
        prompt = [{"role": "user", "content": ns.prompt}] if tokenizer.chat_template and not ns.raw else ns.prompt
    else:
        raise VelotuneError("give --prompt TEXT or --messages FILE.json")
    print(generate(model, tokenizer, prompt, **sampling_from_args(ns)))


def run_chat(ns, input_fn=input, out=sys.stdout):
    from .defaults import resolve_sampling
    model, tokenizer = load_for_inference(ns.model, ns.adapter, ns.dtype, ns.quantize, ns.device,
                                          ns.chat_template)
    request = sampling_from_args(ns)
    print(f"velotune chat - {ns.model}" + (f" + adapter {ns.adapter}" if ns.adapter else ""), file=out)
    print(resolve_sampling(request, None, model).describe(), file=out)
    print(HELP, file=out)
    session = {"system": ns.system, "history": [], "images": image_files(getattr(ns, "image", [])),
               "videos": media_files(getattr(ns, "video", []), "--video"), "model": model}
    if session["videos"]:
        check_reads_videos(model, "--video")
    while True:
        try:
            line = input_fn("> ")
        except (EOFError, KeyboardInterrupt):
            print(file=out)
            return
        if not line.strip():
            continue
        if line.lstrip().startswith("/") and not line.lstrip().startswith("//"):
            if run_command(line.strip(), session, lambda: resolve_sampling(request, None, model), out) == "quit":
                return
            continue
        message = line.lstrip()[1:] if line.lstrip().startswith("//") else line
        reply_to(model, tokenizer, message, session, resolve_sampling(request, None, model).values, out)


def image_files(paths) -> list[str]:
    """--image / /image arguments as absolute paths, each checked to be a file now (before any model work)."""
    return media_files(paths, "--image")


def media_files(paths, flag: str) -> list[str]:
    """--image / --video arguments as absolute paths, each checked to be a file now (before any model work)."""
    found = []
    for path in paths:
        file = Path(path).expanduser()
        if not path or not file.is_file():
            raise VelotuneError(f"{flag} {path}: no such file")
        found.append(str(file.resolve()))
    return found


def check_reads_videos(model, flag: str) -> None:
    """A VelotuneError naming `flag` when the model does not read videos (before any video is decoded)."""
    if getattr(model, "takes_videos", False):
        return
    from ..data.vision_media import VIDEO_FAMILIES
    from .vision_prompt import is_vision_model
    reads = "images" if is_vision_model(model) else "text"
    family = getattr(model, "model_type", None) or "this model"
    raise VelotuneError(f"{flag}: {family} reads {reads} only; videos need a {VIDEO_FAMILIES} model")


def with_images(text: str, images: list[str], videos: list[str] = ()) -> list:
    """A user message's content parts: the images, the videos, then the text."""
    return ([{"type": "image", "image": image} for image in images]
            + [{"type": "video", "video": video} for video in videos] + [{"type": "text", "text": text}])


def run_command(line: str, session: dict, sampling, out) -> str | None:
    """One chat command; "quit" to end the chat. An unknown one is reported, never sent to the model."""
    command, argument = (line.split(None, 1) + [""])[:2]
    if command in ("/quit", "/exit"):
        return "quit"
    if command == "/help":
        print(HELP, file=out)
    elif command == "/reset":
        session["history"] = []
        print("(history cleared)", file=out)
    elif command == "/params":
        print(sampling().describe(), file=out)
    elif command == "/image":
        try:
            session.setdefault("images", []).extend(image_files([argument.strip()]))
            print(f"(image attached to your next message: {argument.strip()})", file=out)
        except VelotuneError as exc:
            print(f"error: {exc}", file=out)
    elif command == "/video":
        try:
            if session.get("model") is not None:
                check_reads_videos(session["model"], "/video")
            session.setdefault("videos", []).extend(media_files([argument.strip()], "/video"))
            print(f"(video attached to your next message: {argument.strip()})", file=out)
        except VelotuneError as exc:
            print(f"error: {exc}", file=out)
    elif command == "/system":
        session["system"], session["history"] = argument.strip() or None, []
        print(f"(system prompt {'set' if session['system'] else 'cleared'}; history cleared)", file=out)
    else:
        print(f"unknown command {command}; /help lists them", file=out)
    return None


def reply_to(model, tokenizer, message: str, session: dict, sampling: dict, out):
    """Streams the model's reply to `message` and adds both to the history."""
    from .generation import stream
    images, session["images"] = session.get("images") or [], []
    videos, session["videos"] = session.get("videos") or [], []
    content = with_images(message, images, videos) if images or videos else message
    session["history"].append({"role": "user", "content": content})
    system = session["system"]
    messages = ([{"role": "system", "content": system}] if system else []) + session["history"]
    reply, start = "", time.perf_counter()
    for piece in stream(model, tokenizer, messages, **sampling):
        reply += piece
        print(piece, end="", file=out, flush=True)
    elapsed = time.perf_counter() - start
    tokens = len(tokenizer(reply, add_special_tokens=False)["input_ids"]) if reply else 0
    print(f"\n[{tokens} tokens, {tokens / elapsed if elapsed > 0 else 0:.1f} tokens/s]", file=out)
    session["history"].append({"role": "assistant", "content": reply})
