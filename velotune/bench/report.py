"""The training benchmark's report: medians per system, ratios against the baselines, utilisation against the
device's peak, goals, machine and versions, the markdown. Plain Python: the driver never imports torch."""
from __future__ import annotations

import statistics

from . import assets
from .flops import device_peak_tflops, utilisation
from .machine import machine_info, machine_markdown
from .memory import peak_memory_mb

GOALS = {"cpu": dict(speed=1.5, memory=0.5), "cuda": dict(speed=2.0, memory=0.35)}
BASELINES = ("hf", "hf-gc", "liger", "liger-gc")
REFERENCE = "hf"  # the "vs" columns of the main table


def is_cuda(plan_or_device) -> bool:
    device = plan_or_device["device"] if isinstance(plan_or_device, dict) else plan_or_device
    return str(device).startswith("cuda")


def progress_line(rep: int, case: str, system: str, r: dict, *, rate: str = "target_tokens_per_s", width: int = 10,
                  extras=()) -> str:
    """One process's result as it comes in: tokens/s (`rate`: target tokens, or all real tokens), peak memory,
    TFLOP/s and first loss where the worker measured them, then `extras`."""
    head = f"[rep {rep + 1}] {case:{width}s} {system:12s}"
    if not r.get("ok"):
        return f"{head} FAILED: {r.get('error')}"
    label = "target tok/s" if rate == "target_tokens_per_s" else "tok/s"
    parts = [f"{r[rate]:9.1f} {label}", f"peak {peak_memory_mb(r):8.1f} MB"]
    if r.get("tflops") is not None:
        parts.append(f"{r['tflops']:.4f} TFLOP/s")
    if r.get("first_loss") is not None:
        parts.append(f"first loss {r['first_loss']:.5f}")
    return f"{head} " + "  ".join([*parts, *extras]) + f"  ({r['wall_s']:.0f} s)"


def peak_line(rep: int, case: str, r: dict) -> str:
    head = f"[rep {rep + 1}] {case:10s} {'torch.mm':12s}"
    if not r.get("ok"):
        return f"{head} FAILED: {r.get('error')}"
    return f"{head} {r['matmul_tflops']:.4f} TFLOP/s at the model's shapes ({r['dtype']}, {r['threads']} thread(s))"


def median(values):
    values = [v for v in values if v is not None]
    return round(statistics.median(values), 5) if values else None


# ---- aggregation --------------------------------------------------------------------------------------------------

def aggregate(runs: list) -> dict:
    ok = [r for r in runs if r.get("ok")]
    if not ok:
        first = runs[0] if runs else {}
        return {"ok": False, "skipped": bool(first.get("skipped")), "error": first.get("error", "not run")}
    out = {"ok": True, "processes": len(ok), "failed": len(runs) - len(ok),
           "target_tokens_per_s": median(r["target_tokens_per_s"] for r in ok),
           "input_tokens_per_s": median(r["input_tokens_per_s"] for r in ok),
           "peak_memory_mb": median(peak_memory_mb(r) for r in ok),
           "tflops": median(r.get("tflops") for r in ok),
           "first_loss": ok[0]["first_loss"], "trainable_params": ok[0]["trainable_params"],
           "step_target_tokens": ok[0]["step_target_tokens"],
           "tokens_per_s_each": [r["target_tokens_per_s"] for r in ok]}
    for key in ok[0]["memory"]:
        out[key] = median(r["memory"].get(key) for r in ok)
    if out.get("train_peak_rss_mb") is not None:
        out["train_extra_mb"] = round(out["train_peak_rss_mb"] - out["rss_before_train_mb"], 1)
    return out


def ratio(a, b):
    return round(a / b, 3) if a is not None and b else None


def compare(systems: dict) -> dict:
    """velotune system -> baseline -> {speed, memory, train_extra}: velotune / baseline."""
    ratios = {}
    for ours in (s for s in systems if s.startswith("velotune") and systems[s]["ok"]):
        a = systems[ours]
        ratios[ours] = {base: {"speed": ratio(a["target_tokens_per_s"], b["target_tokens_per_s"]),
                               "memory": ratio(a["peak_memory_mb"], b["peak_memory_mb"]),
                               "train_extra": ratio(a.get("train_extra_mb"), b.get("train_extra_mb"))}
                        for base, b in systems.items() if base in BASELINES and b["ok"]}
    return ratios


def consistency(systems: dict) -> dict:
    """Did every system see the same batches, and start from the same loss (same weights, same data)?"""
    ok = [s for s in systems.values() if s["ok"]]
    same = len({tuple(s["step_target_tokens"]) for s in ok}) <= 1
    losses = [s["first_loss"] for s in ok]
    spread = (max(losses) - min(losses)) / abs(min(losses)) if losses else None
    return {"same_batches": same, "first_loss_rel_spread": None if spread is None else float(f"{spread:.3g}")}


