"""One training-benchmark case in one process: load, train a few steps, print one JSON line (processes.MARKER).

    python -m velotune.bench.worker '{"system": "velotune", "method": "lora", "model_dir": ..., ...}'

Systems: `velotune` (vt.load, then vt.train end to end with the model passed in and its default settings),
`hf` / `hf-gc` (transformers + peft + bitsandbytes, SDPA attention, without / with gradient checkpointing, in a
plain PyTorch loop), `liger` / `liger-gc` (the same with Liger-Kernel's patches; CUDA only). Both loops get the
same batches: the baseline's come from velotune.data with the config vt.train is given. The first `warmup` steps
are not timed. Memory: the process's peak RSS (ru_maxrss) and, on CUDA, torch's peak allocated / reserved.
"""
from __future__ import annotations

import json
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

from .baselines import LORA_RANK, apply_liger, load_hf_model, prepare_hf_model
from .flops import step_work, training_flops
from .memory import MemoryMeter
from .processes import emit, short_error

SYSTEMS = ("velotune", "velotune-gc", "hf", "hf-gc", "liger", "liger-gc")
METHODS = ("lora", "qlora", "full")


def main(argv=None):
    spec = json.loads((argv or sys.argv[1:])[0])
    import torch
    torch.set_num_threads(spec.get("threads", 1))
    started = time.perf_counter()
    try:
        device_name = setup_device(spec)
        result = run_case(spec)
        result.update(ok=True, device_name=device_name)
    except Exception as exc:  # reported, not raised: one failing case must not stop the others
        result = {"ok": False, "error": short_error(exc), "traceback": traceback.format_exc(limit=6)}
    result.update(system=spec["system"], method=spec["method"], seq=spec["seq"], batch=spec["batch"],
                  wall_s=round(time.perf_counter() - started, 2))
    emit(result)


def setup_device(spec) -> str:
    """On CUDA: the memory budget (allocations past it fail as out of memory); the device's name."""
    import torch
    if torch.device(spec["device"]).type != "cuda":
        return "cpu"
    budget = spec.get("memory_budget_mb")
    if budget:
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, budget * 2**20 / total))
    return torch.cuda.get_device_name()


def run_case(spec) -> dict:
    if spec["system"] not in SYSTEMS or spec["method"] not in METHODS:
        raise ValueError(f"system {spec['system']!r} / method {spec['method']!r}: expected one of {SYSTEMS} / "
                         f"{METHODS}")
    out_dir = Path(tempfile.mkdtemp(prefix="vt-bench-run-"))
    try:
        if spec["system"].startswith("velotune"):
            return run_velotune(spec, out_dir)
        return run_baseline(spec, out_dir)
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)


def train_config(spec, out_dir: Path) -> dict:
    """What vt.train is given; the baseline reads its data section to build the very same batches."""
    return {"model": {"path": spec["model_dir"], "dtype": spec["dtype"], "device": spec["device"],
                      "quantize": "nf4" if spec["method"] == "qlora" else None},
            "finetune": {"method": "full" if spec["method"] == "full" else "lora"},
            "data": {"path": spec["data_path"], "max_seq_length": spec["seq"]},
            "train": {"output_dir": str(out_dir), "batch_size": spec["batch"], "lr": spec["lr"],
                      "max_steps": spec["warmup"] + spec["steps"], "progress": False, "seed": spec["seed"],
                      "gradient_checkpointing": spec["system"].endswith("-gc")}}


# ---- velotune ---------------------------------------------------------------------------------------------------

