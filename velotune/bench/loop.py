"""A training loop written for transformers, run unchanged over velotune's model and over transformers + peft.

    velotune bench --loop                      # CPU: Qwen2 shape (hidden 384, 6 layers, vocab 49152), 2 x 1024, fp32
    velotune bench --loop --dtype bfloat16     # the same in bf16
    velotune bench --loop --quick              # tiny shapes, under a minute
    python benchmarks/loop_bench.py ...        # the same, from a clone

The loop (loop_worker.training_loop): `out = model(input_ids=ids, labels=ids); out.loss.backward();
optimizer.step()` with AdamW over the LoRA parameters (r=16 on every linear). Each system runs in its own process
(loop_worker.py), alternating (A B C, C B A, ...); medians over the processes. Each repetition also times torch.mm
at the model's shapes (peak.py) for the utilisation. Results: <out>/loop-<device>-<shape>.json and .md.
"""
from __future__ import annotations

import inspect
import time
from pathlib import Path

from . import assets, report
from .loop_worker import SYSTEMS, training_loop
from .machine import load_average, machine_markdown, print_and_save
from .processes import alternating, run_module
from .train import is_cuda, side_plan

PLANS = {
    "cpu": dict(shape="qwen2-384", seq=1024, batch=2, systems=["velotune", "hf", "hf-gc"], reps=3, warmup=1,
                steps=3),
    "cpu-quick": dict(shape="qwen2-tiny", seq=128, batch=2, systems=["velotune", "hf"], reps=1, warmup=1, steps=2),
    "cuda": dict(shape="qwen2-384", seq=1024, batch=8, systems=["velotune", "hf", "hf-gc"], reps=2, warmup=3,
                 steps=10),
    "cuda-quick": dict(shape="qwen2-tiny", seq=256, batch=2, systems=["velotune", "hf"], reps=1, warmup=1, steps=2),
}
NOT_FOR_THE_LOOP = ("methods", "cases", "max_seq_search", "memory_budget_mb", "seq_limit", "seq_grain")


def make_plan(ns) -> dict:
    return side_plan(ns, PLANS, SYSTEMS, lr=2e-4, name="loop", refused=NOT_FOR_THE_LOOP,
                     why=" (LoRA only, no sequence search)")


def run_reps(plan: dict, model_dir: Path) -> tuple[dict, list]:
    """({system: [results]}, [matmul peak results]), the systems alternating at each repetition."""
    runs, peaks = {s: [] for s in plan["systems"]}, []
    spec = dict(model_dir=str(model_dir), seq=plan["seq"], batch=plan["batch"], steps=plan["steps"],
                warmup=plan["warmup"], lr=plan["lr"], device=plan["device"], dtype=plan["dtype"], seed=42,
                threads=plan["threads"])
    peak_spec = dict(model_dir=str(model_dir), tokens=plan["seq"] * plan["batch"], dtype=plan["dtype"],
                     device=plan["device"], threads=plan["threads"])
    for rep in range(plan["reps"]):
        peaks.append(run_module("velotune.bench.peak", peak_spec, timeout=plan["timeout"], threads=plan["threads"]))
        print(report.peak_line(rep, "loop", peaks[-1]), flush=True)
        for system in alternating(plan["systems"], rep):
            result = run_module("velotune.bench.loop_worker", dict(spec, system=system), timeout=plan["timeout"],
                                threads=plan["threads"])
            runs[system].append(result)
            print(report.progress_line(rep, "loop", system, result), flush=True)
    return runs, peaks


def build(plan: dict, runs: dict, peaks: list, info: dict) -> dict:
    peak = report.choose_peak(plan, peaks)
    systems = report.with_utilisation({s: report.aggregate(r) for s, r in runs.items()}, peak)
    case = dict(name="loop", shape=plan["shape"], seq=plan["seq"], batch=plan["batch"], peak=peak, systems=systems,
                ratios=report.compare(systems), **report.consistency(systems),
                parameters=assets.parameter_count(assets.SHAPES[plan["shape"]]),
                runs={s: [{k: v for k, v in r.items() if k != "traceback" or not r.get("ok")} for r in rs]
                      for s, rs in runs.items()})
    settings = {k: plan[k] for k in ("device", "dtype", "systems", "reps", "warmup", "steps", "lr", "threads",
                                     "quick", "shape", "seq", "batch")}
    settings.update(goals=report.GOALS["cuda" if is_cuda(plan["device"]) else "cpu"],
                    model=assets.SHAPES[plan["shape"]], loop=inspect.getsource(training_loop))
    return dict(machine=info, settings=settings, cases=[case])


