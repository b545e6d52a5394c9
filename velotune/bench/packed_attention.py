"""Attention over packed rows on the CPU: the three ways velotune's segments path could slice them, timed side by
side (forward + backward, one thread), at three sample-length mixes, fp32 and bf16.

    python benchmarks/packed_attention.py            # 2 rows of 2048 tokens, Qwen2-384's heads (6 of 64, 2 kv)
    python benchmarks/packed_attention.py --quick    # smaller rows, one repetition

- one by one: SDPA with `is_causal` on each sample's slice (varlen.WINDOW_TOKENS = 0);
- together (the default): samples shorter than varlen.WINDOW_TOKENS run with their neighbours in one slice with a
  block-diagonal mask; longer ones alone;
- dense: the whole row with its [T, T] block-diagonal mask.
Every strategy's output is compared with the dense one (max |difference|). Results: <out>/packed-attention-cpu.json
and .md.
"""
from __future__ import annotations

import argparse
import os
import random
import statistics
import time
from pathlib import Path

from .machine import default_out_dir, load_average, machine_info, machine_markdown, write_results

MIXES = {"short (8-64 tokens)": (8, 64), "medium (40-400)": (40, 400), "long (200-1200)": (200, 1200)}
STRATEGIES = ("one by one", "together", "dense")


def packed_documents(torch, rows: int, length: int, low: int, high: int, seed: int = 0):
    """[rows, length] document ids: samples of random lengths in [low, high] back to back (the last one cut)."""
    rng = random.Random(seed)
    docs = torch.zeros(rows, length, dtype=torch.long)
    for b in range(rows):
        t = i = 0
        while t < length:
            n = min(rng.randint(low, high), length - t)
            docs[b, t:t + n] = i
            t, i = t + n, i + 1
    return docs


def time_strategy(torch, strategy: str, q, k, v, docs, reps: int) -> tuple[float, object]:
    """(median seconds of forward + backward, the output) for one strategy."""
    from velotune.kernels import varlen
    from velotune.models.attention import AttentionMask, attend
    saved = varlen.WINDOW_TOKENS
    env = "dense" if strategy == "dense" else "segments"
    varlen.WINDOW_TOKENS = 0 if strategy == "one by one" else saved
    before = os.environ.get("VELOTUNE_ATTENTION")
    os.environ["VELOTUNE_ATTENTION"] = env
    try:
        times = []
        for _ in range(reps + 1):  # the first is a warm-up
            mask = AttentionMask(docs.shape[1], docs.shape[1], docs.device, doc_ids=docs)  # fresh: no memo
            leaves = [t.detach().requires_grad_() for t in (q, k, v)]
            start = time.perf_counter()
            out = attend(*leaves, mask)
            out.float().sum().backward()
            times.append(time.perf_counter() - start)
        return statistics.median(times[1:]), out.detach().float()
    finally:
        varlen.WINDOW_TOKENS = saved
        if before is None:
            os.environ.pop("VELOTUNE_ATTENTION", None)
        else:
            os.environ["VELOTUNE_ATTENTION"] = before


def run(ns) -> dict:
    import torch
    torch.set_num_threads(ns.threads)
    rows, length = (2, 512) if ns.quick else (2, 2048)
    reps = 1 if ns.quick else ns.reps
    results = []
    for dtype in (torch.float32, torch.bfloat16):
        for mix, (low, high) in MIXES.items():
            docs = packed_documents(torch, rows, length, low, high)
            gen = torch.Generator().manual_seed(0)
            q, k, v = (torch.randn(rows, heads, length, 64, generator=gen).to(dtype) for heads in (6, 2, 2))
            samples = int((docs[:, 1:] != docs[:, :-1]).sum()) + rows
            row = dict(dtype=str(dtype).replace("torch.", ""), mix=mix, samples=samples)
            outs = {}
            for strategy in STRATEGIES:
                row[strategy], outs[strategy] = time_strategy(torch, strategy, q, k, v, docs, reps)
            row["max_diff_vs_dense"] = {s: float((outs[s] - outs["dense"]).abs().max()) for s in STRATEGIES[:2]}
            if row["max_diff_vs_dense"]["together"] > (1e-5 if dtype == torch.float32 else 0.05):
                raise SystemExit(f"{mix}, {row['dtype']}: the slices' output differs from the dense mask's")
            results.append(row)
            print(line(row), flush=True)
    return dict(rows=rows, length=length, reps=reps, threads=ns.threads, results=results)


def line(r: dict) -> str:
    times = "  ".join(f"{s} {r[s] * 1000:7.1f} ms" for s in STRATEGIES)
    return f"{r['dtype']:8s} {r['mix']:20s} {r['samples']:4d} samples  {times}  together vs one by one " \
           f"{r['one by one'] / r['together']:.2f}x, vs dense {r['dense'] / r['together']:.2f}x"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="2 rows of 512 tokens, one repetition")
    p.add_argument("--reps", type=int, default=5, help="timed repetitions (median; default 5)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", help="directory for the result files (default: ./benchmarks/results)")
    p.add_argument("--no-save", dest="save", action="store_false")
    ns = p.parse_args(argv)
    started, load = time.time(), load_average()
    result = run(ns)
    info = machine_info(["cpu"], load, time.time() - started)
    from velotune.kernels.varlen import WINDOW_TOKENS
    text = "\n".join([
        "# Attention over packed rows on the CPU: sample by sample, short samples together, dense mask", "",
        f"Command: `{info['command']}`  ",
        f"{result['rows']} rows of {result['length']} tokens, 6 query / 2 key-value heads of 64, causal within each "
        f"sample; forward + backward of the attention alone, median of {result['reps']}; {result['threads']} "
        f"thread(s). together: neighbours shorter than {WINDOW_TOKENS} tokens in one slice with a block-diagonal "
        "mask (velotune's default).", "",
        "| dtype | samples | count | one by one ms | together ms | dense ms | together vs one by one | vs dense "
        "| max diff vs dense: one by one, together |",
        "|---|---|---|---|---|---|---|---|---|",
        *(f"| {r['dtype']} | {r['mix']} | {r['samples']} | {r['one by one'] * 1000:.1f} | {r['together'] * 1000:.1f} "
          f"| {r['dense'] * 1000:.1f} | {r['one by one'] / r['together']:.2f}x | {r['dense'] / r['together']:.2f}x "
          f"| {r['max_diff_vs_dense']['one by one']:.2g}, {r['max_diff_vs_dense']['together']:.2g} |"
          for r in result["results"]), "", *machine_markdown(info)])
    if ns.save:
        where = write_results(Path(ns.out) if ns.out else default_out_dir(), "packed-attention-cpu"
                              + ("-quick" if ns.quick else ""), {"machine": info, **result}, text)
        print(f"wrote {where}.json and .md")


if __name__ == "__main__":
    main()
