"""The Triton kernels against plain PyTorch at realistic shapes (Llama-3.1-8B's), compiled on a GPU, bf16 and fp16.

    python -m velotune.bench.gpu_kernels --device cuda     # the GPU check (benchmarks/gpu_suite.sh runs it)
    python -m velotune.bench.gpu_kernels --quick           # CPU: tiny shapes, Triton interpreter, fp16 only

For each op (through velotune's own dispatch: VELOTUNE_KERNELS=triton, then =reference) every output and every
input gradient is compared with a float64 oracle on the same rounded inputs; the kernel passes when its error is
at most twice plain PyTorch's own error in that dtype (the rule of tests/kernel_checks.py). NF4 dequantization is
compared bit for bit with bitsandbytes. On CUDA each op's forward + backward is also timed (median of 10) with its
peak memory. Results: <out>/kernels-<device>.json and .md; exit status 1 when a check fails.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

from .machine import default_out_dir, machine_info, machine_markdown, write_results

FACTOR, TINY = 2.0, 1e-6
REALISTIC = dict(tokens=8192, hidden=4096, inter=14336, heads=32, kv_heads=8, head_dim=128, seq=4096,
                 vocab=128256, ce_tokens=4096, experts=8)
QUICK = dict(tokens=37, hidden=96, inter=160, heads=4, kv_heads=2, head_dim=32, seq=17, vocab=1000, ce_tokens=45,
             experts=4)
# How a mixture-of-experts layer's rows split over its experts (Mixtral's shape: 8 experts, `tokens` rows of
# (token, expert) pairs): uneven, one expert given none (the kernel's empty-group path).
EXPERT_SHARES = (0.22, 0.0, 0.05, 0.18, 0.1, 0.15, 0.2, 0.1)


def rel_err(torch, a, ref) -> float:
    a, ref = a.double(), ref.double()
    return ((a - ref).norm() / ref.norm().clamp(min=1e-30)).item()


# ---- the ops: (inputs in float64, which need gradients), the op, its float64 oracle ------------------------------

def cases(torch, s: dict, device):
    """name -> (make_inputs(), op, oracle); ops go through velotune's dispatch, oracles are plain float64 maths."""
    import torch.nn.functional as F

    from velotune.kernels import apply_rope, geglu, linear_cross_entropy, rms_norm, swiglu
    from velotune.kernels.grouped_mm import grouped_linear
    g = torch.Generator(device=device).manual_seed(0)
    counts = expert_counts(s["tokens"], s["experts"])

    def randn(*shape, scale=1.0, grad=True):
        return (torch.randn(*shape, generator=g, device=device, dtype=torch.float64) * scale, grad)

    def rope_inputs():
        inv = 1.0 / (500000.0 ** (torch.arange(0, s["head_dim"], 2, device=device, dtype=torch.float64)
                                  / s["head_dim"]))
        angles = torch.arange(s["seq"], device=device, dtype=torch.float64)[:, None] * inv[None]
        angles = torch.cat((angles, angles), dim=-1)[None]
        return [randn(1, s["heads"], s["seq"], s["head_dim"]), randn(1, s["kv_heads"], s["seq"], s["head_dim"]),
                (angles.cos(), False), (angles.sin(), False)]

    def ce_inputs():
        targets = torch.randint(0, s["vocab"], (s["ce_tokens"],), generator=g, device=device)
        targets[torch.rand(s["ce_tokens"], generator=g, device=device) < 0.1] = -100
        return [randn(s["ce_tokens"], s["hidden"]), randn(s["vocab"], s["hidden"], scale=0.02), (targets, False)]

    def rms_oracle(offset):
        return lambda x, w: x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * (offset + w)

    def rope_oracle(q, k, cos, sin):
        def rotate(x):
            half = x.shape[-1] // 2
            return torch.cat((-x[..., half:], x[..., :half]), dim=-1)
        cos, sin = cos[:, None], sin[:, None]
        return q * cos + rotate(q) * sin, k * cos + rotate(k) * sin

    def ce_oracle(reduction, softcap=None):
        def oracle(h, w, t):
            logits = h @ w.t()
            if softcap:
                logits = torch.tanh(logits / softcap) * softcap
            return F.cross_entropy(logits, t, ignore_index=-100, reduction=reduction)
        return oracle

    def grouped_inputs():
        return [randn(s["tokens"], s["hidden"])] + [randn(s["inter"], s["hidden"], scale=0.02)
                                                      for _ in range(s["experts"])]

    return {
        "rms_norm": (lambda: [randn(s["tokens"], s["hidden"]), randn(s["hidden"], scale=0.1)],
                     lambda x, w: rms_norm(x, w + 1.0, 1e-5), lambda x, w: rms_oracle(0.0)(x, w + 1.0)),
        "rms_norm (gemma, 1 + w)": (lambda: [randn(s["tokens"], s["hidden"]), randn(s["hidden"], scale=0.1)],
                                    lambda x, w: rms_norm(x, w, 1e-5, 1.0), rms_oracle(1.0)),
        "rms_norm (gpt-oss, w first)": (lambda: [randn(s["tokens"], s["hidden"]), randn(s["hidden"], scale=0.1)],
                                        lambda x, w: rms_norm(x, w + 1.0, 1e-5, 0.0, True),
                                        lambda x, w: rms_oracle(0.0)(x, w + 1.0)),
        "rope": (rope_inputs, apply_rope, rope_oracle),
        "swiglu": (lambda: [randn(s["tokens"], s["inter"]), randn(s["tokens"], s["inter"])], swiglu,
                   lambda a, b: F.silu(a) * b),
        "geglu (tanh)": (lambda: [randn(s["tokens"], s["inter"]), randn(s["tokens"], s["inter"])], geglu,
                         lambda a, b: F.gelu(a, approximate="tanh") * b),
        "linear_cross_entropy": (ce_inputs, lambda h, w, t: linear_cross_entropy(h, w, t), ce_oracle("sum")),
        # each row's loss, each with its own output gradient: the path preference and RL objectives take
        "linear_cross_entropy (per row)": (ce_inputs, lambda h, w, t: linear_cross_entropy(h, w, t, reduction="none"),
                                           ce_oracle("none")),
        "linear_cross_entropy (softcap 30)": (ce_inputs, lambda h, w, t: linear_cross_entropy(h, w, t, softcap=30.0),
                                              ce_oracle("sum", softcap=30.0)),
        "grouped_linear (MoE)": (grouped_inputs, lambda x, *ws: grouped_linear(x, ws, counts),
                                 lambda x, *ws: torch.cat([p @ w.t() for p, w in zip(x.split(counts), ws)])),
    }