def _table(case: dict, cuda: bool) -> str:
    mem = "max reserved MB" if cuda else "peak RSS MB"
    bases = [b for b in case["systems"] if b in report.BASELINES]
    head = (f"| system | tokens/s | {mem} | RSS before training MB | TFLOP/s | utilisation | first loss | "
            + " | ".join(f"speed, memory vs {b}" for b in bases) + " |")
    lines = [head, "|" + "---|" * (7 + len(bases))]
    for name, s in case["systems"].items():
        if not s["ok"]:
            lines.append(f"| {name} | failed: {s['error'][:80]} |" + "|" * (6 + len(bases)))
            continue
        vs = [(report.ratio(s["input_tokens_per_s"], case["systems"][b].get("input_tokens_per_s")),
               report.ratio(s["peak_memory_mb"], case["systems"][b].get("peak_memory_mb"))) for b in bases]
        lines.append(f"| {name} | {s['input_tokens_per_s']:.1f} | {report.fmt(s['peak_memory_mb'], '.0f')} | "
                     f"{report.fmt(s.get('rss_before_train_mb'), '.0f')} | {report.fmt(s['tflops'], '.3f')} | "
                     f"{report.fmt(s.get('utilisation'), '.1%')} | {s['first_loss']:.5f} | "
                     + " | ".join(f"{report.fmt(a, '.2f', 'x')}, {report.fmt(m, '.2f', 'x')}" for a, m in vs) + " |")
    return "\n".join(lines)


def markdown(result: dict) -> str:
    s, m, case = result["settings"], result["machine"], result["cases"][0]
    shape = ", ".join(f"{k}={v}" for k, v in s["model"].items())
    text = [f"# A transformers-style training loop: velotune vs transformers + peft ({s['device']}, {s['dtype']})",
            "", f"Command: `{m['command']}`  ",
            f"Model: random weights, {s['shape']} ({case['parameters'] / 1e6:.1f}M parameters: {shape}); LoRA r=16, "
            f"alpha=16 on every linear (velotune: `vt.load` + `vt.add_lora`; transformers + peft: "
            f"`get_peft_model`); -gc: gradient checkpointing on.  ",
            f"Batches: {s['batch']} x {s['seq']} random token ids, labels = ids; {s['warmup']} untimed + "
            f"{s['steps']} timed steps per process; {s['reps']} process(es) per system, alternating; medians. "
            f"{s['threads']} torch thread(s).  ",
            "tokens/s: real (input) tokens per second of the timed steps. Memory: " +
            ("torch's peak reserved GPU memory." if is_cuda(s["device"]) else
             "the process's peak RSS (loading included).") + " TFLOP/s and utilisation as in the training "
            "benchmark (velotune/bench/flops.py).  ",
            f"Checks: first-loss spread {case['first_loss_rel_spread']} (same weights, same batches).", "",
            "The loop, the same code for every system:", "", "```python", s["loop"].rstrip(), "```", "",
            _table(case, is_cuda(s["device"])), "", "Peak the utilisation divides by:", "",
            *report.peak_lines([case]), "",
            f"## Goals: >= {s['goals']['speed']}x tokens/s and <= {s['goals']['memory']}x peak memory", "",
            report.goals_table([case], s["goals"]), ""]
    return "\n".join(text + machine_markdown(m))


def run(ns) -> dict:
    plan = make_plan(ns)
    started, load_before = time.time(), load_average()
    model_dir = assets.ensure_checkpoint(plan["shape"], plan["dtype"], plan["device"], assets.default_cache_dir())
    print(f"loop benchmark on {plan['device']} ({plan['dtype']}): {', '.join(plan['systems'])} x {plan['reps']} "
          f"repetition(s), {plan['batch']} x {plan['seq']} tokens per step", flush=True)
    runs, peaks = run_reps(plan, model_dir)
    info = report.run_info({"loop": runs}, {"loop": peaks}, load_before, time.time() - started)
    result = build(plan, runs, peaks, info)
    print_and_save(ns, "loop", plan, plan["shape"], result, markdown(result))
    return result


def main(argv=None):
    from .options import script_main
    script_main(run, argv, description=__doc__.splitlines()[0])


if __name__ == "__main__":
    main()
