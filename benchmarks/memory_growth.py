"""Peak memory against the number of training steps: does a run's RSS stop growing after warm-up?

Each N in --steps trains a 0.8M-parameter Llama (LoRA r=8, packing on, the bundled demo's 390 chat samples,
max_seq_length 256, batch 4; bf16 by default) for N steps in a fresh process, on the CPU with one torch thread,
and prints: the peak RSS (VmHWM), the RSS after warm-up (step 10) and after the last step, and where the memory
is at the end: glibc heap in use / free but held by the arenas / mmapped chunks (mallinfo2); with
--count-shapes the distinct matmul and attention shapes (each is a set of kernels oneDNN compiles and caches);
with --tracemalloc the Python heap.

    python benchmarks/memory_growth.py                                  # steps 10 50 150 300
    python benchmarks/memory_growth.py --steps 10 150 --count-shapes --trajectory
    python benchmarks/memory_growth.py --env ONEDNN_PRIMITIVE_CACHE_CAPACITY=0 --env LRU_CACHE_CAPACITY=16
    python benchmarks/memory_growth.py --steps 10 150 --env MALLOC_ARENA_MAX=1 --trim-every-step

--env sets variables in each child before anything is imported; --trim-every-step calls malloc_trim(0) after each
optimizer step (how much of the RSS is free memory the allocator holds). Results and what they showed:
benchmarks/results/memory-growth-cpu.md.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WARMUP_STEPS = 10


def read_status() -> dict:
    """VmRSS and VmHWM (peak) of this process, in MiB."""
    values = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            values[key] = int(rest.split()[0]) / 1024
    return values


def glibc_heap() -> dict:
    """mallinfo2 in MiB: bytes in use, bytes free but held by the arenas, bytes in mmapped chunks."""
    import ctypes

    class MallInfo2(ctypes.Structure):
        _fields_ = [(name, ctypes.c_size_t) for name in
                    ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
                     "fordblks", "keepcost")]
    libc = ctypes.CDLL("libc.so.6")
    if not hasattr(libc, "mallinfo2"):
        return {}
    libc.mallinfo2.restype = MallInfo2
    info = libc.mallinfo2()
    mib = 1 / 2 ** 20
    return {"heap_in_use": info.uordblks * mib, "heap_free_held": info.fordblks * mib,
            "mmapped": info.hblkhd * mib}


def tiny_model_dir(root: Path) -> Path:
    """A 0.8M-parameter Llama (hidden 128, 4 layers, tied embeddings, random weights) with the demo's tokenizer."""
    from velotune.demo.dataset import DATASET_PATH, corpus_texts, load_dataset
    from velotune.demo.tiny_model import demo_config, init_weights
    from velotune.demo.tokenizer import train_demo_tokenizer
    from velotune.models.checkpoint import save_safetensors
    tokenizer = train_demo_tokenizer(corpus_texts(load_dataset(DATASET_PATH)))
    config = demo_config(tokenizer, "test")
    config.update(hidden_size=128, intermediate_size=344, num_hidden_layers=4, head_dim=32)
    path = root / "base"
    path.mkdir()
    (path / "config.json").write_text(json.dumps(config), encoding="utf-8")
    save_safetensors(init_weights(config, seed=0), path)
    tokenizer.save_pretrained(str(path))
    return path


def train_config(out_dir: Path, steps: int, args) -> dict:
    from velotune.demo.dataset import DATASET_PATH
    return {"model": {"dtype": args.dtype, "device": "cpu"},
            "lora": {"r": 8, "alpha": 16},
            "data": {"path": str(DATASET_PATH), "format": "messages", "max_seq_length": args.max_seq_length,
                     "packing": not args.no_packing},
            "train": {"output_dir": str(out_dir), "max_steps": steps, "batch_size": args.batch_size,
                      "lr": 1e-3, "seed": 0, "progress": False}}


def child(steps: int, args) -> dict:
    """Trains `steps` steps in this process and returns the measurements."""
    import torch
    from torch.optim.optimizer import register_optimizer_step_post_hook

    import velotune as vt
    torch.set_num_threads(args.threads)
    rss_after: dict[int, float] = {}
    shapes = ShapeCounter() if args.count_shapes else None

    def after_step(optimizer, *_):
        if args.trim_every_step:
            _malloc_trim()
        rss_after[len(rss_after) + 1] = read_status()["VmRSS"]
        if shapes:
            shapes.step_done()
    register_optimizer_step_post_hook(after_step)
    if args.tracemalloc:
        import tracemalloc
        tracemalloc.start(8)
    with tempfile.TemporaryDirectory() as tmp:
        model, tokenizer = vt.load(tiny_model_dir(Path(tmp)), dtype=args.dtype, device="cpu")
        start, began = read_status()["VmRSS"], time.perf_counter()
        with shapes or nullcontext():
            trained = vt.train(train_config(Path(tmp) / "run", steps, args), overrides=args.set, model=model,
                               tokenizer=tokenizer)
    seconds = time.perf_counter() - began
    result = {"steps": steps, "params": trained.params, "train_s": round(seconds, 1), "rss_before_train": start,
              "rss_after_warmup": rss_after.get(WARMUP_STEPS),
              "rss_last_step": rss_after[steps], "peak_rss": read_status()["VmHWM"],
              "rss_every_10": [round(rss_after[i]) for i in range(10, steps + 1, 10)], **glibc_heap()}
    if shapes:
        result["new_shapes"] = shapes.summary()
    if args.tracemalloc:
        result.update(_python_heap())
    return result