def choose_peak(plan: dict, peak_runs: list) -> dict:
    """What utilisation divides by: --peak-tflops if given; on CUDA the device's dense bf16/fp16 peak from the
    table; else (CPU, fp32, an unknown GPU) torch.mm measured at the model's shapes in this run."""
    ok = [r for r in peak_runs if r.get("ok")]
    measured = median(r["matmul_tflops"] for r in ok)
    found = dict(matmul_tflops=measured, matmul_shapes=ok[0]["shapes"] if ok else None)
    table = device_peak_tflops(ok[0]["device_name"], plan["dtype"]) if ok and is_cuda(plan) else None
    if plan.get("peak_tflops"):
        return dict(found, tflops=plan["peak_tflops"], source="--peak-tflops")
    if table:
        return dict(found, tflops=table, source=f"dense {plan['dtype']} peak of {ok[0]['device_name']} (table)")
    return dict(found, tflops=measured, source="torch.mm at the model's shapes, measured in this run")


def with_utilisation(systems: dict, peak: dict) -> dict:
    for s in systems.values():
        if s["ok"]:
            s["utilisation"] = utilisation(s["tflops"], peak["tflops"])
    return systems


def build(info: dict, plan: dict, cases: list, runs: dict, peaks: dict, searches: list) -> dict:
    rows = []
    for case in cases:
        peak = choose_peak(plan, peaks[case["name"]])
        systems = with_utilisation({s: aggregate(r) for s, r in runs[case["name"]].items()}, peak)
        rows.append(dict(case, parameters=assets.parameter_count(assets.SHAPES[case["shape"]]), peak=peak,
                         systems=systems, ratios=compare(systems), **consistency(systems),
                         runs={s: [{k: v for k, v in r.items() if k != "traceback" or not r.get("ok")} for r in rs]
                               for s, rs in runs[case["name"]].items()}))
    goals = GOALS["cuda" if is_cuda(plan) else "cpu"]
    settings = {k: plan[k] for k in ("device", "dtype", "systems", "reps", "warmup", "steps", "lr", "threads",
                                     "quick")}
    settings.update(goals=goals, shapes={c["shape"]: assets.SHAPES[c["shape"]] for c in cases})
    if searches:
        settings.update(memory_budget_mb=plan["budget_mb"], seq_grain=plan["grain"], seq_limit=plan["seq_limit"])
    return dict(machine=info, settings=settings, cases=rows, seq_search=searches)


def run_info(runs: dict, peaks: dict, load_before, seconds: float) -> dict:
    results = [r for per in runs.values() for rs in per.values() for r in rs] + [
        r for rs in peaks.values() for r in rs]
    devices = sorted({r["device_name"] for r in results if r.get("device_name")})
    return machine_info(devices, load_before, seconds)


# ---- markdown ---------------------------------------------------------------------------------------------------

def memory_words(cuda: bool) -> str:
    """What a side-by-side report's memory columns measure (the same meter in every benchmark: bench/memory.py)."""
    return ("Memory: " + ("torch's peak reserved GPU memory" if cuda else "the process's peak RSS (loading included)")
            + " at the end of the last step; the training's own peak is the peak during training minus the RSS just "
            "before it.")


def fmt(value, spec=".1f", suffix=""):
    return "—" if value is None else f"{value:{spec}}{suffix}"


def _case_table(report) -> str:
    cuda = is_cuda(report["settings"])
    mem = "max reserved MB | max allocated MB" if cuda else "peak RSS MB | RSS before training MB"
    lines = [f"| case | system | target tok/s | vs {REFERENCE} | {mem} | memory vs {REFERENCE} | TFLOP/s | "
             "utilisation | first loss |", "|" + "---|" * 10]
    for case in report["cases"]:
        ref = case["systems"].get(REFERENCE, {})
        for name, s in case["systems"].items():
            label = f"{case['name']} ({case['seq']}x{case['batch']})"
            if not s["ok"]:
                lines.append(f"| {label} | {name} | {'skipped' if s.get('skipped') else 'failed'}: "
                             f"{s['error'][:80]} |||||||||")
                continue
            second = s.get("cuda_max_allocated_mb") if cuda else s.get("rss_before_train_mb")
            speed = ratio(s["target_tokens_per_s"], ref.get("target_tokens_per_s")) if ref.get("ok") else None
            memory = ratio(s["peak_memory_mb"], ref.get("peak_memory_mb")) if ref.get("ok") else None
            lines.append(f"| {label} | {name} | {s['target_tokens_per_s']:.1f} | {fmt(speed, '.2f', 'x')} | "
                         f"{fmt(s['peak_memory_mb'], '.0f')} | {fmt(second, '.0f')} | {fmt(memory, '.2f', 'x')} | "
                         f"{fmt(s['tflops'], '.3f')} | {fmt(s.get('utilisation'), '.1%')} | "
                         f"{s['first_loss']:.5f} |")
    return "\n".join(lines)