def run_velotune(spec, out_dir: Path) -> dict:
    import velotune as vt
    cfg = train_config(spec, out_dir / "run")
    start = time.perf_counter()
    model, tokenizer = vt.load(spec["model_dir"], dtype=spec["dtype"], quantize=cfg["model"]["quantize"],
                               device=spec["device"])
    load_s = time.perf_counter() - start
    meter = MemoryMeter(spec["device"])
    meter.start()
    result = vt.train(cfg, model=model, tokenizer=tokenizer)
    memory = meter.stop()
    rows = [json.loads(line) for line in (out_dir / "run" / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "loss" in r]
    steps = [dict(target_tokens=r["tokens"], loss=r["loss"], elapsed=r["elapsed_s"]) for r in rows]
    batches = planned_batches(cfg, tokenizer, len(steps))  # the same batches again, only to count their work
    return summarise(spec, steps, batches, memory, load_s, result.params["trainable_params"])


# ---- the baseline: transformers + peft (+ bitsandbytes) in a plain loop -------------------------------------------

def run_baseline(spec, out_dir: Path) -> dict:
    import torch
    from velotune.models.tokenizer import load_tokenizer
    if spec["system"].startswith("liger"):
        apply_liger()
    start = time.perf_counter()
    model = load_hf_model(spec["model_dir"], spec["dtype"], spec["device"], quantize_4bit=spec["method"] == "qlora")
    tokenizer = load_tokenizer(Path(spec["model_dir"]))  # loaded before training starts, as vt.load does
    load_s = time.perf_counter() - start
    meter = MemoryMeter(spec["device"])
    meter.start()
    model = prepare_hf_model(model, spec["method"], spec["system"].endswith("-gc"))
    trainable = [p for p in model.parameters() if p.requires_grad]
    total_steps = spec["warmup"] + spec["steps"]
    batches = planned_batches(train_config(spec, out_dir), tokenizer, total_steps)
    optimizer = torch.optim.AdamW(trainable, lr=spec["lr"], betas=(0.9, 0.999), weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: max(0.0, 1.0 - s / total_steps))
    model.train()
    steps, clock = [], time.perf_counter()
    for batch in batches:
        batch = {k: v.to(spec["device"]) for k, v in batch.items()}
        # use_cache=False: with a cache transformers ignores the packing in position_ids and attends across
        # samples. It shifts the labels itself and averages over the real targets.
        loss = model(**batch, use_cache=False).loss
        loss.backward()
        value = loss.item()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        steps.append(dict(target_tokens=int((batch["labels"][:, 1:] != -100).sum()), loss=value,
                          elapsed=time.perf_counter() - clock))
    model.save_pretrained(str(out_dir / "saved"))  # as vt.train writes its adapter / model at the end
    memory = meter.stop()
    return summarise(spec, steps, batches, memory, load_s, sum(p.numel() for p in trainable))


# ---- shared pieces ----------------------------------------------------------------------------------------------

def planned_batches(cfg: dict, tokenizer, count: int) -> list:
    """The first `count` batches vt.train draws for this config (epoch after epoch, as its loop does)."""
    from velotune.config import load_config
    from velotune.data import batch_iterator, build_datasets
    c = load_config(cfg)
    max_len = c.data.max_seq_length
    examples, _, _ = build_datasets(c.data, tokenizer, max_seq_length=max_len, seed=c.train.seed)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    batches, epoch = [], 0
    while len(batches) < count:
        for batch in batch_iterator(examples, batch_size=c.train.batch_size, max_seq_length=max_len,
                                    packing=c.data.packing, pad_id=pad, seed=c.train.seed, epoch=epoch):
            batches.append(batch)
            if len(batches) == count:
                break
        epoch += 1
    return batches


def summarise(spec, steps, batches, memory, load_s, trainable) -> dict:
    """Rates over the timed steps, and the model FLOPs they did (flops.training_flops) per second."""
    warm = spec["warmup"]
    timed = steps[warm:]
    seconds = timed[-1]["elapsed"] - (steps[warm - 1]["elapsed"] if warm else 0.0)
    work = [step_work(b) for b in batches]
    config = json.loads((Path(spec["model_dir"]) / "config.json").read_text())
    flops = sum(training_flops(config, spec["method"], t, c, LORA_RANK) for t, c in work[warm:])
    targets = sum(s["target_tokens"] for s in timed)
    counted = [int((b["labels"][:, 1:] != -100).sum()) for b in batches]
    return dict(target_tokens_per_s=round(targets / seconds, 2),
                input_tokens_per_s=round(sum(t for t, _ in work[warm:]) / seconds, 2),
                timed_seconds=round(seconds, 3), load_s=round(load_s, 2),
                step_target_tokens=[s["target_tokens"] for s in steps],
                same_batches_as_planned=counted == [s["target_tokens"] for s in steps],
                losses=[round(s["loss"], 6) for s in steps], first_loss=steps[0]["loss"],
                trainable_params=int(trainable), memory=memory, tflops=round(flops / seconds / 1e12, 5))


if __name__ == "__main__":
    main()