class ShapeCounter:
    """Counts the distinct (op, input shapes) of the ops that oneDNN caches kernels for (matmuls, attention),
    and how many first appear after warm-up: each is a new set of cached kernels."""
    OPS = ("mm", "addmm", "bmm", "matmul", "linear", "_scaled_dot_product_flash_attention_for_cpu",
           "_scaled_dot_product_flash_attention_for_cpu_backward")

    def __init__(self):
        from torch.utils._python_dispatch import TorchDispatchMode
        counter = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                name = func.overloadpacket.__name__
                if name in ShapeCounter.OPS:
                    key = (name, tuple(tuple(a.shape) for a in args if hasattr(a, "shape")))
                    counter.seen.setdefault(key, counter.step)
                return func(*args, **(kwargs or {}))
        self.mode, self.seen, self.step = Mode(), {}, 0

    def __enter__(self):
        self.mode.__enter__()
        return self

    def __exit__(self, *exc):
        return self.mode.__exit__(*exc)

    def step_done(self):
        self.step += 1

    def summary(self) -> dict:
        firsts = list(self.seen.values())
        return {"total": len(firsts), "after_warmup": sum(s >= WARMUP_STEPS for s in firsts)}


def _malloc_trim():
    import ctypes
    ctypes.CDLL("libc.so.6").malloc_trim(0)


def _python_heap(top: int = 5) -> dict:
    import tracemalloc
    snapshot = tracemalloc.take_snapshot()
    stats = snapshot.statistics("lineno")
    return {"python_heap": sum(s.size for s in stats) / 2 ** 20,
            "python_top": [f"{s.size / 2 ** 20:.2f} MiB {s.traceback}" for s in stats[:top]]}


def run_fresh(steps: int, argv: list[str], env_settings: list[str]) -> dict:
    """Runs this script as a child that trains `steps` steps; returns its measurements."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.update(item.split("=", 1) for item in env_settings)
    proc = subprocess.run([sys.executable, __file__, "--child", str(steps), *argv], env=env, capture_output=True,
                          text=True, cwd=ROOT)
    if proc.returncode:
        raise SystemExit(f"the {steps}-step run failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, nargs="+", default=[10, 50, 150, 300])
    parser.add_argument("--env", action="append", default=[], help="KEY=VALUE set in each child process")
    parser.add_argument("--trim-every-step", action="store_true")
    parser.add_argument("--tracemalloc", action="store_true")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--count-shapes", action="store_true",
                        help="count distinct matmul/attention shapes, and those first seen after warm-up")
    parser.add_argument("--trajectory", action="store_true", help="also print RSS after every 10th step")
    parser.add_argument("--no-packing", action="store_true")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-seq-length", type=int, default=256)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--set", action="append", default=[], help="a config override such as train.precision=bf16")
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args)))
        return
    print(f"{' '.join(sys.argv[1:]) or 'defaults'}: RSS in MiB")
    print(f"{'steps':>5} {'peak':>6} {'warm-up':>8} {'last':>6} {'heap in use':>11} {'free held':>9} {'mmapped':>8} "
          f"{'train s':>7}")
    for i, steps in enumerate(args.steps):
        r = run_fresh(steps, sys.argv[1:], args.env)
        if i == 0:
            print(f"model: {r['params']['total_params']:,} parameters, {r['params']['trainable_params']:,} trainable")
        print(f"{steps:>5} {r['peak_rss']:>6.0f} {r['rss_after_warmup'] or 0:>8.0f} {r['rss_last_step']:>6.0f} "
              f"{r.get('heap_in_use', 0):>11.0f} {r.get('heap_free_held', 0):>9.0f} {r.get('mmapped', 0):>8.0f} "
              f"{r['train_s']:>7.1f}")
        if "new_shapes" in r:
            print("       distinct matmul/attention shapes: {total}, first seen after warm-up: {after_warmup}"
                  .format(**r["new_shapes"]))
        if args.trajectory:
            print("       RSS after every 10th step:", r["rss_every_10"])
        if "python_heap" in r:
            print(f"       Python heap (tracemalloc): {r['python_heap']:.1f} MiB; largest:")
        for line in r.get("python_top", []):
            print("      ", line)


if __name__ == "__main__":
    main()
