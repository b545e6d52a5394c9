"""What the DPO and GRPO benchmark workers share: step timing around either trainer, and TRL's side set up as its
users write it (transformers' model, PEFT LoRA given as `peft_config`, TRL's defaults but the ones the comparison
fixes)."""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable

from .baselines import LORA_RANK, load_hf_model, trainer_checkpointing
from .memory import MemoryMeter


def timed(spec: dict, runners: dict[str, Callable]) -> tuple[list, list, dict]:
    """Runs `runners[system or "trl"](spec, meter, on_step)`; returns (step end times, what the runner returned,
    memory). `on_step` is called at the end of every optimizer step (after a device synchronisation on CUDA)."""
    import torch
    known = ("velotune", "trl", "trl-nogc")
    if spec["system"] not in known:
        raise ValueError(f"system {spec['system']!r}: expected one of {', '.join(known)}")
    meter = MemoryMeter(spec["device"])
    cuda = torch.device(spec["device"]).type == "cuda"
    times = []

    def on_step():
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter())
    runner = runners["velotune" if spec["system"] == "velotune" else "trl"]
    values = runner(spec, meter, on_step)
    memory = meter.stop()
    if len(times) != spec["warmup"] + spec["steps"]:
        raise RuntimeError(f"{len(times)} steps timed, expected {spec['warmup'] + spec['steps']}")
    return times, values, memory


def timed_seconds(spec: dict, times: list) -> float:
    """Seconds of the timed steps (after the warm-up ones)."""
    return times[-1] - times[spec["warmup"] - 1]


def run_trl_trainer(spec: dict, meter: MemoryMeter, on_step, make_trainer: Callable, log_key: str) -> list:
    """Builds the model, tokenizer and data TRL gets, then `make_trainer(model, tokenizer, dataset, common_args,
    peft_config, callbacks)`, trains, and returns the values TRL logged under `log_key`, one per step."""
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoTokenizer, TrainerCallback
    model = load_hf_model(spec["model_dir"], spec["dtype"], spec["device"])
    tokenizer = AutoTokenizer.from_pretrained(spec["model_dir"])
    rows = [json.loads(line) for line in Path(spec["data"]).read_text().splitlines() if line.strip()]
    logged = []

    class Timer(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            on_step()

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and log_key in logs:
                logged.append(logs[log_key])
    common = dict(output_dir=spec["out_dir"], max_steps=spec["warmup"] + spec["steps"], learning_rate=spec["lr"],
                  logging_steps=1, report_to=[], save_strategy="no", max_grad_norm=1.0,
                  use_cpu=not spec["device"].startswith("cuda"), bf16=spec["dtype"] == "bfloat16",
                  dataloader_num_workers=0, seed=42, **trainer_checkpointing(spec["system"] == "trl"))
    peft_config = LoraConfig(r=LORA_RANK, lora_alpha=LORA_RANK, lora_dropout=0.0, target_modules="all-linear",
                             bias="none", task_type="CAUSAL_LM")
    trainer = make_trainer(model, tokenizer, Dataset.from_list(rows), common, peft_config, [Timer()])
    meter.start()
    trainer.train()
    return logged


def velotune_model(spec: dict):
    """`vt.load` + LoRA on every linear, as both benchmarks train it."""
    import velotune as vt
    model, tokenizer = vt.load(spec["model_dir"], dtype=spec["dtype"], device=spec["device"])
    vt.add_lora(model, r=LORA_RANK, alpha=LORA_RANK, targets="all-linear")
    return model, tokenizer


def velotune_train_section(spec: dict, batch_size: int) -> dict:
    return {"output_dir": spec["out_dir"], "overwrite": True, "batch_size": batch_size,
            "max_steps": spec["warmup"] + spec["steps"], "lr": spec["lr"], "progress": False, "log_every": 1,
            "max_grad_norm": 1.0}
