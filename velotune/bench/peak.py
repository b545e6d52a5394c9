"""The machine's matrix-multiply throughput at a model's own shapes, in its own process:

    python -m velotune.bench.peak '{"model_dir": ..., "tokens": 2048, "dtype": "float32", "device": "cpu", ...}'

torch.mm of [tokens, in] x [in, out] for each distinct weight shape the model runs (flops.linear_shapes), in the
benchmark's dtype and thread count; each shape's best of a few timed repetitions after one warm-up. The figure
the utilisation divides by is the model-mix rate: all the shapes' FLOPs (each weighted by how often a forward
runs it) over their summed best times, i.e. what the model's matmuls would reach if nothing else cost time.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from .flops import linear_shapes
from .processes import emit, short_error

CPU_REPS, CUDA_REPS = 3, 10
CPU_SHAPE_SECONDS = 3.0  # stop repeating a shape once its timed runs took this long (large heads on one core)


def _time_mm(torch, a, b, reps: int, cuda: bool) -> float:
    torch.mm(a, b)  # warm-up: first-call costs, allocator
    best = float("inf")
    spent = 0.0
    for _ in range(reps):
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        torch.mm(a, b)
        if cuda:
            torch.cuda.synchronize()
        took = time.perf_counter() - start
        best, spent = min(best, took), spent + took
        if not cuda and spent > CPU_SHAPE_SECONDS:
            break
    return best


def measure(spec: dict) -> dict:
    import torch
    torch.set_num_threads(spec.get("threads", 1))
    config = json.loads((Path(spec["model_dir"]) / "config.json").read_text())
    device, dtype, tokens = torch.device(spec["device"]), getattr(torch, spec["dtype"]), spec["tokens"]
    cuda = device.type == "cuda"
    g = torch.Generator(device=device).manual_seed(0)
    timed, rows, total_flops, total_seconds = {}, [], 0.0, 0.0
    for name, fin, fout, count in linear_shapes(config):
        if (fin, fout) not in timed:
            a = torch.randn(tokens, fin, generator=g, device=device, dtype=dtype)
            b = torch.randn(fin, fout, generator=g, device=device, dtype=dtype)
            timed[(fin, fout)] = _time_mm(torch, a, b, CUDA_REPS if cuda else CPU_REPS, cuda)
            del a, b
        seconds, flops = timed[(fin, fout)], 2.0 * tokens * fin * fout
        rows.append(dict(name=name, shape=[tokens, fin, fout], count=count, tflops=round(flops / seconds / 1e12, 4)))
        total_flops, total_seconds = total_flops + flops * count, total_seconds + seconds * count
    name = torch.cuda.get_device_name(device) if cuda else "cpu"
    return dict(ok=True, matmul_tflops=round(total_flops / total_seconds / 1e12, 4), shapes=rows, device_name=name,
                dtype=spec["dtype"], threads=spec.get("threads", 1), tokens=tokens)


def main(argv=None):
    spec = json.loads((argv or sys.argv[1:])[0])
    try:
        result = measure(spec)
    except Exception as exc:  # reported, not raised: the benchmark goes on without a peak
        result = {"ok": False, "error": short_error(exc)}
    emit(result)


if __name__ == "__main__":
    main()
