"""DPO training: velotune vs TRL + PEFT, side by side, each system in its own process.

    velotune bench --preference                 # CPU: the 56M Llama at vocab 32000 and 128256, pairs of 1024 tokens
    velotune bench --preference --quick         # tiny shapes, under a minute
    python benchmarks/dpo_bench.py ...          # the same, from a clone

Every pair is a prompt of seq/2 - 1 random words, then a chosen and a rejected completion of seq/2 words each (+ EOS):
two sequences of exactly `seq` tokens per pair, so every step puts batch x 2 x seq real tokens through the policy
(the reference's forward comes on top, in every system alike). tokens/s counts those. Memory: the process's peak
RSS (CPU; loading included) or the allocator's peak reserved memory (CUDA). Results:
<out>/dpo-<device>-<shape>.json and .md.
"""
from __future__ import annotations

import json
import os
import random
import time
from pathlib import Path

from ..errors import ConfigError
from . import assets, report
from .machine import load_average, machine_markdown, print_and_save
from .preference_worker import SYSTEMS
from .processes import alternating, run_module
from .train import is_cuda, side_plan

PLANS = {
    "cpu": dict(shapes=["llama-56m", "llama-56m-128k"], seq=1024, batch=2, systems=list(SYSTEMS), reps=2, warmup=1,
                steps=3),
    "cpu-quick": dict(shapes=["tiny"], seq=128, batch=2, systems=["velotune", "trl"], reps=1, warmup=1, steps=2),
    "cuda": dict(shapes=["llama-56m", "llama-56m-128k"], seq=1024, batch=8, systems=list(SYSTEMS), reps=2,
                 warmup=2, steps=6),
    "cuda-quick": dict(shapes=["tiny"], seq=256, batch=2, systems=["velotune", "trl"], reps=1, warmup=1, steps=2),
}
NOT_HERE = ("methods", "cases", "max_seq_search", "memory_budget_mb", "seq_limit", "seq_grain", "loop")


def make_plan(ns) -> dict:
    plan = side_plan(ns, PLANS, SYSTEMS, lr=5e-5, name="DPO", refused=NOT_HERE)
    if plan["seq"] < 8 or plan["seq"] % 2:
        raise ConfigError(f"--seq {plan['seq']}: the DPO benchmark needs an even length of at least 8")
    return plan


