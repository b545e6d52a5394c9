"""Training speed, memory and utilisation: velotune against transformers + peft (+ bitsandbytes), side by side.

    velotune bench                                    # CPU: LoRA, QLoRA, full on a 56M Llama shape (~10 min)
    velotune bench --quick                            # tiny shapes, under a minute: keeps this code working
    velotune bench --device cuda                      # Llama-3.1-8B-shaped QLoRA / LoRA, 1B full, long context
    python benchmarks/train_bench.py ...              # the same, from a clone

Every case (method x system) runs in its own process (worker.py), alternating the systems (A B C, then C B A,
...), on one random-weight checkpoint and one synthetic data file built once and cached; each repetition also
times torch.mm at the case's shapes in another process (peak.py), the machine's matmul throughput that the
utilisation divides by. Reported are medians over the processes of: real target tokens/s (non-padding tokens
that carry a loss), peak memory, model TFLOP/s and utilisation, and with --max-seq-search the longest sequence
that trains within a memory budget. Results: <out>/train-<device>-<shape>.json and .md with the machine, the
versions and the exact command.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from ..errors import ConfigError
from . import assets, report
from .machine import load_average, print_and_save
from .memory import peak_memory_mb
from .processes import alternating, run_module
from .worker import METHODS, SYSTEMS


@dataclass(frozen=True)
class Case:
    method: str
    shape: str
    seq: int
    batch: int
    kind: str = "chat"       # assets.DOC_KINDS
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


def is_cuda(device: str) -> bool:
    return str(device).startswith("cuda")


def make_plan(ns) -> dict:
    device = "cuda" if is_cuda(ns.device) else "cpu"
    plan = dict(PLANS[device + ("-quick" if ns.quick else "")], device=ns.device, quick=ns.quick)
    plan["dtype"] = ns.dtype or ("bfloat16" if device == "cuda" else "float32")
    for key in ("reps", "steps", "warmup", "seq_limit"):
        if getattr(ns, key) is not None:
            plan[key] = getattr(ns, key)
    if ns.seq_grain:
        plan["grain"] = ns.seq_grain
    if ns.memory_budget_mb:
        plan["budget_mb"] = ns.memory_budget_mb
    if ns.systems:
        plan["systems"] = pick(ns.systems, SYSTEMS, "--systems")
    cases = plan["cases"]
    if ns.methods:
        methods = pick(ns.methods, METHODS, "--methods")
        cases = [c for c in cases if c.method in methods]
    if ns.cases:
        names = pick(ns.cases, [c.name for c in plan["cases"]], "--cases")
        cases = [c for c in cases if c.name in names]
    if ns.seq or ns.batch:
        cases = [replace(c, seq=ns.seq or c.seq, batch=ns.batch or c.batch) for c in cases]
    if not cases:
        raise ConfigError(f"no case left to run: --methods {ns.methods} and --cases {ns.cases} select none of "
                          f"{', '.join(c.name for c in plan['cases'])}")
    check_counts(plan)
    plan.update(cases=cases, threads=ns.threads, peak_tflops=ns.peak_tflops, timeout=ns.timeout)
    return plan


def check_counts(plan: dict):
    if plan["warmup"] < 0 or plan["steps"] < 1 or plan["reps"] < 1:
        raise ConfigError(f"--steps ({plan['steps']}) and --reps ({plan['reps']}) must be at least 1, --warmup "
                          f"({plan['warmup']}) at least 0")


def side_plan(ns, plans: dict, systems, *, lr: float, name: str, refused=(), why: str = "") -> dict:
    """The plan of a benchmark beside the training one (loop, DPO, GRPO): its device's defaults (`plans` by
    "cpu" / "cuda", "-quick"), the command line's dtype, counts and systems laid over them; an option it takes no
    part in is refused."""
    given = [option for option in refused if getattr(ns, option, None)]
    if given:
        raise ConfigError(f"the {name} benchmark takes no --{given[0].replace('_', '-')}{why}")
    device = "cuda" if is_cuda(ns.device) else "cpu"
    plan = dict(plans[device + ("-quick" if ns.quick else "")], device=ns.device, quick=ns.quick, lr=lr)
    plan["dtype"] = ns.dtype or ("bfloat16" if device == "cuda" else "float32")
    for key in ("reps", "steps", "warmup", "seq", "batch"):
        if getattr(ns, key, None) is not None:
            plan[key] = getattr(ns, key)
    if ns.systems:
        plan["systems"] = pick(ns.systems, systems, "--systems")
    check_counts(plan)
    plan.update(threads=ns.threads, peak_tflops=ns.peak_tflops, timeout=ns.timeout)
    return plan


def pick(text: str, known, flag: str) -> list:
    picked = [t.strip() for t in text.split(",") if t.strip()]
    unknown = [t for t in picked if t not in known]
    if unknown or not picked:
        raise ConfigError(f"{flag}: unknown {', '.join(unknown) or '(empty)'}; expected some of {', '.join(known)}")
    return picked


# ---- running the workers ----------------------------------------------------------------------------------------

def run_worker(spec: dict, plan: dict) -> dict:
    """One process, one case; its result, or an error result (crash, timeout, killed)."""
    return run_module("velotune.bench.worker", spec, timeout=plan["timeout"], threads=plan["threads"])


def run_peak(case: Case, plan: dict, cache: Path) -> dict:
    """torch.mm throughput at the case's shapes, tokens and dtype, in a process of its own."""
    spec = dict(model_dir=str(assets.checkpoint_path(case.shape, plan["dtype"], cache)), tokens=case.seq * case.batch,
                dtype=plan["dtype"], device=plan["device"], threads=plan["threads"])
    return run_module("velotune.bench.peak", spec, timeout=plan["timeout"], threads=plan["threads"])


