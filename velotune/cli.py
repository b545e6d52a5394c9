"""The `velotune` command. Heavy imports happen inside each subcommand, so `--help` stays fast."""
from __future__ import annotations

import argparse
import logging
import os
import sys

from . import __version__


def _cmd_demo(ns):
    from .demo import run_demo
    run_demo(out_dir=ns.out, steps=ns.steps, quick=ns.quick, threads=ns.threads)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="velotune", description="Fine-tune and run open LLMs, fast and lean.")
    parser.add_argument("--version", action="version", version=f"velotune {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    from .training.train_cli import add_train_parser
    add_train_parser(sub)
    from .config_cli import add_config_parser
    add_config_parser(sub)
    from .infer.chat_cli import add_chat_parsers
    add_chat_parsers(sub)
    from .infer.serve_cli import add_serve_parser
    add_serve_parser(sub)
    from .infer.embed_cli import add_embed_parser
    add_embed_parser(sub)

    p = sub.add_parser("demo", help="train a tiny bundled model on a bundled data set, then chat with it")
    p.add_argument("--out", default="runs/demo", help="output directory (default: runs/demo)")
    p.add_argument("--steps", type=int, default=None, help="training steps (default: the demo's own)")
    p.add_argument("--quick", action="store_true", help="a shorter run (fewer steps, most answers learned)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: 1)")
    p.set_defaults(func=_cmd_demo)
    from .exporting.export_cli import add_export_parser
    add_export_parser(sub)
    from .bench.cli import add_bench_parser
    add_bench_parser(sub)
    from .models.info import add_info_parser
    add_info_parser(sub)
    from .studio.cli import add_studio_parser
    add_studio_parser(sub)
    from .convert.cli import add_convert_parser
    add_convert_parser(sub)
    from .infer.transcribe_cli import add_transcribe_parser
    add_transcribe_parser(sub)
    from .infer.speak_cli import add_speak_parser
    add_speak_parser(sub)
    return parser


def main(argv=None) -> int:
    from .errors import VelotuneError
    parser = build_parser()
    ns = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        code = ns.func(ns)  # a subcommand may return its exit status (e.g. 130 for a run stopped by Ctrl-C)
    except VelotuneError as exc:
        print(f"velotune: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("velotune: interrupted", file=sys.stderr)
        return 130
    return code if isinstance(code, int) else 0


def entry():
    """The `velotune` command and `python -m velotune` (what `torchrun -m velotune` starts)."""
    code = main()
    if "WORLD_SIZE" in os.environ:  # started by torchrun (cheap test first: the import below loads torch)
        from .training.distributed import exit_worker, torchrun_env
        if torchrun_env() is not None:  # a torchrun worker ends here: see exit_worker for why not by returning
            exit_worker(code)
    sys.exit(code)


if __name__ == "__main__":
    entry()
