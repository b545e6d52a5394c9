"""`velotune bench`: the training benchmark (velotune against transformers + peft, side by side).

The benchmark's code lives in the repository's `benchmarks/` folder, not in the installed package: this command
finds it beside the package (a clone, or an editable install) and runs it. The options are defined here once,
for both `velotune bench` and `python benchmarks/train_bench.py`.
"""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

from .errors import VelotuneError

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "train_bench.py"


def add_bench_arguments(p):
    p.add_argument("--quick", action="store_true",
                   help="tiny shapes, one repetition: checks the benchmark code works (under a minute)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    p.add_argument("--methods", help="comma-separated among lora,qlora,full (default: all)")
    p.add_argument("--systems", help="comma-separated among velotune,velotune-gc,hf,hf-gc,liger,liger-gc "
                                     "(default: velotune,hf,hf-gc; on CUDA also liger,liger-gc)")
    p.add_argument("--reps", type=int, help="processes per system and case, alternating (default: 3 on the CPU)")
    p.add_argument("--steps", type=int, help="timed optimizer steps per process")
    p.add_argument("--warmup", type=int, help="untimed steps first (allocations, first-call costs)")
    p.add_argument("--seq", type=int, help="max sequence length (rows are packed up to it)")
    p.add_argument("--batch", type=int, help="rows per batch")
    p.add_argument("--dtype", choices=("float32", "bfloat16"),
                   help="weights and compute dtype for every system (default: float32 on the CPU, bfloat16 on CUDA)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process (default 1: steadier)")
    p.add_argument("--max-seq-search", dest="max_seq_search", action="store_true",
                   help="also find the longest sequence that trains within --memory-budget-mb (first case only)")
    p.add_argument("--memory-budget-mb", dest="memory_budget_mb", type=float,
                   help="for --max-seq-search: peak RSS (CPU) or GPU memory (CUDA) allowed; default 2500 / 24576")
    p.add_argument("--seq-limit", dest="seq_limit", type=int, help="for --max-seq-search: longest length tried")
    p.add_argument("--peak-tflops", dest="peak_tflops", type=float,
                   help="the device's dense peak, for MFU (default: known GPUs' bf16 peak; none on the CPU)")
    p.add_argument("--timeout", type=float, default=900, help="seconds one process may take (default 900)")
    p.add_argument("--out", help="directory for the result files (default: benchmarks/results)")
    p.add_argument("--no-save", dest="save", action="store_false", help="print only")
    return p


def add_bench_parser(subparsers):
    p = subparsers.add_parser("bench", help="benchmark training against transformers + peft, side by side")
    add_bench_arguments(p)
    p.set_defaults(func=_cmd_bench)
    return p


def load_bench_module():
    """benchmarks/train_bench.py as a module (registered in sys.modules first: its dataclasses need that)."""
    if not SCRIPT.is_file():
        raise VelotuneError(f"velotune bench runs benchmarks/train_bench.py from a clone of the repository; "
                            f"{SCRIPT} is not there (the benchmarks are not part of the installed package)")
    name = "velotune_train_bench"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, SCRIPT)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        try:
            spec.loader.exec_module(module)
        except BaseException:
            del sys.modules[name]
            raise
    return sys.modules[name]


def _cmd_bench(ns):
    load_bench_module().run(ns)
