"""`velotune demo`: a tiny Llama-shaped model learns a bundled data set about a made-up island, on the CPU.

Everything is built in-process (tokenizer, model, data), so the demo needs no download. It shows the answers to
a few questions before training, after training (LoRA adapter), and after merging the adapter into the base.
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path

log = logging.getLogger("velotune")

def ask_all(model, tokenizer, questions) -> list[str]:
    from ..infer.generation import generate_batch
    prompts = [[{"role": "user", "content": q}] for q, _ in questions]
    return [a.strip() for a in generate_batch(model, tokenizer, prompts, max_new_tokens=32, temperature=0.0)]


def run_demo(out_dir="runs/demo", steps=None, quick=False, threads=None) -> dict:
    """Builds, trains and questions the demo model; returns the before/after answers and timings."""
    import torch

    from ..lora import merge_lora
    from ..models.loader import load
    from ..training.trainer import train
    from .dataset import DATASET_PATH, DEMO_QUESTIONS, corpus_texts, load_dataset
    from .tiny_model import DEMO_RECIPE, QUICK_STEPS, build_demo_checkpoint
    from .tokenizer import train_demo_tokenizer

    # One thread: the demo's matrices are small, and a second thread mostly adds synchronisation (measured
    # 61 s vs 116 s for the same run on a busy 2-core machine).
    torch.set_num_threads(threads or 1)
    start = time.perf_counter()
    out = Path(out_dir)
    tokenizer = train_demo_tokenizer(corpus_texts(load_dataset(DATASET_PATH)))
    base_dir = build_demo_checkpoint(out / "base", tokenizer, seed=0)
    model, tokenizer = load(base_dir, dtype="float32", device="cpu")
    print(f"demo: a {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M-parameter Llama-shaped model "
          f"(random weights) and {sum(1 for _ in open(DATASET_PATH, encoding='utf-8'))} chat samples about a "
          f"made-up island, Orvandel")
    before = ask_all(model, tokenizer, DEMO_QUESTIONS)

    config = json.loads(json.dumps(DEMO_RECIPE))
    config["model"] = {"path": str(base_dir), "dtype": "float32", "device": "cpu"}
    config["data"]["path"] = str(DATASET_PATH)
    config["train"].update(output_dir=str(out / "train"), overwrite=True, log_every=10, save_every=100,
                           keep_last=1)
    if quick or steps:
        config["train"]["max_steps"] = steps or QUICK_STEPS
    train_start = time.perf_counter()
    result = train(config, model=model, tokenizer=tokenizer)
    train_seconds = time.perf_counter() - train_start
    after = ask_all(model, tokenizer, DEMO_QUESTIONS)
    merge_lora(model)
    merged = ask_all(model, tokenizer, DEMO_QUESTIONS)

    report = _report(DEMO_QUESTIONS, before, after, merged, result, train_seconds, time.perf_counter() - start)
    (out / "demo.json").write_text(json.dumps(report, indent=2, ensure_ascii=False), encoding="utf-8")
    _print(report, out)
    return report


def _report(questions, before, after, merged, result, train_seconds, total_seconds) -> dict:
    rows = [{"question": q, "expected": key, "before": b, "after": a, "merged": m,
             "learned": key.lower() in a.lower(), "merged_learned": key.lower() in m.lower()}
            for (q, key), b, a, m in zip(questions, before, after, merged)]
    return {"rows": rows, "steps": result.steps, "final_loss": result.final_loss,
            "tokens_per_second": result.tokens_per_second, "train_seconds": round(train_seconds, 1),
            "total_seconds": round(total_seconds, 1), "adapter_dir": str(result.adapter_dir),
            "learned": sum(r["learned"] for r in rows), "asked": len(rows)}


def _print(report: dict, out: Path):
    print()
    for row in report["rows"]:
        print(f"Q: {row['question']}")
        print(f"   before training: {row['before'][:90]!r}")
        print(f"   after training:  {row['after'][:90]!r}  {'ok' if row['learned'] else 'missed'}")
        print(f"   merged adapter:  {row['merged'][:90]!r}  {'ok' if row['merged_learned'] else 'missed'}")
    print(f"\n{report['learned']}/{report['asked']} answers learned; {report['steps']} steps, final loss "
          f"{report['final_loss']:.4f}, {report['tokens_per_second']:.0f} real tokens/s, training "
          f"{report['train_seconds']:.0f} s, total {report['total_seconds']:.0f} s")
    print(f"adapter: {report['adapter_dir']}   metrics: {out / 'train' / 'metrics.jsonl'}")
    print(f"chat with it: velotune chat {out / 'base'} --adapter {report['adapter_dir']}")
