"""Mixture-of-experts LoRA fine-tuning: velotune vs transformers + PEFT, side by side, each system in its own process.

    velotune bench --moe                     # CPU, fp32: Qwen3-MoE and Mixtral shapes (8 experts, top-2), 2 x 512
    velotune bench --moe --quick             # tiny MoE shapes, 1 + 2 steps: checks the code works
    velotune bench --moe --cases mixtral     # one case
    velotune bench --moe --methods qlora     # one method (lora / experts: fp32 weights; qlora: NF4 base)
    python benchmarks/moe_bench.py ...       # the same, from a clone

Models: random weights (normal, std 0.02; norms at 1) in a Qwen3-MoE and a Mixtral shape of the same size (hidden
512, 4 layers, 8 experts of 1024, top-2, 8 query / 4 key-value heads, vocabulary 32,000), written by transformers'
save_pretrained (per-expert tensors, the hub's layout) once and cached. Batches: rows of random token ids filling
the sequence (one document a row), labels = ids, seeded: both systems train the same batches. LoRA r=16, alpha=32
on q/k/v/o of every layer, the same lr, schedule and clipping. Methods: lora (the weights as stored, fp32),
experts (the same, LoRA on every expert as well: see moe_worker.py) and qlora (the decoder's linears in NF4 with
double quantization, computing in bf16, the rest in bf16: bitsandbytes on both sides; transformers' fused expert
tensors are not linears, so its QLoRA keeps the experts in bf16 where velotune quantizes each expert).
The workers are moe_worker.py. Results: <out>/moe-<device>-<case>[-experts|-qlora].json and .md, one pair per case
and method.
"""
from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

from ..errors import ConfigError
from . import assets, report
from .machine import load_average, machine_markdown, print_and_save, short_dtype
from .processes import run_module
from .side_by_side import checks, ratios, run_systems, summarise
from .train import is_cuda, pick, side_plan
from .moe_worker import LORA_ALPHA, LORA_RANK, LORA_TARGETS, METHODS, SYSTEMS

_COMMON = dict(vocab_size=32000, hidden_size=512, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4,
               head_dim=64, max_position_embeddings=8192, rms_norm_eps=1e-6, tie_word_embeddings=False,
               num_experts_per_tok=2, output_router_logits=False)
# transformers config fields by case; `model_type` picks the architecture.
SHAPES = {
    "qwen3-moe": dict(_COMMON, model_type="qwen3_moe", num_experts=8, moe_intermediate_size=1024,
                      intermediate_size=2048, norm_topk_prob=True, decoder_sparse_step=1),
    "mixtral": dict(_COMMON, model_type="mixtral", num_local_experts=8, intermediate_size=1024, sliding_window=None),
}
_TINY = dict(vocab_size=1024, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             head_dim=16)
QUICK_SHAPES = {"qwen3-moe": dict(SHAPES["qwen3-moe"], **_TINY, moe_intermediate_size=64, intermediate_size=128),
                "mixtral": dict(SHAPES["mixtral"], **_TINY, intermediate_size=64)}
PLANS = {
    # Three processes a system, alternating: on a shared machine one process can run ~20% slower throughout.
    "cpu": dict(cases=list(SHAPES), seq=512, batch=2, warmup=1, steps=3, reps=3, systems=list(SYSTEMS),
                precision="fp32", methods=list(METHODS)),
    "cpu-quick": dict(cases=list(SHAPES), seq=64, batch=1, warmup=1, steps=2, reps=1, systems=list(SYSTEMS),
                      precision="fp32", methods=list(METHODS)),
    # Not run here (no GPU on the machine this was written on): bf16 autocast over fp32 weights, on both sides.
    "cuda": dict(cases=list(SHAPES), seq=2048, batch=4, warmup=3, steps=10, reps=2, systems=list(SYSTEMS),
                 precision="bf16", methods=list(METHODS)),
    "cuda-quick": dict(cases=list(SHAPES), seq=256, batch=2, warmup=1, steps=2, reps=1, systems=list(SYSTEMS),
                       precision="bf16", methods=list(METHODS)),
}
NOT_HERE = ("max_seq_search", "memory_budget_mb", "seq_limit", "seq_grain", "peak_tflops")
LR = 2e-4
# Issue 18's goals for this benchmark (the CPU only).
GOALS = {"cpu": dict(speed=2.0, memory=0.5)}


