"""`velotune train CONFIG [key=value ...] [--dry-run]`: the command line of the training loop.

Exit status: 0 when the run finished, 130 when it was interrupted (its checkpoint is written and the command that
continues it is printed), so that `velotune train ... && velotune export ...` never exports a half-trained run.
"""
from __future__ import annotations

import os
import shlex
import sys

INTERRUPTED = 130  # the shell's status for a process stopped by Ctrl-C (128 + SIGINT)


def add_train_parser(subparsers):
    """Adds the `train` subcommand to the `velotune` command's subparsers; its --help lists every config key."""
    import argparse

    from ..config_help import schema_help
    p = subparsers.add_parser("train", help="fine-tune from a YAML config; key=value pairs override it",
                              formatter_class=argparse.RawDescriptionHelpFormatter, epilog=schema_help())
    p.add_argument("config", help="YAML config file")
    p.add_argument("overrides", nargs="*", help="overrides such as lora.r=32 train.lr=1e-4")
    p.add_argument("--dry-run", dest="dry_run", action="store_true",
                   help="check the config, output directory and data, and print the plan (counts, data format, "
                        "chat template, a sample with its trained text marked, optimizer steps); loads only the "
                        "tokenizer and writes nothing")
    p.set_defaults(func=run_train)
    return p


def run_train(ns) -> int:
    if ns.dry_run:
        from .plan import plan_run
        print(plan_run(ns.config, ns.overrides).describe())
        return 0
    from .trainer import train
    result = train(ns.config, overrides=ns.overrides)
    speaks = os.environ.get("RANK", "0") == "0"  # one message for the job, not one per torchrun process
    if result.interrupted:
        if speaks:
            print(f"velotune: interrupted after step {result.steps}; checkpoint: {result.checkpoint}\n"
                  f"continue with: {resume_command(ns.config, ns.overrides)}", file=sys.stderr)
        return INTERRUPTED
    if speaks:
        for line in before_after_lines(result):
            print(line)
        print(f"done: {result.output_dir}")
    return 0


def before_after_lines(result) -> list[str]:
    """The metrics measured before step 1 and at the end (an embedder's retrieval metrics), side by side."""
    before, after = result.eval_before, result.eval_metrics
    shared = [name for name in before if name in after]
    if not shared:
        return []
    width = max(len(name) for name in shared)
    lines = [f"{'metric':<{width}}  before    after"]
    lines += [f"{name:<{width}}  {before[name]:.4f}    {after[name]:.4f}" for name in shared]
    return lines


def resume_command(config: str, overrides) -> str:
    """The command line that continues the run: the same config and overrides, with train.resume=true."""
    kept = [o for o in overrides or [] if o.partition("=")[0].strip() not in ("train.resume", "train.overwrite")]
    return shlex.join(["velotune", "train", str(config), *kept, "train.resume=true"])
