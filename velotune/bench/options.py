"""The benchmarks' options, defined once for `velotune bench` and for the scripts in a clone's benchmarks/, and
the scripts' entry (`script_main`). No heavy imports: `velotune --help` builds these options."""
from __future__ import annotations

import argparse
import sys

from ..errors import VelotuneError


def add_bench_arguments(p):
    p.add_argument("--loop", action="store_true",
                   help="the transformers-style loop benchmark: one plain loop (model(input_ids=ids, labels=ids), "
                        "backward, AdamW) over velotune and over transformers + peft, LoRA on a Qwen2 shape")
    p.add_argument("--preference", action="store_true",
                   help="the DPO benchmark: velotune's dpo objective vs TRL's DPOTrainer + PEFT, LoRA, the 56M Llama "
                        "at vocabularies 32000 and 128256")
    p.add_argument("--grpo", action="store_true",
                   help="the GRPO benchmark: velotune's grpo objective vs TRL's GRPOTrainer + PEFT, LoRA, the 56M Llama "
                        "(sampling, scoring and training timed together)")
    p.add_argument("--quick", action="store_true",
                   help="tiny shapes, one repetition: checks the benchmark code works (under a minute)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    p.add_argument("--methods", help="comma-separated among lora,qlora,full (default: all; not with --loop)")
    p.add_argument("--cases", help="comma-separated case names of the device's plan (lora, qlora, full; on CUDA "
                                   "also qlora-long; default: all; not with --loop)")
    p.add_argument("--systems", help="comma-separated among velotune,velotune-gc,hf,hf-gc,liger,liger-gc "
                                     "(default: velotune,hf,hf-gc; on CUDA also liger,liger-gc; --loop: no liger)")
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
    p.add_argument("--seq-grain", dest="seq_grain", type=int,
                   help="for --max-seq-search: bisection step in tokens (default 256 on the CPU, 1024 on CUDA)")
    p.add_argument("--peak-tflops", dest="peak_tflops", type=float,
                   help="the peak that utilisation divides by (default: on CUDA the device's dense bf16/fp16 peak "
                        "from a table of known GPUs; on the CPU torch.mm measured at the model's shapes)")
    p.add_argument("--timeout", type=float, default=900, help="seconds one process may take (default 900)")
    p.add_argument("--out", help="directory for the result files (default: ./benchmarks/results when it exists, "
                                 "else ./velotune-bench-results)")
    p.add_argument("--no-save", dest="save", action="store_false", help="print only")
    return p


def script_main(run, argv=None, description: str = ""):
    """What a benchmarks/ script runs: the same options, and a one-line error for bad input (exit status 2)."""
    parser = add_bench_arguments(argparse.ArgumentParser(description=description))
    ns = parser.parse_args(argv)
    try:
        run(ns)
    except VelotuneError as exc:
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