def make_plan(ns) -> dict:
    plan = side_plan(ns, PLANS, SYSTEMS, lr=LR, name="moe", refused=NOT_HERE,
                     why=" (it trains fixed MoE shapes with LoRA on random tokens)")
    # The weights stay fp32 on both sides: --dtype bfloat16 means bf16 autocast (mixed precision), the CUDA default.
    plan["dtype"] = "float32"
    if ns.dtype:
        plan["precision"] = short_dtype(ns.dtype)  # bf16 or fp32 autocast
    if ns.cases:
        plan["cases"] = pick(ns.cases, list(SHAPES), "--cases")
    if ns.methods:
        plan["methods"] = pick(ns.methods, list(METHODS), "--methods")
    if plan["batch"] < 1 or plan["seq"] < 2:
        raise ConfigError(f"--batch {plan['batch']} --seq {plan['seq']}: at least one row of two tokens a step")
    plan["shapes"] = QUICK_SHAPES if plan["quick"] else SHAPES
    return plan


def model_dir(cache: Path, shape: dict, plan: dict) -> tuple[Path, int]:
    """(the shape's checkpoint directory, its parameter count): written once into the cache by a child process
    (torch and transformers stay out of this one), in a temporary folder renamed in."""
    out = cache / f"moe-{shape['model_type']}-{assets._key(shape)}"

    def build(staging: Path) -> Path:
        made = run_module("velotune.bench.moe_worker", dict(system="checkpoint", device="cpu", shape=shape,
                                                            out_dir=str(staging / "model")),
                          timeout=plan["timeout"], threads=os.cpu_count() or 1)
        if not made.get("ok"):
            raise ConfigError(f"could not write the benchmark's {shape['model_type']} checkpoint: {made.get('error')}")
        (staging / "model" / "parameters.json").write_text(json.dumps({"parameters": made["parameters"]}))
        return staging / "model"
    assets.build_once(out, build, what="MoE checkpoint", markers=("config.json", "parameters.json"))
    return out, json.loads((out / "parameters.json").read_text())["parameters"]


# ---- running ------------------------------------------------------------------------------------------------------

def run(ns) -> dict:
    """Every case of the plan; returns {case: result} (each also printed and saved)."""
    plan = make_plan(ns)
    cache = assets.default_cache_dir()
    return {case + _suffix(method): run_case(ns, plan, case, cache, method)
            for case in plan["cases"] for method in plan["methods"]}


def _suffix(method: str) -> str:
    return "" if method == "lora" else f"-{method}"


def run_case(ns, plan: dict, case: str, cache: Path, method: str = "lora") -> dict:
    started, load_before = time.time(), load_average()
    shape = plan["shapes"][case]
    model, parameters = model_dir(cache, shape, plan)
    # qlora: NF4 linears computing in bf16, the other weights in bf16, no autocast (what QLoRA users run), where
    # the machine multiplies bf16 natively; else all of it in fp32 (emulated bf16 matmuls run ~40x slower on both sides).
    dtype, precision = (qlora_dtype(plan["device"]), "fp32") if method == "qlora" else (plan["dtype"], plan["precision"])
    print(f"moe benchmark on {plan['device']} ({_precision_words(method, plan['precision'], dtype)}): {case} "
          f"({parameters / 1e6:.1f}M parameters), {method.upper() if method == 'qlora' else 'LoRA'} "
          f"r={LORA_RANK} on {'/'.join(LORA_TARGETS)}{' and the experts' if method == 'experts' else ''}; "
          f"{plan['batch']} x {plan['seq']} tokens a step, "
          f"{plan['warmup']} + {plan['steps']} steps; {plan['reps']} process(es) per system", flush=True)
    with tempfile.TemporaryDirectory(prefix="velotune-moe-bench-") as out_root:
        spec = dict(model_dir=str(model), seq=plan["seq"], batch=plan["batch"], warmup=plan["warmup"],
                    steps=plan["steps"], lr=plan["lr"], device=plan["device"], dtype=dtype,
                    precision=precision, threads=plan["threads"], seed=0, method=method)
        runs = run_systems(plan, "velotune.bench.moe_worker", spec, Path(out_root), "rows")
    systems = summarise(runs, ("setup_s", "tokens_per_cpu_s"))
    for name, s in systems.items():
        ok = [r for r in runs[name] if r.get("ok")]
        if ok:
            s.update(attn_implementation=ok[0].get("attn_implementation"),
                     experts_implementation=ok[0].get("experts_implementation"))
    info = report.run_info({case: runs}, {}, load_before, time.time() - started)
    settings = {k: plan[k] for k in ("device", "systems", "reps", "warmup", "steps", "lr", "threads", "quick", "seq",
                                     "batch")}
    settings.update(case=case, method=method, dtype=dtype, precision=precision, model=shape, parameters=parameters,
                    model_dir=str(model), lora_rank=LORA_RANK, lora_alpha=LORA_ALPHA, lora_targets=LORA_TARGETS,
                    scheduler="constant", max_grad_norm=1.0,
                    goals=GOALS.get("cuda" if is_cuda(plan["device"]) else "cpu"))
    result = dict(machine=info, settings=settings, systems=systems,
                  ratios=ratios(systems, {"input_tokens_per_s": "input_tokens_per_s",
                                          "tokens_per_cpu_s": "tokens_per_cpu_s"}),
                  **checks(systems),
                  runs={k: [{n: v for n, v in r.items() if n != "traceback" or not r.get("ok")} for r in rs]
                        for k, rs in runs.items()})
    # The file name keeps the plan's precision (a QLoRA result is told apart by its "-qlora" suffix).
    named = "bfloat16" if plan["precision"] == "bf16" else "float32"
    print_and_save(ns, "moe", dict(plan, dtype=named), case + _suffix(method) + ("-quick" if plan["quick"] else ""),
                   result, markdown(result))
    return result


