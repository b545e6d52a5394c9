"""GRPO training: velotune vs TRL + PEFT, side by side, each system in its own process.

    velotune bench --grpo                # CPU: the 56M Llama, 2 prompts of 256 tokens x 8 completions of 128 a step
    velotune bench --grpo --quick        # tiny shapes, under a minute
    python benchmarks/grpo_bench.py ...  # the same, from a clone

A step samples the completions (velotune: its KV-cache decoder; TRL: transformers' `generate`), scores them and
trains on them: tokens/s counts each completion with its prompt (from the completion lengths each system reports;
random weights rarely sample EOS, so completions run to the limit). Results: <out>/grpo-<device>-<shape>.json / .md.
"""
from __future__ import annotations

import json
import os
import random
import tempfile
import time
from pathlib import Path

from . import assets, report
from .grpo_worker import SYSTEMS
from .machine import load_average, machine_markdown, print_and_save
from .processes import alternating, run_module
from .train import is_cuda, side_plan

PLANS = {
    "cpu": dict(shape="llama-56m", prompt=256, completion=128, prompts=2, generations=8, systems=list(SYSTEMS),
                reps=2, warmup=1, steps=2),
    "cpu-quick": dict(shape="tiny", prompt=32, completion=16, prompts=2, generations=4, systems=["velotune", "trl"],
                      reps=1, warmup=1, steps=2),
    "cuda": dict(shape="llama-56m", prompt=512, completion=256, prompts=4, generations=8, systems=list(SYSTEMS),
                 reps=2, warmup=2, steps=4),
    "cuda-quick": dict(shape="tiny", prompt=32, completion=16, prompts=2, generations=4, systems=["velotune", "trl"],
                       reps=1, warmup=1, steps=2),
}
NOT_HERE = ("methods", "cases", "max_seq_search", "memory_budget_mb", "seq_limit", "seq_grain", "loop", "preference",
            "seq", "batch")


def make_plan(ns) -> dict:
    return side_plan(ns, PLANS, SYSTEMS, lr=1e-6, name="GRPO", refused=NOT_HERE)


def prompts_file(model_dir: Path, *, words: int, count: int, seed: int = 0) -> Path:
    path = model_dir / f"prompts-{words}-{count}-{seed}.jsonl"
    if path.is_file():
        return path
    vocab = json.loads((model_dir / "config.json").read_text())["vocab_size"] - len(assets.SPECIALS)
    rng = random.Random(seed)
    rows = [{"prompt": " ".join(f"w{rng.randrange(vocab)}" for _ in range(words))} for _ in range(count)]
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    os.replace(tmp, path)
    return path


def _rollout_facts(r: dict) -> list:
    return [f"{r['steps_per_s']:.4f} steps/s", f"completion lengths {r['completion_lengths']}"] if r.get("ok") else []


def _table(systems: dict, cuda: bool) -> str:
    mem = "max reserved MB" if cuda else "peak RSS MB"
    ours = systems.get("velotune", {})
    lines = [f"| system | tokens/s | steps/s | {mem} | RSS before training MB | training's own peak MB | velotune: "
             "speed, memory, training's own |", "|---|---|---|---|---|---|---|"]
    for name, s in systems.items():
        if not s["ok"]:
            lines.append(f"| {name} | failed: {s['error'][:100]} | | | | | |")
            continue
        vs = ""
        if name != "velotune" and ours.get("ok"):
            vs = ", ".join(report.fmt(report.ratio(ours[k], s[k]), ".2f", "x")
                           for k in ("input_tokens_per_s", "peak_memory_mb", "train_extra_mb"))
        lines.append(f"| {name} | {s['input_tokens_per_s']:.1f} | {s['steps_per_s']:.4f} | "
                     f"{report.fmt(s['peak_memory_mb'], '.0f')} | {report.fmt(s.get('rss_before_train_mb'), '.0f')} | "
                     f"{report.fmt(s.get('train_extra_mb'), '.0f')} | {vs} |")
    return "\n".join(lines)


def markdown(result: dict) -> str:
    s, m = result["settings"], result["machine"]
    text = [f"# GRPO training: velotune vs TRL + PEFT ({s['device']}, {s['dtype']})", "",
            f"Command: `{m['command']}`  ",
            f"Model: random weights, {s['shape']}. A step: {s['prompts']} prompts of {s['prompt']} tokens x "
            f"{s['generations']} completions of up to {s['completion']} tokens, sampled at temperature 1, scored, "
            f"trained (LoRA r=16, alpha=16 on every linear; dapo loss; beta 0). {s['warmup']} untimed + {s['steps']} "
            f"timed steps per process; {s['reps']} process(es) per system, alternating; medians; {s['threads']} torch "
            "thread(s).  ",
            f"Systems: velotune (`vt.train`, objective grpo, its KV-cache generation), trl (TRL "
            f"{m['versions'].get('trl', '?')} GRPOTrainer with transformers' generate, PEFT LoRA, its defaults: "
            "activation checkpointing on), trl-nogc (checkpointing off).  ",
            "tokens/s: each completion with its prompt, per second of whole steps (sampling + scoring + training).",
            "", _table(result["systems"], is_cuda(s["device"])), "", "Goals: >= 1.5x tokens/s and <= 0.5x peak memory "
            "of TRL + PEFT.", ""]
    return "\n".join(text + machine_markdown(m))


def run(ns) -> dict:
    plan = make_plan(ns)
    started, load_before = time.time(), load_average()
    model_dir = assets.ensure_checkpoint(plan["shape"], plan["dtype"], plan["device"], assets.default_cache_dir())
    data = prompts_file(model_dir, words=plan["prompt"], count=plan["prompts"] * (plan["warmup"] + plan["steps"]) + 2)
    print(f"GRPO benchmark on {plan['device']} ({plan['dtype']}): {', '.join(plan['systems'])} x {plan['reps']} "
          f"repetition(s)", flush=True)
    spec = {k: plan[k] for k in ("prompt", "completion", "prompts", "generations", "steps", "warmup", "lr", "device",
                                 "dtype", "threads")}
    spec.update(model_dir=str(model_dir), data=str(data))
    runs = {s: [] for s in plan["systems"]}
    with tempfile.TemporaryDirectory(prefix="velotune-grpo-bench-") as out_root:
        for rep in range(plan["reps"]):
            for system in alternating(plan["systems"], rep):
                result = run_module("velotune.bench.grpo_worker",
                                    dict(spec, system=system, out_dir=str(Path(out_root) / f"{system}-{rep}")),
                                    timeout=plan["timeout"], threads=plan["threads"])
                runs[system].append(result)
                print(report.progress_line(rep, plan["shape"], system, result, rate="input_tokens_per_s",
                                           extras=_rollout_facts(result)), flush=True)
    systems = {}
    for name, rs in runs.items():
        systems[name] = report.aggregate([dict(r, first_loss=0.0) for r in rs])
        if systems[name]["ok"]:
            systems[name]["steps_per_s"] = report.median(r["steps_per_s"] for r in rs if r.get("ok"))
    info = report.run_info({"grpo": runs}, {}, load_before, time.time() - started)
    settings = {k: plan[k] for k in ("device", "dtype", "systems", "reps", "warmup", "steps", "lr", "threads", "quick",
                                     "shape", "prompt", "completion", "prompts", "generations")}
    result = dict(machine=info, settings=settings, systems=systems, runs=runs)
    print_and_save(ns, "grpo", plan, plan["shape"], result, markdown(result))
    return result


def main(argv=None):
    from .options import script_main
    script_main(run, argv, description=__doc__.splitlines()[0])


if __name__ == "__main__":
    main()
