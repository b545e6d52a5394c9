"""One system of the GRPO benchmark in one process: a few GRPO steps, one JSON line back.

    python -m velotune.bench.grpo_worker '{"system": "velotune", "model_dir": ..., "data": ..., ...}'

velotune: `vt.load` + `vt.add_lora` + `vt.train` with `objective: grpo` (our KV-cache generation). trl: TRL's
GRPOTrainer (transformers' `generate`) on transformers' model with PEFT LoRA, its defaults (activation checkpointing
on); trl-nogc: checkpointing off. Every system: LoRA r=16, alpha=16 on every linear, `num_generations` completions
of up to `completion` tokens per prompt, temperature 1, no KL (beta 0, TRL's default), dapo loss, the same reward.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from .baselines import LORA_RANK, load_hf_model
from .memory import MemoryMeter
from .processes import worker_main

SYSTEMS = ("velotune", "trl", "trl-nogc")
REWARD = "velotune.bench.grpo_worker:parity_reward"


def parity_reward(prompts, completions, **columns):
    """A cheap reward that differs between completions (so that advantages are not all zero)."""
    return [float(len(str(c)) % 7) / 7 for c in completions]


def run_velotune(spec: dict, meter: MemoryMeter, on_step) -> list:
    import velotune as vt
    model, tokenizer = vt.load(spec["model_dir"], dtype=spec["dtype"], device=spec["device"])
    vt.add_lora(model, r=LORA_RANK, alpha=LORA_RANK, targets="all-linear")
    meter.start()
    lengths = []

    def on_event(event):
        if event.kind == "step":
            lengths.append(event.metrics["completion_length"])
            on_step()
    cfg = {"objective": "grpo", "model": {"path": spec["model_dir"], "dtype": spec["dtype"], "device": spec["device"]},
           "data": {"path": spec["data"], "max_seq_length": spec["prompt"] + spec["completion"], "shuffle": False},
           "grpo": {"num_generations": spec["generations"], "max_completion_length": spec["completion"],
                    "reward_funcs": [REWARD], "temperature": 1.0, "beta": 0.0, "loss_type": "dapo"},
           "train": {"output_dir": spec["out_dir"], "overwrite": True, "batch_size": spec["prompts"],
                     "max_steps": spec["warmup"] + spec["steps"], "lr": spec["lr"], "progress": False,
                     "log_every": 1, "max_grad_norm": 1.0}}
    vt.train(cfg, model=model, tokenizer=tokenizer, callbacks=[on_event])
    return lengths


def run_trl(spec: dict, meter: MemoryMeter, on_step) -> list:
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer
    from .grpo_worker import parity_reward as reward  # the same function object path as velotune's
    model = load_hf_model(spec["model_dir"], spec["dtype"], spec["device"])
    tokenizer = AutoTokenizer.from_pretrained(spec["model_dir"])
    rows = [json.loads(line) for line in Path(spec["data"]).read_text().splitlines() if line.strip()]
    lengths = []

    class Timer(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            on_step()

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "completions/mean_length" in logs:
                lengths.append(logs["completions/mean_length"])
    args = GRPOConfig(output_dir=spec["out_dir"], per_device_train_batch_size=spec["prompts"] * spec["generations"],
                      num_generations=spec["generations"], max_completion_length=spec["completion"],
                      max_steps=spec["warmup"] + spec["steps"], learning_rate=spec["lr"], logging_steps=1,
                      report_to=[], save_strategy="no", beta=0.0, loss_type="dapo", temperature=1.0, top_k=0,
                      max_grad_norm=1.0, use_cpu=not spec["device"].startswith("cuda"),
                      bf16=spec["dtype"] == "bfloat16", gradient_checkpointing=spec["system"] == "trl",
                      dataloader_num_workers=0, seed=42, shuffle_dataset=False)
    trainer = GRPOTrainer(model=model, args=args, reward_funcs=reward, train_dataset=Dataset.from_list(rows),
                          processing_class=tokenizer, callbacks=[Timer()],
                          peft_config=LoraConfig(r=LORA_RANK, lora_alpha=LORA_RANK, lora_dropout=0.0,
                                                 target_modules="all-linear", bias="none", task_type="CAUSAL_LM"))
    meter.start()
    trainer.train()
    return lengths


def run_system(spec: dict) -> dict:
    import torch
    if spec["system"] not in SYSTEMS:
        raise ValueError(f"system {spec['system']!r}: expected one of {', '.join(SYSTEMS)}")
    meter = MemoryMeter(spec["device"])
    cuda = torch.device(spec["device"]).type == "cuda"
    times = []

    def on_step():
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter())
    lengths = (run_velotune if spec["system"] == "velotune" else run_trl)(spec, meter, on_step)
    memory = meter.stop()
    warm, steps = spec["warmup"], spec["steps"]
    if len(times) != warm + steps or len(lengths) != warm + steps:
        raise RuntimeError(f"{len(times)} steps timed and {len(lengths)} completion lengths, expected {warm + steps}")
    seconds = times[-1] - times[warm - 1]
    completions = spec["prompts"] * spec["generations"]
    # Real tokens through the model per step: each completion with its prompt (the reported mean length).
    tokens = sum(completions * (spec["prompt"] + length) for length in lengths[warm:])
    return dict(input_tokens_per_s=round(tokens / seconds, 2), target_tokens_per_s=round(tokens / seconds, 2),
                steps_per_s=round(steps / seconds, 4), timed_seconds=round(seconds, 3),
                completion_lengths=[round(v, 2) for v in lengths], first_loss=None,
                step_target_tokens=[0] * (warm + steps), trainable_params=0, memory=memory, tflops=None)


def main(argv=None):
    worker_main(run_system, argv)


if __name__ == "__main__":
    main()
