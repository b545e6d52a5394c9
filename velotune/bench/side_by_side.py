"""The driver's half of a two-system benchmark (velotune against a baseline, each repetition of each system in its
own process, alternating): running the workers, taking medians, the ratios and the checks that both trained the same
thing. The Whisper and vision benchmarks share it; each adds its own measures."""
from __future__ import annotations

from pathlib import Path

from . import report
from .processes import alternating, run_module


def run_systems(plan: dict, worker: str, spec: dict, out_root: Path, unit: str) -> dict:
    """{system: [worker results]}: `worker` (a module name) run with `spec` once per system and repetition, the
    systems in alternating order; `unit` names what samples/s counts in the progress line."""
    runs = {s: [] for s in plan["systems"]}
    for rep in range(plan["reps"]):
        for system in alternating(plan["systems"], rep):
            result = run_module(worker, dict(spec, system=system, out_dir=str(out_root / f"{system}-{rep}")),
                                timeout=plan["timeout"], threads=plan["threads"])
            runs[system].append(result)
            extra = [f"{result['samples_per_s']:.3f} {unit}/s"] if result.get("ok") else []
            print(report.progress_line(rep, "lora", system, result, width=5, extras=extra), flush=True)
    return runs


def summarise(runs: dict, medians=()) -> dict:
    """Each system's aggregate, with the medians of samples/s, the collator's seconds per batch and `medians` (more
    keys of the workers' results) over its successful runs."""
    systems = {}
    for name, results in runs.items():
        s = report.aggregate(results)
        if s["ok"]:
            ok = [r for r in results if r.get("ok")]
            for key in ("samples_per_s", "collate_s_per_batch", *medians):
                s[key] = report.median(r.get(key) for r in ok)
        systems[name] = s
    return systems


def ratios(systems: dict, more: dict | None = None) -> dict:
    """velotune / hf: speed (samples/s; label tokens/s is the same ratio on the same batches), peak memory, the
    training's own peak (RSS during training minus RSS before it), and `more` ({ratio name: result key})."""
    ours, base = systems.get("velotune", {}), systems.get("hf", {})
    if not (ours.get("ok") and base.get("ok")):
        return {}
    keys = {"speed": "samples_per_s", "tokens_per_s": "target_tokens_per_s", "memory": "peak_memory_mb",
            "train_extra": "train_extra_mb", **(more or {})}
    return {name: report.ratio(ours.get(key), base.get(key)) for name, key in keys.items()}


def checks(systems: dict) -> dict:
    """Same label tokens at every step (the same samples in the same batches, masked the same way), the same
    trainable parameters, and how far the first losses are apart (same weights and data: only numerics differ)."""
    ok = [s for s in systems.values() if s.get("ok")]
    if len(ok) < 2:
        return {"same_batches": None, "same_trainable_params": None, "first_loss_rel_diff": None}
    losses = [s["first_loss"] for s in ok]
    return {"same_batches": len({tuple(s["step_target_tokens"]) for s in ok}) == 1,
            "same_trainable_params": len({s["trainable_params"] for s in ok}) == 1,
            "first_loss_rel_diff": float(f"{(max(losses) - min(losses)) / abs(min(losses)):.3g}")}


__all__ = ["checks", "ratios", "run_systems", "summarise"]
