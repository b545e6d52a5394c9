"""The training benchmark's report: medians per system, ratios against the baselines, goals, machine and versions,
the markdown table, and atomic writes. Plain Python: the driver never imports torch."""
from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

import bench_assets

REPO = Path(__file__).resolve().parent.parent
GOALS = {"cpu": dict(speed=1.5, memory=0.5), "cuda": dict(speed=2.0, memory=0.35)}
BASELINES = ("hf", "hf-gc", "liger", "liger-gc")
REFERENCE = "hf"  # the "vs" columns of the main table


def is_cuda(plan_or_device) -> bool:
    device = plan_or_device["device"] if isinstance(plan_or_device, dict) else plan_or_device
    return str(device).startswith("cuda")


def peak_memory_mb(result: dict):
    """The memory figure compared: CUDA: the allocator's peak reserved bytes (what the process takes from the
    GPU); CPU: the process's peak RSS."""
    memory = result.get("memory") or {}
    return memory.get("cuda_max_reserved_mb", memory.get("peak_rss_mb"))


def progress_line(rep: int, case: str, system: str, r: dict) -> str:
    head = f"[rep {rep + 1}] {case:10s} {system:12s}"
    if not r.get("ok"):
        return f"{head} FAILED: {r.get('error')}"
    return (f"{head} {r['target_tokens_per_s']:9.1f} target tok/s  peak {peak_memory_mb(r):8.1f} MB  "
            f"first loss {r['first_loss']:.5f}  ({r['wall_s']:.0f} s)")


def load_average():
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


# ---- aggregation --------------------------------------------------------------------------------------------------

def aggregate(runs: list) -> dict:
    ok = [r for r in runs if r.get("ok")]
    if not ok:
        first = runs[0] if runs else {}
        return {"ok": False, "skipped": bool(first.get("skipped")), "error": first.get("error", "not run")}

    def median(get):
        values = [get(r) for r in ok]
        values = [v for v in values if v is not None]
        return round(statistics.median(values), 3) if values else None

    out = {"ok": True, "processes": len(ok), "failed": len(runs) - len(ok),
           "target_tokens_per_s": median(lambda r: r["target_tokens_per_s"]),
           "input_tokens_per_s": median(lambda r: r["input_tokens_per_s"]),
           "peak_memory_mb": median(peak_memory_mb),
           "tflops": median(lambda r: r.get("tflops")), "mfu": median(lambda r: r.get("mfu")),
           "first_loss": ok[0]["first_loss"], "trainable_params": ok[0]["trainable_params"],
           "step_target_tokens": ok[0]["step_target_tokens"],
           "tokens_per_s_each": [r["target_tokens_per_s"] for r in ok]}
    for key in ok[0]["memory"]:
        out[key] = median(lambda r, key=key: r["memory"].get(key))
    if out.get("train_peak_rss_mb") is not None:
        out["train_extra_mb"] = round(out["train_peak_rss_mb"] - out["rss_before_train_mb"], 1)
    return out


def _ratio(a, b):
    return round(a / b, 3) if a is not None and b else None


def compare(systems: dict) -> dict:
    """velotune system -> baseline -> {speed, memory, train_extra}: velotune / baseline."""
    ratios = {}
    for ours in (s for s in systems if s.startswith("velotune") and systems[s]["ok"]):
        a = systems[ours]
        ratios[ours] = {base: {"speed": _ratio(a["target_tokens_per_s"], b["target_tokens_per_s"]),
                               "memory": _ratio(a["peak_memory_mb"], b["peak_memory_mb"]),
                               "train_extra": _ratio(a.get("train_extra_mb"), b.get("train_extra_mb"))}
                        for base, b in systems.items() if base in BASELINES and b["ok"]}
    return ratios


def consistency(systems: dict) -> dict:
    """Did every system see the same batches, and start from the same loss (same weights, same data)?"""
    ok = [s for s in systems.values() if s["ok"]]
    same = len({tuple(s["step_target_tokens"]) for s in ok}) <= 1
    losses = [s["first_loss"] for s in ok]
    spread = (max(losses) - min(losses)) / abs(min(losses)) if losses else None
    return {"same_batches": same, "first_loss_rel_spread": None if spread is None else float(f"{spread:.3g}")}