# ---- markdown -----------------------------------------------------------------------------------------------------

def _table(result: dict) -> str:
    cuda = is_cuda(result["settings"]["device"])
    mem = "max reserved MB" if cuda else "peak RSS MB"
    lines = [f"| system | tokens/s | tokens per CPU s | {mem} | RSS before training MB | training's own peak MB | "
             "trainable params | first loss | setup s | attention / experts |", "|---|---|---|---|---|---|---|---|---|---|"]
    for name, s in result["systems"].items():
        if not s["ok"]:
            lines.append(f"| {name} | failed: {s['error'][:120]} |||||||||")
            continue
        impl = (f"{s['attn_implementation']} / {s['experts_implementation']}" if s.get("attn_implementation")
                else "velotune's own")
        lines.append(f"| {name} | {s['input_tokens_per_s']:.1f} | {report.fmt(s.get('tokens_per_cpu_s'), '.1f')} | "
                     f"{report.fmt(s['peak_memory_mb'], '.0f')} | {report.fmt(s.get('rss_before_train_mb'), '.0f')} | "
                     f"{report.fmt(s.get('train_extra_mb'), '.0f')} | {s['trainable_params']:,} | "
                     f"{report.fmt(s.get('first_loss'), '.6f')} | {report.fmt(s.get('setup_s'), '.1f')} | {impl} |")
    return "\n".join(lines)


def _ratio_lines(result: dict) -> list:
    r = result["ratios"]
    if not r:
        return ["No ratios: a system failed (see its row)."]
    checked = {True: "yes", False: "NO", None: "—"}
    experts = result["settings"].get("method") == "experts"
    layouts = " (by design: the expert layouts differ, see above)" if experts else ""
    lines = ["| velotune / hf | tokens/s | tokens per CPU s | peak memory | training's own peak |",
             "|---|---|---|---|---|",
             f"| | {report.fmt(r['input_tokens_per_s'], '.2f', 'x')} | {report.fmt(r['tokens_per_cpu_s'], '.2f', 'x')}"
             f" | {report.fmt(r['memory'], '.2f', 'x')} | {report.fmt(r['train_extra'], '.2f', 'x')} |", ""]
    goals = result["settings"].get("goals")
    if goals:
        lines.append(f"Goals (issue 18, on the CPU): tokens/s >= {goals['speed']:g}x: "
                     f"{'met' if (r['speed'] or 0) >= goals['speed'] else 'not met'}; peak memory <= "
                     f"{goals['memory']:g}x: {'met' if r['memory'] and r['memory'] <= goals['memory'] else 'not met'}"
                     ".  ")
    lines.append(f"Checks: the same batches (same token count at every step): {checked[result['same_batches']]}; the "
                 f"same trainable parameters: {checked[result['same_trainable_params']]}{layouts}; first losses apart "
                 f"by {report.fmt(result['first_loss_rel_diff'], '.1e')} (relative; the same weights and tokens: only "
                 "the numerics differ).")
    return lines


def qlora_dtype(device: str) -> str:
    """The dtype QLoRA computes in and keeps its other weights in: bf16 on GPUs and on CPUs with bf16 instructions."""
    from ..models.dtypes import cpu_has_native_bf16
    return "bfloat16" if is_cuda(device) or cpu_has_native_bf16() else "float32"


def _precision_words(method: str, precision: str, dtype: str = "bfloat16") -> str:
    if method == "qlora":
        return f"NF4 base, {short_dtype(dtype)} compute"
    return "fp32" + (", bf16 autocast" if precision == "bf16" else "")


