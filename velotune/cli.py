"""The `velotune` command. Heavy imports happen inside each subcommand, so `--help` stays fast."""
from __future__ import annotations

import argparse
import logging
import sys

from . import __version__


def _cmd_train(ns):
    from .train.trainer import train
    result = train(ns.config, overrides=ns.overrides)
    print(f"done: {result.output_dir}")


def _cmd_demo(ns):
    from .demo import run_demo
    run_demo(out_dir=ns.out, steps=ns.steps, quick=ns.quick)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="velotune", description="Fine-tune and run open LLMs, fast and lean.")
    parser.add_argument("--version", action="version", version=f"velotune {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="fine-tune from a YAML config; key=value pairs override it")
    p.add_argument("config", help="YAML config file")
    p.add_argument("overrides", nargs="*", help="overrides such as lora.r=32 train.lr=1e-4")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("demo", help="train a tiny bundled model on a bundled data set, then chat with it")
    p.add_argument("--out", default="runs/demo", help="output directory (default: runs/demo)")
    p.add_argument("--steps", type=int, default=None, help="training steps (default: the demo's own)")
    p.add_argument("--quick", action="store_true", help="a much shorter run, for smoke tests")
    p.set_defaults(func=_cmd_demo)
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
