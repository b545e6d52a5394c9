"""One system of the loop benchmark in one process: build the model, run `training_loop`, print one JSON line.

    python -m velotune.bench.loop_worker '{"system": "velotune", "model_dir": ..., "seq": 1024, "batch": 2, ...}'

`training_loop` is the code under test, written once the way a loop for transformers is written; every system
runs that very function. Only the model differs: velotune's (`vt.load` + `vt.add_lora`) or transformers' with
peft's LoRA (the same r, alpha and targets). The `-gc` systems turn on gradient checkpointing through the names
transformers users call (`gradient_checkpointing_enable()`, `enable_input_require_grads()`).
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from .baselines import LORA_RANK, load_hf_model, with_peft_lora
from .flops import step_work, training_flops
from .memory import MemoryMeter
from .processes import worker_main

SYSTEMS = ("velotune", "velotune-gc", "hf", "hf-gc")
FIRST_ID = 4  # random token ids start after the special tokens (pad, bos, eos, unk)


def training_loop(model, batches, lr, gradient_checkpointing, on_step):
    """The loop every system runs: labels = input ids, AdamW over the trainable parameters."""
    import torch
    if gradient_checkpointing:  # transformers 5's name first: gradient_checkpointing_enable warns there, goes in v6
        (getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable)()
        model.enable_input_require_grads()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    for ids in batches:
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        on_step(out.loss.item())


def build_model(spec):
    """(model with LoRA on every linear, seconds spent loading the checkpoint)."""
    start = time.perf_counter()
    if spec["system"].startswith("velotune"):
        import velotune as vt
        model, _ = vt.load(spec["model_dir"], dtype=spec["dtype"], device=spec["device"], load_tokenizer_files=False)
        load_s = time.perf_counter() - start
        vt.add_lora(model, r=LORA_RANK, alpha=LORA_RANK, targets="all-linear")
        return model, load_s
    model = load_hf_model(spec["model_dir"], spec["dtype"], spec["device"])
    load_s = time.perf_counter() - start
    return with_peft_lora(model), load_s


def make_batches(spec, vocab_size: int) -> list:
    """warmup + steps batches of random ids, the same for every system (seeded)."""
    import torch
    g = torch.Generator().manual_seed(spec["seed"])
    shape = (spec["batch"], spec["seq"])
    return [torch.randint(FIRST_ID, vocab_size, shape, generator=g).to(spec["device"])
            for _ in range(spec["warmup"] + spec["steps"])]


def run_system(spec) -> dict:
    import torch
    if spec["system"] not in SYSTEMS:
        raise ValueError(f"system {spec['system']!r}: expected one of {', '.join(SYSTEMS)}")
    config = json.loads((Path(spec["model_dir"]) / "config.json").read_text())
    model, load_s = build_model(spec)
    meter = MemoryMeter(spec["device"])
    meter.start()  # peak RSS still covers loading (ru_maxrss); the training phase is also seen apart
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    batches = make_batches(spec, config["vocab_size"])
    losses, times = [], []
    cuda = torch.device(spec["device"]).type == "cuda"

    def on_step(loss):
        if cuda:
            torch.cuda.synchronize()
        losses.append(loss)
        times.append(time.perf_counter())

    start = time.perf_counter()
    training_loop(model, batches, spec["lr"], spec["system"].endswith("-gc"), on_step)
    memory = meter.stop()
    warm = spec["warmup"]
    seconds = times[-1] - (times[warm - 1] if warm else start)
    work = [step_work({"input_ids": ids}) for ids in batches[warm:]]
    flops = sum(training_flops(config, "lora", tokens, context, LORA_RANK) for tokens, context in work)
    targets = spec["batch"] * (spec["seq"] - 1)  # position t predicts t+1: the last one has no target
    return dict(input_tokens_per_s=round(sum(t for t, _ in work) / seconds, 2),
                target_tokens_per_s=round(targets * spec["steps"] / seconds, 2), timed_seconds=round(seconds, 3),
                load_s=round(load_s, 2), step_target_tokens=[targets] * len(batches),
                losses=[round(v, 6) for v in losses], first_loss=losses[0], trainable_params=int(trainable),
                memory=memory, tflops=round(flops / seconds / 1e12, 5))


def main(argv=None):
    worker_main(run_system, argv)


if __name__ == "__main__":
    main()
