"""`velotune bench`: the subcommand (its options are in options.py, shared with the benchmarks/ scripts).

Kept free of heavy imports: `velotune --help` builds this parser.
"""
from __future__ import annotations

from .options import add_bench_arguments


def add_bench_parser(subparsers):
    p = subparsers.add_parser("bench", help="benchmark training against transformers + peft, side by side")
    add_bench_arguments(p)
    # Here, not in options.py: the benchmarks/ scripts each run one benchmark and need no choice of it.
    p.add_argument("--embeddings", action="store_true",
                   help="the embeddings benchmark: velotune's contrastive objective vs sentence-transformers' trainer "
                        "(MNRL, and GradCache at a 1024 batch), the real all-MiniLM-L6-v2; --cases among full,lora,"
                        "gradcache")
    p.add_argument("--whisper", action="store_true",
                   help="the Whisper benchmark: velotune's asr objective vs transformers' Seq2SeqTrainer + PEFT, LoRA "
                        "r=32 on q/v of the real tiny.en, espeak-ng clips")
    p.add_argument("--vision", action="store_true",
                   help="the vision-language benchmark: velotune's vision objective vs transformers' LLaVA + PEFT, "
                        "LoRA on the language model of a 224 px LLaVA shape with random weights, generated images")
    p.add_argument("--moe", action="store_true",
                   help="the mixture-of-experts benchmark: velotune's Qwen3-MoE and Mixtral vs transformers + PEFT, "
                        "LoRA on q/k/v/o of 8-expert top-2 shapes with random weights; --cases among qwen3-moe,mixtral")
    p.set_defaults(func=run_bench_command)
    return p


def run_bench_command(ns):
    if sum((ns.loop, ns.preference, ns.grpo, ns.embeddings, ns.whisper, ns.vision, ns.moe)) > 1:
        from ..errors import ConfigError
        raise ConfigError("velotune bench: choose one of --loop, --preference, --grpo, --embeddings, --whisper, "
                          "--vision and --moe")
    if ns.loop:
        from .loop import run
    elif ns.preference:
        from .preference import run
    elif ns.grpo:
        from .grpo import run
    elif ns.embeddings:
        from .embeddings import run
    elif ns.whisper:
        from .whisper import run
    elif ns.vision:
        from .vision import run
    elif ns.moe:
        from .moe import run
    else:
        from .train import run
    run(ns)
