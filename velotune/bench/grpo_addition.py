"""GRPO on a task the model can reach: 2-digit additions after a short SFT, velotune against TRL's GRPOTrainer from
the same SFT checkpoint, with the same prompts, reward, seeds, step budget and settings. What is compared is the
reward reached, not speed (the speed benchmark is grpo.py).

    python benchmarks/grpo_addition.py            # ~2 min on the CPU
    python -m velotune.bench.grpo_addition --seeds 1,2,3 --steps 300

A small Llama (hidden 128, 4 layers, random init) with a word-level tokenizer whose words are the numbers 0-198 and
"+" / "=": "12+34=" is four tokens and its answer "46" one. SFT (full fine-tuning, 6 epochs) on 1400 of the 1600 sums a
+ b with 10 <= a, b < 50 leaves sampled answers to 16 of them right a few percent of the time; GRPO then trains on
those 16 prompts with the exact-match reward: 8 completions of up to 2 tokens per prompt, 4 prompts a step, lr 3e-4 constant, dapo,
beta 0, gradient clipping at 1.0, temperature 1. Reported: the mean reward of each system's first and last 10 steps.
"""
from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

SPECIALS = ("<pad>", "<s>", "</s>", "<unk>")
PROMPTS = 16


def build(root: Path) -> tuple[Path, Path, Path]:
    """(model directory, SFT data, GRPO prompts) under `root`."""
    import torch
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
    words = list(SPECIALS) + [str(i) for i in range(199)] + ["+", "="]
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"\d+|\+|="), behavior="isolated")
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                        unk_token="<unk>")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(words), hidden_size=128, intermediate_size=384, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0,
                         bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    model_dir = root / "base"
    LlamaForCausalLM(config).save_pretrained(str(model_dir))
    tokenizer.save_pretrained(str(model_dir))
    sums = [(a, b) for a in range(10, 50) for b in range(10, 50)]
    random.Random(0).shuffle(sums)
    sft = root / "sft.jsonl"
    sft.write_text("".join(json.dumps({"prompt": f"{a}+{b}=", "completion": str(a + b)}) + "\n"
                           for a, b in sums[:1400]), encoding="utf-8")
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"{a}+{b}=", "answer": str(a + b)}) + "\n"
                               for a, b in sums[:PROMPTS]), encoding="utf-8")
    return model_dir, sft, prompts


def sft(model_dir: Path, data: Path, out: Path) -> Path:
    import velotune as vt
    result = vt.train({"model": {"path": str(model_dir), "dtype": "float32", "device": "cpu"},
                       "finetune": {"method": "full"}, "data": {"path": str(data), "max_seq_length": 16,
                                                                "packing": False},
                       "train": {"output_dir": str(out), "overwrite": True, "epochs": 6, "batch_size": 32,
                                 "lr": 3e-3, "progress": False, "log_every": 50, "scheduler": "cosine",
                                 "warmup_ratio": 0.05}})
    return Path(result.model_dir)


def run_velotune(model_dir: Path, prompts: Path, out: Path, steps: int, seed: int) -> list:
    import velotune as vt
    rewards = []
    vt.train({"objective": "grpo", "model": {"path": str(model_dir), "dtype": "float32", "device": "cpu"},
              "finetune": {"method": "full"}, "data": {"path": str(prompts), "max_seq_length": 16},
              "grpo": {"num_generations": 8, "max_completion_length": 2, "reward_funcs": ["exact_match"],
                       "temperature": 1.0, "loss_type": "dapo", "beta": 0.0},
              "train": {"output_dir": str(out), "overwrite": True, "max_steps": steps, "batch_size": 4, "lr": 3e-4,
                        "scheduler": "constant", "max_grad_norm": 1.0, "progress": False, "log_every": 1,
                        "seed": seed}},
             callbacks=[lambda e: rewards.append(e.metrics["reward"]) if e.kind == "step" else None])
    return rewards