def expert_counts(rows: int, experts: int) -> list[int]:
    """`rows` split over `experts` by EXPERT_SHARES (the last expert takes the remainder)."""
    shares = EXPERT_SHARES[:experts]
    counts = [int(rows * share / sum(shares)) for share in shares[:-1]]
    return counts + [rows - sum(counts)]


# ---- one check ---------------------------------------------------------------------------------------------------

def _run(torch, fn, inputs, grads, dtype, dys=None):
    leaves = [x.detach().to(dtype).requires_grad_() if need else x for x, need in zip(inputs, grads)]
    outs = fn(*leaves)
    outs = outs if isinstance(outs, tuple) else (outs,)
    if dys is None:
        gen = torch.Generator(device=outs[0].device).manual_seed(1)
        dys = [torch.randn(o.shape, generator=gen, device=o.device, dtype=torch.float64) for o in outs]
    wanted = [leaf for leaf, need in zip(leaves, grads) if need]
    got = torch.autograd.grad(outs, wanted, [d.to(o.dtype) for d, o in zip(dys, outs)])
    return [o.detach() for o in outs] + list(got), dys, type(outs[0].grad_fn).__name__


def _timed(torch, fn, inputs, grads, dtype, dys, cuda: bool) -> dict:
    if not cuda:
        return {}
    _run(torch, fn, inputs, grads, dtype, dys)  # warm-up: compilation, autotuning
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    times = []
    for _ in range(10):
        torch.cuda.synchronize()
        start = time.perf_counter()
        _run(torch, fn, inputs, grads, dtype, dys)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return dict(ms=round(1000 * statistics.median(times), 3),
                peak_mb=round((torch.cuda.max_memory_allocated() - base) / 2**20, 1))


def check(torch, name, make_inputs, op, oracle, dtype, cuda: bool) -> dict:
    from velotune.kernels.dispatch import forced_kernels as kernels
    pairs = make_inputs()
    inputs, grads = [p[0] for p in pairs], [p[1] for p in pairs]
    rounded = [x.to(dtype) if x.is_floating_point() else x for x in inputs]  # every run sees the same values
    exact, dys, _ = _run(torch, oracle, [x.double() if x.is_floating_point() else x for x in rounded], grads,
                      torch.float64)
    with kernels("triton"):
        ours, _, kernel_fn = _run(torch, op, rounded, grads, dtype, dys)
        kernel_time = _timed(torch, op, rounded, grads, dtype, dys, cuda)
    with kernels("reference"):
        plain, _, plain_fn = _run(torch, op, rounded, grads, dtype, dys)
        plain_time = _timed(torch, op, rounded, grads, dtype, dys, cuda)
    labels = [f"out{i}" for i in range(len(exact) - sum(grads))] + [f"grad{i}" for i in range(sum(grads))]
    rows = [dict(what=label, kernel_err=rel_err(torch, k, e), torch_err=rel_err(torch, p, e))
            for label, k, p, e in zip(labels, ours, plain, exact)]
    # a different autograd node shows the kernel really ran (not the reference under another name)
    ok = kernel_fn != plain_fn and all(r["kernel_err"] <= FACTOR * r["torch_err"] + TINY for r in rows)
    return dict(op=name, dtype=str(dtype).replace("torch.", ""), ok=ok, errors=rows, autograd=[kernel_fn, plain_fn],
                shapes=[list(x.shape) for x in inputs], kernel=kernel_time, reference=plain_time)