def build(info: dict, plan: dict, cases: list, runs: dict, searches: list) -> dict:
    rows = []
    for case in cases:
        systems = {s: aggregate(r) for s, r in runs[case["name"]].items()}
        rows.append(dict(case, parameters=bench_assets.parameter_count(bench_assets.SHAPES[case["shape"]]),
                         systems=systems, ratios=compare(systems), **consistency(systems),
                         runs={s: [{k: v for k, v in r.items() if k != "traceback" or not r.get("ok")} for r in rs]
                               for s, rs in runs[case["name"]].items()}))
    goals = GOALS["cuda" if is_cuda(plan) else "cpu"]
    settings = {k: plan[k] for k in ("device", "dtype", "systems", "reps", "warmup", "steps", "lr", "threads",
                                     "quick")}
    settings.update(goals=goals, shapes={c["shape"]: bench_assets.SHAPES[c["shape"]] for c in cases})
    if searches:
        settings.update(memory_budget_mb=plan["budget_mb"], seq_grain=plan["grain"], seq_limit=plan["seq_limit"])
    return dict(machine=info, settings=settings, cases=rows, seq_search=searches)


# ---- machine and versions ---------------------------------------------------------------------------------------

def machine_info(plan: dict, runs: dict, load_before, seconds: float) -> dict:
    devices = sorted({r.get("device_name") for per in runs.values() for rs in per.values() for r in rs
                      if r.get("device_name")})
    versions = {}
    for package in ("torch", "transformers", "peft", "bitsandbytes", "liger-kernel", "triton"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    return dict(cpu=cpu_name(), cpu_count=os.cpu_count(), platform=platform.platform(),
                python=platform.python_version(), devices=devices, versions=versions,
                velotune=_velotune_version(), load_average_before=load_before, load_average_after=load_average(),
                duration_s=round(seconds, 1), date=time.strftime("%Y-%m-%d %H:%M:%S %Z"), command=command_line())


def command_line() -> str:
    argv0 = Path(sys.argv[0]).name
    if argv0 in ("velotune", "__main__.py"):
        return " ".join(["velotune"] + sys.argv[1:])
    try:
        script = str(Path(sys.argv[0]).resolve().relative_to(REPO))
    except ValueError:
        script = sys.argv[0]
    return " ".join(["python", script] + sys.argv[1:])


def _velotune_version() -> dict:
    def git(*args):
        try:
            return subprocess.run(["git", *args], cwd=str(REPO), capture_output=True, text=True, timeout=10,
                                  check=True).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return None
    changed = git("status", "--porcelain", "--untracked-files=no")
    sys.path.insert(0, str(REPO))
    from velotune import __version__
    return {"version": __version__, "commit": git("rev-parse", "HEAD"),
            "uncommitted_changes": None if changed is None else len(changed.splitlines())}


def cpu_name():
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


# ---- markdown ---------------------------------------------------------------------------------------------------

def _fmt(value, spec=".1f", suffix=""):
    return "—" if value is None else f"{value:{spec}}{suffix}"


def _case_table(report) -> str:
    cuda = is_cuda(report["settings"])
    mem = "max reserved MB | max allocated MB" if cuda else "peak RSS MB | RSS before training MB"
    head = (f"| case | system | target tok/s | vs {REFERENCE} | {mem} | memory vs {REFERENCE} | "
            f"{'MFU' if cuda else 'TFLOP/s'} | first loss |")
    lines = [head, "|" + "---|" * 9]
    for case in report["cases"]:
        ref = case["systems"].get(REFERENCE, {})
        for name, s in case["systems"].items():
            label = f"{case['name']} ({case['seq']}x{case['batch']})"
            if not s["ok"]:
                lines.append(f"| {label} | {name} | {'skipped' if s.get('skipped') else 'failed'}: "
                             f"{s['error'][:80]} ||||||||")
                continue
            second = s.get("cuda_max_allocated_mb") if cuda else s.get("rss_before_train_mb")
            speed = _ratio(s["target_tokens_per_s"], ref.get("target_tokens_per_s")) if ref.get("ok") else None
            memory = _ratio(s["peak_memory_mb"], ref.get("peak_memory_mb")) if ref.get("ok") else None
            flops = _fmt(s.get("mfu"), ".1%") if cuda else _fmt(s.get("tflops"), ".3f")
            lines.append(f"| {label} | {name} | {s['target_tokens_per_s']:.1f} | {_fmt(speed, '.2f', 'x')} | "
                         f"{_fmt(s['peak_memory_mb'], '.0f')} | {_fmt(second, '.0f')} | {_fmt(memory, '.2f', 'x')} | "
                         f"{flops} | {s['first_loss']:.5f} |")
    return "\n".join(lines)


def _goals_table(report) -> str:
    goals = report["settings"]["goals"]
    lines = [f"| case | velotune vs | tokens/s ratio (goal >= {goals['speed']}x) | peak memory ratio "
             f"(goal <= {goals['memory']}x) | training-phase memory ratio |", "|---|---|---|---|---|"]
    for case in report["cases"]:
        for ours, per_base in case["ratios"].items():
            for base, r in per_base.items():
                speed = _fmt(r["speed"], ".2f", "x") + (" met" if (r["speed"] or 0) >= goals["speed"] else "")
                mem = _fmt(r["memory"], ".2f", "x") + (" met" if r["memory"] and r["memory"] <= goals["memory"] else "")
                lines.append(f"| {case['name']} | {base}{'' if ours == 'velotune' else f' ({ours})'} | {speed} | "
                             f"{mem} | {_fmt(r['train_extra'], '.2f', 'x')} |")
    return "\n".join(lines)


def _search_table(report) -> str:
    s = report["settings"]
    lines = [f"Longest sequence (batch 1, one sample filling the row) whose training step stays within "
             f"{s['memory_budget_mb']:.0f} MB ({'max reserved' if is_cuda(s) else 'peak RSS'}), searched in "
             f"steps of {s['seq_grain']} up to {s['seq_limit']}:", "",
             "| case | system | longest sequence | probes (tokens: peak MB) |", "|---|---|---|---|"]
    for r in report["seq_search"]:
        probes = ", ".join(f"{p['seq']}: {_fmt(p['peak_mb'], '.0f')}{'' if p['fits'] else ' x'}" for p in r["probes"])
        longest = f">= {r['longest']}" if r["limit_reached"] and r["longest"] >= r["limit"] else str(r["longest"])
        lines.append(f"| {r['case']} | {r['system']} | {longest} | {probes} |")
    return "\n".join(lines)


def markdown(report) -> str:
    s, m = report["settings"], report["machine"]
    shapes = "; ".join(f"{name} ({bench_assets.parameter_count(shape) / 1e6:.1f}M parameters: "
                       + ", ".join(f"{k}={v}" for k, v in shape.items() if k != "rope_scaling") + ")"
                       for name, shape in s["shapes"].items())
    checks = "; ".join(f"{c['name']}: same batches {'yes' if c['same_batches'] else 'NO'}, first-loss spread "
                       f"{c['first_loss_rel_spread']}" for c in report["cases"])
    version = m["velotune"]
    text = [f"# Training: velotune vs transformers + peft ({s['device']}, {s['dtype']})", "",
            f"Command: `{m['command']}`  ", f"Model: random weights, {shapes}.  ",
            f"Each process: {s['warmup']} untimed + {s['steps']} timed optimizer steps; {s['reps']} process(es) "
            f"per system and case, alternating; medians shown. {s['threads']} torch thread(s) per process.  ",
            "target tok/s: tokens that carry a loss (not padding, not masked prompt) per second of the timed steps. "
            "Memory: " + ("torch's peak reserved / allocated GPU memory of the training phase."
                          if is_cuda(s) else "the process's peak RSS (ru_maxrss, loading included) and its RSS "
                          "before training (after loading).") + "  ",
            "velotune: `vt.load` + `vt.train` with its defaults (the model passed in; LoRA r=16, alpha=16, all "
            "linears; packed rows). hf / hf-gc: transformers (SDPA attention) + peft (+ bitsandbytes NF4 for "
            "QLoRA), a plain PyTorch loop (AdamW, the same lr, clipping and schedule) over the same batches, "
            "without / with gradient checkpointing.  ",
            f"Checks: {checks}.", "", _case_table(report), "", "## Goals", "", _goals_table(report), ""]
    if report["seq_search"]:
        text += ["## Longest sequence within a memory budget", "", _search_table(report), ""]
    text += ["## Machine", "", f"- cpu: {m['cpu']} ({m['cpu_count']} cores); platform {m['platform']}; "
             f"python {m['python']}", f"- devices: {', '.join(m['devices']) or 'cpu'}",
             "- versions: " + ", ".join(f"{k} {v}" for k, v in m["versions"].items() if v),
             f"- velotune {version['version']}, commit {version['commit']} "
             f"({version['uncommitted_changes']} file(s) with uncommitted changes)",
             f"- load average before / after: {m['load_average_before']} / {m['load_average_after']}; "
             f"duration {m['duration_s']:.0f} s; {m['date']}", ""]
    return "\n".join(text)


def write(out: Path, name: str, report: dict, text: str):
    out.mkdir(parents=True, exist_ok=True)
    for path, content in ((out / f"{name}.json", json.dumps(report, indent=1) + "\n"), (out / f"{name}.md", text)):
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        tmp.write_text(content, encoding="utf-8")
        os.replace(tmp, path)