def run_trl(model_dir: Path, prompts: Path, out: Path, steps: int, seed: int) -> list:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from ..training.rewards import exact_match_reward
    from .baselines import trainer_checkpointing
    rows = [json.loads(line) for line in prompts.read_text().splitlines()]
    rewards = []
    match = exact_match_reward("answer")

    def exact_match(prompts, completions, **columns):  # the same function velotune's built-in is
        return match(prompts, completions, **columns)

    class Rewards(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "reward" in logs:
                rewards.append(float(logs["reward"]))
    args = GRPOConfig(output_dir=str(out), per_device_train_batch_size=4 * 8, num_generations=8,
                      max_completion_length=2, max_steps=steps, learning_rate=3e-4, lr_scheduler_type="constant",
                      logging_steps=1, report_to=[], save_strategy="no", beta=0.0, loss_type="dapo", temperature=1.0,
                      top_k=0, max_grad_norm=1.0, use_cpu=True, bf16=False, seed=seed, **trainer_checkpointing(False))
    trainer = GRPOTrainer(model=AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32), args=args,
                          reward_funcs=exact_match, train_dataset=Dataset.from_list(rows * (steps // 4 + 1)),
                          processing_class=AutoTokenizer.from_pretrained(str(model_dir)), callbacks=[Rewards()])
    trainer.train()
    return rewards


def markdown(result: dict) -> str:
    from .machine import machine_markdown
    lines = ["# GRPO on 2-digit additions after SFT: velotune vs TRL's GRPOTrainer", "",
             f"Command: `{result['machine']['command']}`  ", __doc__.split("\n\n")[2].replace("\n", " "), "",
             "| seed | velotune first 10 steps | velotune last 10 | TRL first 10 | TRL last 10 |", "|---|---|---|---|---|"]
    for seed, row in result["seeds"].items():
        lines.append(f"| {seed} | {row['velotune'][0]:.3f} | {row['velotune'][1]:.3f} | {row['trl'][0]:.3f} | "
                     f"{row['trl'][1]:.3f} |")
    mean = result["mean_last10"]
    lines += [f"| mean | | {mean['velotune']:.3f} | | {mean['trl']:.3f} |", ""]
    return "\n".join(lines + machine_markdown(result["machine"]))


def main(argv=None):
    import tempfile

    import torch
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="1,2,3")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--out", help="results folder (default: ./benchmarks/results when it exists)")
    ns = parser.parse_args(argv)
    torch.set_num_threads(1)
    from .machine import default_out_dir, load_average, machine_info, write_results
    started, load_before = time.time(), load_average()
    seeds = {}
    with tempfile.TemporaryDirectory(prefix="velotune-grpo-addition-") as tmp:
        root = Path(tmp)
        model_dir, data, prompts = build(root)
        tuned = sft(model_dir, data, root / "sft")
        for seed in (int(s) for s in ns.seeds.split(",")):
            row = {}
            for name, runner in (("velotune", run_velotune), ("trl", run_trl)):
                rewards = runner(tuned, prompts, root / f"{name}-{seed}", ns.steps, seed)
                row[name] = (sum(rewards[:10]) / 10, sum(rewards[-10:]) / 10)
                print(f"seed {seed} {name:8s} first 10 steps {row[name][0]:.3f}  last 10 {row[name][1]:.3f}",
                      flush=True)
            seeds[seed] = row
    mean = {name: sum(r[name][1] for r in seeds.values()) / len(seeds) for name in ("velotune", "trl")}
    result = {"machine": machine_info([], load_before, time.time() - started), "steps": ns.steps, "seeds": seeds,
              "mean_last10": mean}
    text = markdown(result)
    print("\n" + text)
    where = write_results(Path(ns.out) if ns.out else default_out_dir(), "grpo-addition-cpu", result, text)
    print(f"wrote {where}.json and .md")


if __name__ == "__main__":
    main()
