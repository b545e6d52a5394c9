"""Training speed and memory: velotune against transformers + peft (+ bitsandbytes), side by side.

    python benchmarks/train_bench.py                  # CPU: LoRA, QLoRA, full on a 56M Llama shape (~10 min)
    python benchmarks/train_bench.py --quick          # tiny shapes, under a minute: keeps this code working
    python benchmarks/train_bench.py --device cuda    # Llama-3.1-8B-shaped QLoRA / LoRA, 1B full, long context
    velotune bench ...                                # the same, from the velotune command

Every case (method x system) runs in its own process (bench_worker.py), alternating the systems (A B C, then
C B A, ...), on one random-weight checkpoint and one synthetic data file built once and cached. Reported are
medians over the processes of: real target tokens/s (non-padding tokens that carry a loss), peak memory, and
with --max-seq-search the longest sequence that trains within a memory budget. Results go to
benchmarks/results/train-<device>-<shape>.json and .md with the machine, the versions and the exact command.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
for path in (str(HERE), str(REPO)):
    if path not in sys.path:
        sys.path.insert(0, path)

import bench_assets  # noqa: E402
import bench_report  # noqa: E402
from bench_worker import MARKER, METHODS, SYSTEMS  # noqa: E402


@dataclass(frozen=True)
class Case:
    method: str
    shape: str
    seq: int
    batch: int
    kind: str = "chat"       # bench_assets.DOC_KINDS
    label: str = ""

    @property
    def name(self) -> str:
        return self.label or self.method


def _cases(shape, seq, batch):
    return [Case(m, shape, seq, batch) for m in METHODS]


# Per device: cases, systems, repetitions, steps, and the --max-seq-search settings (grain, limit, budget MB).
PLANS = {
    "cpu": dict(cases=_cases("llama-56m", 1024, 1), systems=["velotune", "hf", "hf-gc"], reps=3, warmup=1,
                steps=3, lr=2e-4, grain=256, seq_limit=8192, budget_mb=2500),
    "cpu-quick": dict(cases=_cases("tiny", 128, 1), systems=["velotune", "hf"], reps=1, warmup=1, steps=2,
                      lr=2e-4, grain=64, seq_limit=512, budget_mb=1024),
    "cuda": dict(cases=[Case("qlora", "llama-3.1-8b", 2048, 2), Case("lora", "llama-3.1-8b", 2048, 2),
                        Case("full", "llama-3.2-1b", 2048, 2),
                        Case("qlora", "llama-3.1-8b", 16384, 1, kind="long", label="qlora-long")],
                 systems=["velotune", "hf", "hf-gc", "liger", "liger-gc"], reps=1, warmup=2, steps=5, lr=2e-4,
                 grain=1024, seq_limit=131072, budget_mb=24576),
    "cuda-quick": dict(cases=_cases("tiny", 256, 2), systems=["velotune", "hf", "liger"], reps=1, warmup=1,
                       steps=2, lr=2e-4, grain=256, seq_limit=2048, budget_mb=4096),
}


def parse_args(argv=None):
    import argparse

    from velotune.bench_cli import add_bench_arguments
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    return add_bench_arguments(parser).parse_args(argv)


def make_plan(ns) -> dict:
    device = "cuda" if ns.device.startswith("cuda") else "cpu"
    plan = dict(PLANS[device + ("-quick" if ns.quick else "")], device=ns.device, quick=ns.quick)
    plan["dtype"] = ns.dtype or ("bfloat16" if device == "cuda" else "float32")
    for key in ("reps", "steps", "warmup", "seq_limit"):
        if getattr(ns, key, None) is not None:
            plan[key] = getattr(ns, key)
    if ns.memory_budget_mb:
        plan["budget_mb"] = ns.memory_budget_mb
    if ns.systems:
        plan["systems"] = _pick(ns.systems, SYSTEMS, "--systems")
    cases = plan["cases"]
    if ns.methods:
        methods = _pick(ns.methods, METHODS, "--methods")
        cases = [c for c in cases if c.method in methods]
    if ns.seq or ns.batch:
        cases = [replace(c, seq=ns.seq or c.seq, batch=ns.batch or c.batch) for c in cases]
    if plan["warmup"] < 0 or plan["steps"] < 1 or plan["reps"] < 1:
        raise SystemExit("--steps and --reps must be at least 1, --warmup at least 0")
    plan.update(cases=cases, threads=ns.threads, peak_tflops=ns.peak_tflops, timeout=ns.timeout)
    return plan


def _pick(text: str, known, flag: str) -> list:
    picked = [t.strip() for t in text.split(",") if t.strip()]
    unknown = [t for t in picked if t not in known]
    if unknown or not picked:
        raise SystemExit(f"{flag}: unknown {', '.join(unknown) or '(empty)'}; expected some of {', '.join(known)}")
    return picked


# ---- running the workers ----------------------------------------------------------------------------------------

def worker_env(threads: int) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="false",
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TRANSFORMERS_VERBOSITY="error",
               PYTHONWARNINGS="ignore")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    return env


def run_worker(spec: dict, plan: dict) -> dict:
    """One process, one case; its JSON line back, or an error result (crash, timeout, killed)."""
    cmd = [sys.executable, str(HERE / "bench_worker.py"), json.dumps(spec)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=plan["timeout"], cwd=str(REPO),
                              env=worker_env(plan["threads"]))
    except subprocess.TimeoutExpired:
        return {"ok": False, "error": f"timed out after {plan['timeout']:.0f} s"}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(MARKER):
            return json.loads(line[len(MARKER):])
    why = "killed (out of memory?)" if proc.returncode in (-9, 137) else f"exited with {proc.returncode}"
    tail = " | ".join(proc.stderr.strip().splitlines()[-3:])
    return {"ok": False, "error": f"worker {why} without a result: {tail[-400:]}"}


def make_spec(case: Case, system: str, plan: dict, cache: Path, **overrides) -> dict:
    case = replace(case, **{k: v for k, v in overrides.items() if k in ("seq", "batch", "kind")})
    steps, warmup = overrides.get("steps", plan["steps"]), overrides.get("warmup", plan["warmup"])
    model_dir = bench_assets.ensure_checkpoint(case.shape, plan["dtype"], plan["device"], cache)
    data = bench_assets.data_file(model_dir, seq=case.seq, batch=case.batch, steps=warmup + steps, kind=case.kind)
    return dict(system=system, method=case.method, model_dir=str(model_dir), data_path=str(data), seq=case.seq,
                batch=case.batch, steps=steps, warmup=warmup, lr=plan["lr"], device=plan["device"],
                dtype=plan["dtype"], seed=42, threads=plan["threads"], peak_tflops=plan["peak_tflops"],
                memory_budget_mb=overrides.get("memory_budget_mb"))


def skip_reason(system: str, plan: dict) -> str | None:
    if system.startswith("liger") and not plan["device"].startswith("cuda"):
        return "Liger-Kernel runs on CUDA only"
    return None


def run_cases(plan: dict, cache: Path) -> dict:
    """{case name: {system: [worker results]}}, the systems alternating order at each repetition."""
    runs = {c.name: {s: [] for s in plan["systems"]} for c in plan["cases"]}
    for rep in range(plan["reps"]):
        for case in plan["cases"]:
            order = plan["systems"] if rep % 2 == 0 else plan["systems"][::-1]
            for system in order:
                reason = skip_reason(system, plan)
                if reason:
                    runs[case.name][system] = [{"ok": False, "skipped": True, "error": reason}]
                    continue
                result = run_worker(make_spec(case, system, plan, cache), plan)
                runs[case.name][system].append(result)
                print(bench_report.progress_line(rep, case.name, system, result), flush=True)
    return runs


# ---- the longest sequence within a memory budget -----------------------------------------------------------------

def seq_search(case: Case, system: str, plan: dict, cache: Path) -> dict:
    """Doubling from the case's length, then bisection to `grain` tokens: one short run (one step, batch 1, one
    sample filling the row) per probe. Fits: the run succeeded and its peak memory is within the budget."""
    grain, limit, budget = plan["grain"], plan["seq_limit"], plan["budget_mb"]
    probes = []

    def fits(seq: int) -> bool:
        spec = make_spec(case, system, plan, cache, seq=seq, batch=1, kind="long", steps=1, warmup=0,
                         memory_budget_mb=budget if plan["device"].startswith("cuda") else None)
        result = run_worker(spec, plan)
        peak = bench_report.peak_memory_mb(result)
        ok = bool(result.get("ok")) and peak is not None and peak <= budget
        probes.append(dict(seq=seq, fits=ok, peak_mb=peak, error=result.get("error")))
        print(f"  seq search {system}: {seq} tokens -> {'fits' if ok else 'too big'} "
              f"({peak if peak is not None else result.get('error', '')} MB)", flush=True)
        return ok

    lo, hi, seq = 0, limit + grain, max(grain, case.seq // grain * grain)
    while seq <= limit:
        if not fits(seq):
            hi = seq
            break
        lo, seq = seq, seq * 2
    while hi - lo > grain:
        mid = (lo + hi) // 2 // grain * grain
        if mid <= lo:
            break
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return dict(system=system, case=case.name, longest=lo, budget_mb=budget, limit=limit,
                limit_reached=lo >= limit or hi > limit, probes=probes)


# ---- main -------------------------------------------------------------------------------------------------------

def run(ns) -> dict:
    plan = make_plan(ns)
    cache = bench_assets.default_cache_dir()
    started, load_before = time.time(), bench_report.load_average()
    print(f"training benchmark on {plan['device']}: {len(plan['cases'])} case(s) x {len(plan['systems'])} "
          f"system(s) x {plan['reps']} repetition(s); checkpoints cached in {cache}", flush=True)
    for case in plan["cases"]:  # built before any timing starts
        bench_assets.ensure_checkpoint(case.shape, plan["dtype"], plan["device"], cache)
    runs = run_cases(plan, cache)
    searches = []
    if ns.max_seq_search and plan["cases"]:
        for system in plan["systems"]:
            if not skip_reason(system, plan):
                searches.append(seq_search(plan["cases"][0], system, plan, cache))
    info = bench_report.machine_info(plan, runs, load_before, time.time() - started)
    report = bench_report.build(info, plan, [asdict(c) | {"name": c.name} for c in plan["cases"]], runs, searches)
    text = bench_report.markdown(report)
    print("\n" + text)
    if ns.save:
        out = Path(ns.out) if ns.out else HERE / "results"
        shape = plan["cases"][0].shape if plan["cases"] else "none"
        name = f"train-{'cuda' if plan['device'].startswith('cuda') else 'cpu'}-{shape}"
        if plan["dtype"] != ("bfloat16" if plan["device"].startswith("cuda") else "float32"):
            name += "-" + {"float32": "fp32", "bfloat16": "bf16"}[plan["dtype"]]
        bench_report.write(out, name, report, text)
        print(f"wrote {out / name}.json and .md")
    return report


def main(argv=None):
    run(parse_args(argv))


if __name__ == "__main__":
    main()