def make_spec(case: Case, system: str, plan: dict, cache: Path, **overrides) -> dict:
    case = replace(case, **{k: v for k, v in overrides.items() if k in ("seq", "batch", "kind")})
    steps, warmup = overrides.get("steps", plan["steps"]), overrides.get("warmup", plan["warmup"])
    model_dir = assets.ensure_checkpoint(case.shape, plan["dtype"], plan["device"], cache)
    data = assets.data_file(model_dir, seq=case.seq, batch=case.batch, steps=warmup + steps, kind=case.kind)
    return dict(system=system, method=case.method, model_dir=str(model_dir), data_path=str(data), seq=case.seq,
                batch=case.batch, steps=steps, warmup=warmup, lr=plan["lr"], device=plan["device"],
                dtype=plan["dtype"], seed=42, threads=plan["threads"],
                memory_budget_mb=overrides.get("memory_budget_mb"))


def skip_reason(system: str, plan: dict) -> str | None:
    if system.startswith("liger") and not is_cuda(plan["device"]):
        return "Liger-Kernel runs on CUDA only"
    return None


def run_cases(plan: dict, cache: Path) -> tuple[dict, dict]:
    """({case name: {system: [worker results]}}, {case name: [matmul peak results]}); at each repetition the
    peak is timed first, then the systems in alternating order."""
    runs = {c.name: {s: [] for s in plan["systems"]} for c in plan["cases"]}
    peaks = {c.name: [] for c in plan["cases"]}
    for rep in range(plan["reps"]):
        timed = {}  # cases of one shape and token count share one measurement per repetition
        for case in plan["cases"]:
            key = (case.shape, case.seq * case.batch)
            if key not in timed:
                timed[key] = run_peak(case, plan, cache)
                print(report.peak_line(rep, case.name, timed[key]), flush=True)
            peaks[case.name].append(timed[key])
            for system in alternating(plan["systems"], rep):
                reason = skip_reason(system, plan)
                if reason:
                    runs[case.name][system] = [{"ok": False, "skipped": True, "error": reason}]
                    continue
                result = run_worker(make_spec(case, system, plan, cache), plan)
                runs[case.name][system].append(result)
                print(report.progress_line(rep, case.name, system, result), flush=True)
    return runs, peaks


# ---- the longest sequence within a memory budget -----------------------------------------------------------------

def seq_search(case: Case, system: str, plan: dict, cache: Path) -> dict:
    """Doubling from the case's length, then bisection to `grain` tokens: one short run (one step, batch 1, one
    sample filling the row) per probe. Fits: the run succeeded and its peak memory is within the budget."""
    grain, limit, budget = plan["grain"], plan["seq_limit"], plan["budget_mb"]
    probes = []

    def fits(seq: int) -> bool:
        spec = make_spec(case, system, plan, cache, seq=seq, batch=1, kind="long", steps=1, warmup=0,
                         memory_budget_mb=budget if is_cuda(plan["device"]) else None)
        result = run_worker(spec, plan)
        peak = peak_memory_mb(result)
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
    cache = assets.default_cache_dir()
    started, load_before = time.time(), load_average()
    print(f"training benchmark on {plan['device']}: {len(plan['cases'])} case(s) x {len(plan['systems'])} "
          f"system(s) x {plan['reps']} repetition(s); checkpoints cached in {cache}", flush=True)
    for case in plan["cases"]:  # built before any timing starts
        assets.ensure_checkpoint(case.shape, plan["dtype"], plan["device"], cache)
    runs, peaks = run_cases(plan, cache)
    searches = []
    if ns.max_seq_search and plan["cases"]:
        for system in plan["systems"]:
            if not skip_reason(system, plan):
                searches.append(seq_search(plan["cases"][0], system, plan, cache))
    info = report.run_info(runs, peaks, load_before, time.time() - started)
    result = report.build(info, plan, [asdict(c) | {"name": c.name} for c in plan["cases"]], runs, peaks, searches)
    shape = plan["cases"][0].shape if plan["cases"] else "none"
    print_and_save(ns, "train", plan, shape, result, report.markdown(result))
    return result


def main(argv=None):
    from .options import script_main
    script_main(run, argv, description=__doc__.splitlines()[0])


if __name__ == "__main__":
    main()
