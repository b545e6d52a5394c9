"""Each measurement runs in a process of its own (`python -m velotune.bench.<module> SPEC`) and reports one JSON
line on stdout, prefixed by MARKER; the driver never holds torch, transformers or GPU memory of its own."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Callable

MARKER = "BENCH_RESULT "
PACKAGE_PARENT = Path(__file__).resolve().parent.parent.parent  # the folder that holds velotune/


def child_env(threads: int) -> dict:
    """The child's environment: `threads` CPU threads, no hub access, and this very velotune importable first
    (a clone that is not installed works too)."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="false",
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TRANSFORMERS_VERBOSITY="error",
               PYTHONWARNINGS="ignore")
    rest = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and p != str(PACKAGE_PARENT)]
    env["PYTHONPATH"] = os.pathsep.join([str(PACKAGE_PARENT)] + rest)
    return env


def run_module(module: str, spec: dict, *, timeout: float, threads: int) -> dict:
    """`python -m module SPEC`: its MARKER line, or an error result (crash, timeout, killed)."""
    cmd = [sys.executable, "-m", module, json.dumps(spec)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=child_env(threads))
    except subprocess.TimeoutExpired:
        return {"ok": False, "error": f"timed out after {timeout:.0f} s"}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(MARKER):
            return json.loads(line[len(MARKER):])
    why = "killed (out of memory?)" if proc.returncode in (-9, 137) else f"exited with {proc.returncode}"
    tail = " | ".join(proc.stderr.strip().splitlines()[-3:])
    return {"ok": False, "error": f"{module} {why} without a result: {tail[-400:]}"}


def emit(result: dict) -> None:
    print(MARKER + json.dumps(result), flush=True)


def short_error(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}"
    return "OOM: " + text[:200] if "out of memory" in text.lower() else text[:400]


def alternating(items: list, rep: int) -> list:
    """A B C at even repetitions, C B A at odd ones: no system always runs first (or after the same one)."""
    return list(items) if rep % 2 == 0 else list(items)[::-1]


def worker_main(run: Callable[[dict], dict], argv=None) -> None:
    """A measuring process: reads its spec, sets the torch threads, runs `run(spec)` and prints one result line; an
    error is reported in the result, not raised (one failing system must not stop the others)."""
    import time
    import traceback
    spec = json.loads((argv or sys.argv[1:])[0])
    import torch
    torch.set_num_threads(spec.get("threads", 1))
    started = time.perf_counter()
    try:
        result = run(spec)
        result.update(ok=True, device_name=torch.cuda.get_device_name() if spec["device"].startswith("cuda")
                      else "cpu")
    except Exception as exc:
        result = {"ok": False, "error": short_error(exc), "traceback": traceback.format_exc(limit=6)}
    result.update(system=spec["system"], wall_s=round(time.perf_counter() - started, 2))
    emit(result)