def pairs_file(model_dir: Path, *, seq: int, pairs: int, seed: int = 0) -> Path:
    """Preference pairs of random words, each side exactly `seq` tokens long (prompt seq/2 - 1, completion seq/2,
    EOS)."""
    path = model_dir / f"pairs-{seq}-{pairs}-{seed}.jsonl"
    if path.is_file():
        return path
    words = json.loads((model_dir / "config.json").read_text())["vocab_size"] - len(assets.SPECIALS)
    rng = random.Random(seed)

    def text(n):
        return " ".join(f"w{rng.randrange(words)}" for _ in range(n))
    rows = [{"prompt": text(seq // 2 - 1), "chosen": " " + text(seq // 2), "rejected": " " + text(seq // 2)}
            for _ in range(pairs)]
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    os.replace(tmp, path)
    return path


def run_shape(plan: dict, shape: str, cache: Path, out_root: Path) -> dict:
    model_dir = assets.ensure_checkpoint(shape, plan["dtype"], plan["device"], cache)
    data = pairs_file(model_dir, seq=plan["seq"], pairs=plan["batch"] * (plan["warmup"] + plan["steps"]) + 2)
    spec = dict(model_dir=str(model_dir), data=str(data), seq=plan["seq"], batch=plan["batch"], steps=plan["steps"],
                warmup=plan["warmup"], lr=plan["lr"], device=plan["device"], dtype=plan["dtype"],
                threads=plan["threads"], tokens_per_step=plan["batch"] * 2 * plan["seq"])
    runs = {s: [] for s in plan["systems"]}
    for rep in range(plan["reps"]):
        for system in alternating(plan["systems"], rep):
            result = run_module("velotune.bench.preference_worker",
                                dict(spec, system=system, out_dir=str(out_root / f"{shape}-{system}-{rep}")),
                                timeout=plan["timeout"], threads=plan["threads"])
            runs[system].append(result)
            print(report.progress_line(rep, shape, system, result, rate="input_tokens_per_s", width=15),
                  flush=True)
    systems = {s: report.aggregate(r) for s, r in runs.items()}
    return dict(name=shape, shape=shape, vocab_size=assets.SHAPES[shape]["vocab_size"], systems=systems,
                ratios=_ratios(systems), runs=runs)


def _ratios(systems: dict) -> dict:
    ours = systems.get("velotune", {})
    if not ours.get("ok"):
        return {}
    return {base: {"speed": report.ratio(ours["input_tokens_per_s"], b["input_tokens_per_s"]),
                   "memory": report.ratio(ours["peak_memory_mb"], b["peak_memory_mb"]),
                   "train_extra": report.ratio(ours.get("train_extra_mb"), b.get("train_extra_mb"))}
            for base, b in systems.items() if base != "velotune" and b.get("ok")}


def _table(case: dict, cuda: bool) -> str:
    mem = "max reserved MB" if cuda else "peak RSS MB"
    lines = [f"| system | tokens/s | pairs/s | {mem} | RSS before training MB | training's own peak MB | first loss | "
             "vs trl (speed, memory, training's own) | vs trl-nogc |", "|---|---|---|---|---|---|---|---|---|"]
    for name, s in case["systems"].items():
        if not s["ok"]:
            lines.append(f"| {name} | failed: {s['error'][:100]} | | | | | | | |")
            continue
        vs = []
        for base in ("trl", "trl-nogc"):
            r = case["ratios"].get(base) if name == "velotune" else None
            vs.append(", ".join(report.fmt(r[k], ".2f", "x") for k in ("speed", "memory", "train_extra")) if r else "")
        first = report.fmt(s.get("first_loss"), ".5f")
        lines.append(f"| {name} | {s['input_tokens_per_s']:.1f} | {s['input_tokens_per_s'] / case['tokens_per_pair']:.3f} | "
                     f"{report.fmt(s['peak_memory_mb'], '.0f')} | {report.fmt(s.get('rss_before_train_mb'), '.0f')} | "
                     f"{report.fmt(s.get('train_extra_mb'), '.0f')} | {first} | {vs[0]} | {vs[1]} |")
    return "\n".join(lines)


def markdown(result: dict) -> str:
    s, m = result["settings"], result["machine"]
    cuda = is_cuda(s["device"])
    text = [f"# DPO training: velotune vs TRL + PEFT ({s['device']}, {s['dtype']})", "",
            f"Command: `{m['command']}`  ",
            f"Pairs: prompt {s['seq'] // 2 - 1} + completion {s['seq'] // 2} + EOS = {s['seq']} tokens per side, "
            f"{s['batch']} pairs per step; {s['warmup']} untimed + {s['steps']} timed steps per process; "
            f"{s['reps']} process(es) per system, alternating; medians; {s['threads']} torch thread(s).  ",
            "Systems: velotune (`vt.train`, objective dpo; reference: adapters off), trl (TRL "
            f"{m['versions'].get('trl', '?')} DPOTrainer, PEFT LoRA, its defaults: activation checkpointing on), "
            "trl-nogc (the same, checkpointing off). LoRA r=16, alpha=16 on every linear; beta 0.1; AdamW.  ",
            "tokens/s: real tokens through the policy per second (chosen + rejected; the reference's forward is "
            "extra work every system does alike). Peak RSS includes the libraries each system imports; the "
            "training's own peak is the peak during training minus the RSS just before it.", ""]
    for case in result["cases"]:
        text += [f"## {case['shape']} (vocabulary {case['vocab_size']:,})", "", _table(case, cuda), ""]
    text += ["## Peak memory as the vocabulary grows", "", _growth_table(result["cases"]), "",
             f"Goals: >= {s['goals']['speed']}x tokens/s and <= {s['goals']['memory']}x peak memory of TRL + PEFT, "
             "and a peak that stays flat as the vocabulary grows.", ""]
    return "\n".join(text + machine_markdown(m))


def _growth_table(cases: list) -> str:
    systems = list(cases[0]["systems"])
    lines = ["| system | " + " | ".join(f"vocab {c['vocab_size']:,}" for c in cases) + " |",
             "|---|" + "---|" * len(cases)]
    for name in systems:
        cells = [f"{report.fmt(c['systems'][name].get('peak_memory_mb'), '.0f')} MB (training's own "
                 f"{report.fmt(c['systems'][name].get('train_extra_mb'), '.0f')} MB)" for c in cases]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run(ns) -> dict:
    import tempfile
    plan = make_plan(ns)
    started, load_before = time.time(), load_average()
    print(f"DPO benchmark on {plan['device']} ({plan['dtype']}): {', '.join(plan['systems'])} x {plan['reps']} "
          f"repetition(s), {plan['batch']} pairs of 2 x {plan['seq']} tokens per step", flush=True)
    cases = []
    with tempfile.TemporaryDirectory(prefix="velotune-dpo-bench-") as out_root:
        for shape in plan["shapes"]:
            case = run_shape(plan, shape, assets.default_cache_dir(), Path(out_root))
            case["tokens_per_pair"] = 2 * plan["seq"]
            cases.append(case)
    info = report.run_info({c["name"]: c["runs"] for c in cases}, {}, load_before, time.time() - started)
    settings = {k: plan[k] for k in ("device", "dtype", "systems", "reps", "warmup", "steps", "lr", "threads",
                                     "quick", "shapes", "seq", "batch")}
    settings["goals"] = {"speed": 1.5, "memory": 0.5}
    result = dict(machine=info, settings=settings, cases=cases)
    print_and_save(ns, "dpo", plan, plan["shapes"][0], result, markdown(result))
    return result


def main(argv=None):
    from .options import script_main
    script_main(run, argv, description=__doc__.splitlines()[0])


if __name__ == "__main__":
    main()