def check_nf4(torch, s: dict, device, cuda: bool) -> dict:
    """dequantize_4bit (Triton) bit for bit against bitsandbytes' own dequantization of the same weight."""
    try:
        import bitsandbytes.functional as bnbf
    except ImportError:
        return dict(op="nf4 dequantize", ok=True, skipped="bitsandbytes is not installed")
    from velotune.kernels.dispatch import forced_kernels as kernels
    from velotune.kernels.nf4 import dequantize_4bit
    rows, cols = (s["inter"], s["hidden"]) if cuda else (128, 64)  # bitsandbytes' CPU kernel: rows of 64 only
    w = torch.randn(rows, cols, device=device, generator=torch.Generator(device=device).manual_seed(0))
    packed, state = bnbf.quantize_4bit(w.to(torch.bfloat16 if cuda else torch.float32), blocksize=64,
                                       quant_type="nf4", compress_statistics=True)
    expected = bnbf.dequantize_4bit(packed, state)
    with kernels("triton"):
        ours = dequantize_4bit(packed, state)
    return dict(op="nf4 dequantize", dtype=str(ours.dtype).replace("torch.", ""), shapes=[[rows, cols]],
                ok=bool(torch.equal(ours, expected)), max_abs_diff=float((ours.float() - expected.float()).abs().max()))


# ---- the run ------------------------------------------------------------------------------------------------------

def run(device: str, quick: bool) -> list:
    import torch
    cuda = torch.device(device).type == "cuda"
    shapes = QUICK if quick else REALISTIC
    dtypes = [torch.float16] if quick else [torch.bfloat16, torch.float16]
    results = []
    for name, (make_inputs, op, oracle) in cases(torch, shapes, device).items():
        for dtype in dtypes:
            try:
                results.append(check(torch, name, make_inputs, op, oracle, dtype, cuda))
            except Exception as exc:  # one failing op must not hide the others
                results.append(dict(op=name, dtype=str(dtype).replace("torch.", ""), ok=False,
                                    error=f"{type(exc).__name__}: {exc}"[:400]))
            print(line(results[-1]), flush=True)
            if cuda:
                torch.cuda.empty_cache()
    results.append(check_nf4(torch, shapes, device, cuda))
    print(line(results[-1]), flush=True)
    return results


def line(r: dict) -> str:
    head = f"{r['op']:33s} {r.get('dtype', ''):9s} {'ok  ' if r['ok'] else 'FAIL'}"
    if "error" in r or "skipped" in r:
        return f"{head} {r.get('error') or r.get('skipped')}"
    if "errors" not in r:
        return f"{head} bit-exact: {r['ok']} (max |diff| {r['max_abs_diff']:.3g})"
    worst = max(r["errors"], key=lambda e: e["kernel_err"] / (e["torch_err"] + TINY))
    ran = f"  ({r['autograd'][0]} vs {r['autograd'][1]})"
    speed = ""
    if r["kernel"]:
        speed = (f"  fwd+bwd {r['kernel']['ms']:.2f} ms vs {r['reference']['ms']:.2f} ms, peak "
                 f"{r['kernel']['peak_mb']:.0f} vs {r['reference']['peak_mb']:.0f} MB")
    return f"{head} worst {worst['what']}: {worst['kernel_err']:.2e} (torch {worst['torch_err']:.2e}){speed}{ran}"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda", help="cuda (default) or cpu (Triton interpreter)")
    p.add_argument("--quick", action="store_true", help="tiny shapes, fp16 only")
    p.add_argument("--out", help="directory for the result files (default: ./benchmarks/results or "
                                 "./velotune-bench-results)")
    p.add_argument("--no-save", dest="save", action="store_false")
    ns = p.parse_args(argv)
    if not ns.device.startswith("cuda"):
        os.environ["TRITON_INTERPRET"] = "1"  # before any Triton kernel is defined: triton.jit reads it then
    started = time.time()
    results = run(ns.device, ns.quick)
    import torch
    device_name = torch.cuda.get_device_name(ns.device) if ns.device.startswith("cuda") else "cpu"
    info = machine_info([device_name], None, time.time() - started)
    text = "\n".join([f"# Triton kernels vs plain PyTorch ({ns.device})", "", f"Command: `{info['command']}`  ",
                      f"Pass: kernel error <= {FACTOR}x PyTorch's own error in the dtype (both against float64).",
                      "", *(f"- {line(r)}" for r in results), "", *machine_markdown(info)])
    if ns.save:
        name = f"kernels-{'cuda' if ns.device.startswith('cuda') else 'cpu'}{'-quick' if ns.quick else ''}"
        where = write_results(Path(ns.out) if ns.out else default_out_dir(), name, {"machine": info,
                              "results": results}, text)
        print(f"wrote {where}.json and .md")
    failed = [r for r in results if not r["ok"]]
    print(f"{len(results) - len(failed)} passed, {len(failed)} failed")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