def _method_words(s: dict, versions: dict) -> str:
    """What each side holds, by method."""
    if s.get("method") != "qlora":
        return "the weights fp32 as stored"
    d = short_dtype(s.get("dtype", "bfloat16"))
    why = "" if d == "bf16" else " (fp32: this CPU has no bf16 instructions, where bf16 matmuls run ~40x slower)"
    return ("QLoRA: every linear of the decoder blocks except the routers in NF4 (blocksize 64, double quantization) "
            f"computing in {d}, embeddings, head, norms and routers in {d}{why}, LoRA weights fp32, no autocast, on both "
            f"sides through bitsandbytes {versions.get('bitsandbytes')} (transformers: BitsAndBytesConfig "
            "load_in_4bit). transformers holds the experts as fused [experts, out, in] parameters, which its "
            f"bitsandbytes integration does not quantize: they stay in {d} there, where velotune quantizes each "
            "expert (most of an MoE model's weights)")


def _expert_words(method: str) -> str:
    if method == "experts":
        return (", and on every expert: velotune adapts each expert's gate, up and down linears (each its own A and "
                "B), PEFT adapts transformers 5's fused [experts, out, in] tensors through target_parameters, where "
                "gate and up share one A per expert (so PEFT trains a few fewer parameters: both counts are in the "
                "table; the adapters velotune saves load in PEFT with the same logits)")
    return ("; not on the experts (method 'experts' adapts them too)")


def markdown(result: dict) -> str:
    s, m = result["settings"], result["machine"]
    cuda, shape, versions = is_cuda(s["device"]), s["model"], m["versions"]
    method = s.get("method", "lora")
    experts = shape.get("num_experts") or shape.get("num_local_experts")
    width = shape.get("moe_intermediate_size") if shape["model_type"] == "qwen3_moe" else shape["intermediate_size"]
    title = {"qlora": "QLoRA", "experts": "LoRA (attention and experts)"}.get(method, "LoRA (attention)")
    words = _precision_words(method, s["precision"], s.get("dtype", "bfloat16"))
    text = [f"# Mixture-of-experts {title} fine-tuning: velotune vs "
            f"transformers + PEFT, {s['case']} ({s['device']}, {words})", "",
            f"Command: `{m['command']}`  ",
            f"Model: {shape['model_type']} with random weights (normal, std 0.02; norms at 1; {s['parameters'] / 1e6:.1f}M "
            f"parameters), written by transformers' save_pretrained: {shape['num_hidden_layers']} layers, hidden "
            f"{shape['hidden_size']}, {experts} experts of {width}, top-{shape['num_experts_per_tok']}"
            f"{', top-k renormalised' if shape.get('norm_topk_prob') else ''}, {shape['num_attention_heads']} query / "
            f"{shape['num_key_value_heads']} key-value heads of {shape['head_dim']}, vocabulary "
            f"{shape['vocab_size']:,}; {_method_words(s, versions)}; no router "
            "load-balancing loss (output_router_logits false, as written).  ",
            f"LoRA r={s['lora_rank']}, alpha={s['lora_alpha']}, dropout 0 on {', '.join(s['lora_targets'])} of every "
            f"layer, on both sides{_expert_words(method)}.  ",
            f"Data: {s['batch']} row(s) x {s['seq']} random token ids a step (one document filling each row), labels "
            "= ids, seeded: the same batches on both sides.  ",
            f"Training: the same plain loop on both sides (`model(input_ids=ids, labels=ids)`, backward, clipping "
            f"{s['max_grad_norm']:g}, AdamW with {s['scheduler']} lr {s['lr']:g}, no weight decay; each system's own "
            "AdamW: velotune's is `vt.train`'s (torch's fused update without importing torch's compiler stack, "
            "~150 MB resident), hf's torch.optim.AdamW as transformers' Trainer builds it).  ",
            f"Systems: velotune (`vt.load` + `vt.add_lora`: its own MoE code), hf (transformers "
            f"{versions.get('transformers')} AutoModelForCausalLM with its default attention and experts "
            f"implementations, see the table, + PEFT {versions.get('peft')} get_peft_model).  ",
            f"Each process: {s['warmup']} untimed + {s['steps']} timed optimizer steps (loading excluded); "
            f"{s['reps']} process(es) per system, alternating; medians; {s['threads']} torch thread(s).  ",
            "tokens/s: input tokens per second of the timed steps; tokens per CPU s: the same per second of the "
            "process's CPU time (steadier when other work shares the machine). " + report.memory_words(cuda)
            + " setup s: loading and adding LoRA.", "",
            "## Results", "", _table(result), "", *_ratio_lines(result), ""]
    return "\n".join(text + machine_markdown(m))


def main(argv=None):
    from .options import script_main
    script_main(run, argv, description=__doc__.splitlines()[0])


if __name__ == "__main__":
    main()
