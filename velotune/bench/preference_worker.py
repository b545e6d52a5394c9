"""One system of the DPO benchmark in one process: train a few DPO steps, print one JSON line.

    python -m velotune.bench.preference_worker '{"system": "velotune", "model_dir": ..., "data": ..., ...}'

velotune: `vt.load` + `vt.add_lora` + `vt.train` with `objective: dpo` (reference: the adapters switched off).
trl: TRL's DPOTrainer on transformers' model with PEFT LoRA given as `peft_config` (its reference: the adapter
switched off), with TRL's defaults (activation checkpointing on); trl-nogc: the same with checkpointing off.
Every system: LoRA r=16, alpha=16 on every linear, beta 0.1, AdamW, the same pairs (every pair the same length, so
every step puts the same number of real tokens through the model, whatever the order).
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from .baselines import LORA_RANK, load_hf_model
from .memory import MemoryMeter
from .processes import worker_main

SYSTEMS = ("velotune", "trl", "trl-nogc")
BETA = 0.1


def run_velotune(spec: dict, meter: MemoryMeter, on_step) -> list:
    import velotune as vt
    model, tokenizer = vt.load(spec["model_dir"], dtype=spec["dtype"], device=spec["device"])
    vt.add_lora(model, r=LORA_RANK, alpha=LORA_RANK, targets="all-linear")
    meter.start()
    losses = []

    def on_event(event):
        if event.kind == "step":
            losses.append(event.metrics["loss"])
            on_step()
    cfg = {"objective": "dpo", "model": {"path": spec["model_dir"], "dtype": spec["dtype"], "device": spec["device"]},
           "data": {"path": spec["data"], "max_seq_length": spec["seq"], "shuffle": False},
           "preference": {"beta": BETA},
           "train": {"output_dir": spec["out_dir"], "overwrite": True, "batch_size": spec["batch"],
                     "max_steps": spec["warmup"] + spec["steps"], "lr": spec["lr"], "progress": False,
                     "log_every": 1, "max_grad_norm": 1.0}}
    vt.train(cfg, model=model, tokenizer=tokenizer, callbacks=[on_event])
    return losses


def run_trl(spec: dict, meter: MemoryMeter, on_step) -> list:
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer
    model = load_hf_model(spec["model_dir"], spec["dtype"], spec["device"])
    tokenizer = AutoTokenizer.from_pretrained(spec["model_dir"])
    rows = [json.loads(line) for line in Path(spec["data"]).read_text().splitlines() if line.strip()]
    losses = []

    class Timer(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            on_step()

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                losses.append(logs["loss"])
    args = DPOConfig(output_dir=spec["out_dir"], per_device_train_batch_size=spec["batch"],
                     max_steps=spec["warmup"] + spec["steps"], learning_rate=spec["lr"], logging_steps=1,
                     report_to=[], save_strategy="no", beta=BETA, max_length=spec["seq"], max_grad_norm=1.0,
                     use_cpu=not spec["device"].startswith("cuda"), bf16=spec["dtype"] == "bfloat16",
                     gradient_checkpointing=spec["system"] == "trl", dataloader_num_workers=0, seed=42)
    trainer = DPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
                         peft_config=LoraConfig(r=LORA_RANK, lora_alpha=LORA_RANK, lora_dropout=0.0,
                                                target_modules="all-linear", bias="none", task_type="CAUSAL_LM"),
                         callbacks=[Timer()])
    meter.start()
    trainer.train()
    return losses


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
    runner = run_velotune if spec["system"] == "velotune" else run_trl
    losses = runner(spec, meter, on_step)
    memory = meter.stop()
    warm, steps = spec["warmup"], spec["steps"]
    if len(times) != warm + steps:
        raise RuntimeError(f"{len(times)} steps timed, expected {warm + steps}")
    seconds = times[-1] - times[warm - 1]
    tokens = spec["tokens_per_step"] * steps  # every pair is as long as every other: real tokens, no padding
    return dict(input_tokens_per_s=round(tokens / seconds, 2), target_tokens_per_s=round(tokens / seconds, 2),
                pairs_per_s=round(spec["batch"] * steps / seconds, 3), timed_seconds=round(seconds, 3),
                losses=[round(v, 6) for v in losses], first_loss=losses[0] if losses else None,
                step_target_tokens=[spec["tokens_per_step"]] * (warm + steps), trainable_params=0, memory=memory,
                tflops=None)


def main(argv=None):
    worker_main(run_system, argv)


if __name__ == "__main__":
    main()
