"""The `velotune` command. Heavy imports happen inside each subcommand, so `--help` stays fast."""
from __future__ import annotations

import argparse
import logging
import sys

from . import __version__


def _cmd_train(ns):
    from .training.trainer import train
    result = train(ns.config, overrides=ns.overrides)
    print(f"done: {result.output_dir}")


def _cmd_demo(ns):
    from .demo import run_demo
    run_demo(out_dir=ns.out, steps=ns.steps, quick=ns.quick, threads=ns.threads)


def _cmd_chat(ns):
    from .infer.chat_cli import run_chat
    run_chat(ns)


def _cmd_generate(ns):
    from .infer.chat_cli import run_generate
    run_generate(ns)


def _add_model_args(p):
    p.add_argument("model", help="Hugging Face model directory or hub id")
    p.add_argument("--adapter", help="a LoRA adapter directory (PEFT format) to apply")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="default: bf16 on GPU, fp32 on CPU")
    p.add_argument("--quantize", choices=["nf4", "int8"], help="load the base quantized (bitsandbytes)")
    p.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda when available)")


def _add_sampling_args(p):
    p.add_argument("--max-new-tokens", dest="max_new_tokens", type=int)
    p.add_argument("--temperature", type=float, help="0 = greedy")
    p.add_argument("--top-k", dest="top_k", type=int)
    p.add_argument("--top-p", dest="top_p", type=float)
    p.add_argument("--min-p", dest="min_p", type=float)
    p.add_argument("--repetition-penalty", dest="repetition_penalty", type=float)
    p.add_argument("--seed", type=int)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="velotune", description="Fine-tune and run open LLMs, fast and lean.")
    parser.add_argument("--version", action="version", version=f"velotune {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="fine-tune from a YAML config; key=value pairs override it")
    p.add_argument("config", help="YAML config file")
    p.add_argument("overrides", nargs="*", help="overrides such as lora.r=32 train.lr=1e-4")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("chat", help="interactive chat in the terminal (streaming, history, /reset /params /system)")
    _add_model_args(p)
    _add_sampling_args(p)
    p.add_argument("--system", help="system prompt")
    p.set_defaults(func=_cmd_chat)

    p = sub.add_parser("generate", help="generate a reply to one prompt, for scripts")
    _add_model_args(p)
    _add_sampling_args(p)
    p.add_argument("--prompt", help="user message (or raw text with --raw)")
    p.add_argument("--messages", help="a JSON file holding a list of {role, content} messages")
    p.add_argument("--raw", action="store_true", help="use --prompt as raw text, without the chat template")
    p.set_defaults(func=_cmd_generate)

    from .infer.serve_cli import add_serve_parser
    add_serve_parser(sub)

    p = sub.add_parser("demo", help="train a tiny bundled model on a bundled data set, then chat with it")
    p.add_argument("--out", default="runs/demo", help="output directory (default: runs/demo)")
    p.add_argument("--steps", type=int, default=None, help="training steps (default: the demo's own)")
    p.add_argument("--quick", action="store_true", help="a shorter run (fewer steps, most answers learned)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: 1)")
    p.set_defaults(func=_cmd_demo)
    from .exporting.export_cli import add_export_parser
    add_export_parser(sub)
    from .bench_cli import add_bench_parser
    add_bench_parser(sub)
    return parser


def main(argv=None) -> int:
    from .errors import VelotuneError
    parser = build_parser()
    ns = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        ns.func(ns)
    except VelotuneError as exc:
        print(f"velotune: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("velotune: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