def peak_lines(cases: list) -> list:
    lines = []
    for c in cases:
        peak = c["peak"]
        line = f"- {c['name']}: {fmt(peak['tflops'], '.3f')} TFLOP/s ({peak['source']})"
        if peak["tflops"] != peak["matmul_tflops"]:
            line += f"; torch.mm at the model's shapes measured {fmt(peak['matmul_tflops'], '.3f')} TFLOP/s"
        lines.append(line)
    return lines


def goals_table(cases: list, goals: dict) -> str:
    lines = [f"| case | velotune vs | tokens/s ratio (goal >= {goals['speed']}x) | peak memory ratio "
             f"(goal <= {goals['memory']}x) | training-phase memory ratio |", "|---|---|---|---|---|"]
    for case in cases:
        for ours, per_base in case["ratios"].items():
            for base, r in per_base.items():
                speed = fmt(r["speed"], ".2f", "x") + (" met" if (r["speed"] or 0) >= goals["speed"] else "")
                mem = fmt(r["memory"], ".2f", "x") + (" met" if r["memory"] and r["memory"] <= goals["memory"] else "")
                lines.append(f"| {case['name']} | {base}{'' if ours == 'velotune' else f' ({ours})'} | {speed} | "
                             f"{mem} | {fmt(r['train_extra'], '.2f', 'x')} |")
    return "\n".join(lines)


def _search_table(report) -> str:
    s = report["settings"]
    lines = [f"Longest sequence (batch 1, one sample filling the row) whose training step stays within "
             f"{s['memory_budget_mb']:.0f} MB ({'max reserved' if is_cuda(s) else 'peak RSS'}), searched in "
             f"steps of {s['seq_grain']} up to {s['seq_limit']}:", "",
             "| case | system | longest sequence | probes (tokens: peak MB) |", "|---|---|---|---|"]
    for r in report["seq_search"]:
        probes = ", ".join(f"{p['seq']}: {fmt(p['peak_mb'], '.0f')}{'' if p['fits'] else ' x'}" for p in r["probes"])
        longest = f">= {r['longest']}" if r["limit_reached"] and r["longest"] >= r["limit"] else str(r["longest"])
        lines.append(f"| {r['case']} | {r['system']} | {longest} | {probes} |")
    return "\n".join(lines)


def markdown(report) -> str:
    s, m = report["settings"], report["machine"]
    shapes = "; ".join(f"{name} ({assets.parameter_count(shape) / 1e6:.1f}M parameters: "
                       + ", ".join(f"{k}={v}" for k, v in shape.items() if k != "rope_scaling") + ")"
                       for name, shape in s["shapes"].items())
    checks = "; ".join(f"{c['name']}: same batches {'yes' if c['same_batches'] else 'NO'}, first-loss spread "
                       f"{c['first_loss_rel_spread']}" for c in report["cases"])
    text = [f"# Training: velotune vs transformers + peft ({s['device']}, {s['dtype']})", "",
            f"Command: `{m['command']}`  ", f"Model: random weights, {shapes}.  ",
            f"Each process: {s['warmup']} untimed + {s['steps']} timed optimizer steps; {s['reps']} process(es) "
            f"per system and case, alternating; medians shown. {s['threads']} torch thread(s) per process.  ",
            "target tok/s: tokens that carry a loss (not padding, not masked prompt) per second of the timed steps. "
            "Memory: " + ("torch's peak reserved / allocated GPU memory of the training phase."
                          if is_cuda(s) else "the process's peak RSS (ru_maxrss, loading included) and its RSS "
                          "before training (after loading).") + "  ",
            "TFLOP/s: model FLOPs (6N full, 4N + 6N_lora LoRA, + causal attention; velotune/bench/flops.py) per "
            "second; utilisation: TFLOP/s over the peak below.  ",
            "velotune: `vt.load` + `vt.train` with its defaults (the model passed in; LoRA r=16, alpha=16, all "
            "linears; packed rows). hf / hf-gc: transformers (SDPA attention) + peft (+ bitsandbytes NF4 for "
            "QLoRA), a plain PyTorch loop (AdamW, the same lr, clipping and schedule) over the same batches, "
            "without / with gradient checkpointing.  ",
            f"Checks: {checks}.", "", _case_table(report), "", "Peak the utilisation divides by:", "",
            *peak_lines(report["cases"]), "", "## Goals", "", goals_table(report["cases"], s["goals"]), ""]
    if report["seq_search"]:
        text += ["## Longest sequence within a memory budget", "", _search_table(report), ""]
    return "\n".join(text + machine_markdown(m))

