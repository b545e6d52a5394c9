"""One benchmark case in one process: load, train a few steps, print one JSON line (prefixed `BENCH_RESULT `).

    python benchmarks/bench_worker.py '{"system": "velotune", "method": "lora", "model_dir": ..., ...}'

Systems: `velotune` (vt.load, then vt.train end to end with the model passed in and its default settings),
`hf` / `hf-gc` (transformers + peft + bitsandbytes, SDPA attention, without / with gradient checkpointing, in a
plain PyTorch loop), `liger` / `liger-gc` (the same with Liger-Kernel's patches; CUDA only). Both loops get the
same batches: the baseline's come from velotune.data with the config vt.train is given. The first `warmup` steps
are not timed. Memory: the process's peak RSS (ru_maxrss) and, on CUDA, torch's peak allocated / reserved.
"""
from __future__ import annotations

import json
import resource
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

MARKER = "BENCH_RESULT "
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
        result = {"ok": False, "error": _short_error(exc), "traceback": traceback.format_exc(limit=6)}
    result.update(system=spec["system"], method=spec["method"], seq=spec["seq"], batch=spec["batch"],
                  wall_s=round(time.perf_counter() - started, 2))
    print(MARKER + json.dumps(result), flush=True)


# Dense bf16 peak (TFLOP/s, no sparsity) by device name, for MFU; the first matching key wins.
GPU_PEAK_TFLOPS = (("H100 PCIe", 756.0), ("H100", 989.0), ("H200", 989.0), ("H20", 148.0), ("GH200", 989.0),
                   ("B200", 2250.0), ("A100", 312.0), ("A10G", 70.0), ("L40S", 362.0), ("L4", 121.0),
                   ("RTX 4090", 165.0), ("RTX 3090", 71.0))


def setup_device(spec) -> str:
    """On CUDA: the memory budget (allocations past it fail as out of memory), the peak for MFU; the device name."""
    import torch
    if torch.device(spec["device"]).type != "cuda":
        return "cpu"
    name = torch.cuda.get_device_name()
    budget = spec.get("memory_budget_mb")
    if budget:
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, budget * 2**20 / total))
    if not spec.get("peak_tflops"):
        spec["peak_tflops"] = next((peak for key, peak in GPU_PEAK_TFLOPS if key in name), None)
    return name


def _short_error(exc) -> str:
    text = f"{type(exc).__name__}: {exc}"
    return "OOM: " + text[:200] if "out of memory" in text.lower() else text[:400]


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
    gc = spec["system"].endswith("-gc")
    if spec["system"].startswith("liger"):
        _apply_liger()
    start = time.perf_counter()
    model = load_hf_model(spec)
    tokenizer = load_tokenizer(Path(spec["model_dir"]))  # loaded before training starts, as vt.load does
    load_s = time.perf_counter() - start
    meter = MemoryMeter(spec["device"])
    meter.start()
    model = prepare_hf_model(model, spec["method"], gc)
    trainable = [p for p in model.parameters() if p.requires_grad]
    cfg = train_config(spec, out_dir)
    total_steps = spec["warmup"] + spec["steps"]
    batches = planned_batches(cfg, tokenizer, total_steps)
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


def load_hf_model(spec):
    import torch
    from transformers import AutoModelForCausalLM
    dtype = getattr(torch, spec["dtype"])
    kwargs = dict(dtype=dtype, attn_implementation="sdpa")
    if spec["method"] == "qlora":  # as velotune's nf4: NF4, blocks of 64, double-quantized absmax
        from transformers import BitsAndBytesConfig
        kwargs.update(device_map={"": spec["device"]}, quantization_config=BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype))
        return AutoModelForCausalLM.from_pretrained(spec["model_dir"], **kwargs)
    return AutoModelForCausalLM.from_pretrained(spec["model_dir"], **kwargs).to(spec["device"])


def prepare_hf_model(model, method: str, gc: bool):
    """What a transformers + peft user writes: (k-bit preparation,) checkpointing, LoRA on every linear."""
    ckpt_kwargs = {"use_reentrant": False}
    if method == "qlora":
        from peft import prepare_model_for_kbit_training
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gc,
                                                gradient_checkpointing_kwargs=ckpt_kwargs)
    elif gc and hasattr(model, "activation_checkpointing_enable"):  # the transformers 5 name
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=ckpt_kwargs)
    elif gc:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=ckpt_kwargs)
    if method == "full":
        model.requires_grad_(True)
        return model
    from peft import LoraConfig, get_peft_model
    return get_peft_model(model, LoraConfig(r=16, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear",
                                            bias="none", task_type="CAUSAL_LM"))


def _apply_liger():
    import torch
    if not torch.cuda.is_available():
        raise RuntimeError("Liger-Kernel needs a CUDA GPU: skipped on the CPU")
    try:
        from liger_kernel.transformers import apply_liger_kernel_to_llama
    except ImportError:
        raise RuntimeError("liger-kernel is not installed (pip install liger-kernel): skipped") from None
    apply_liger_kernel_to_llama()


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


class MemoryMeter:
    """Peak memory of the training phase. CPU: RSS (the peak is reset through /proc/self/clear_refs after
    loading, where Linux allows it, so the training peak is seen apart from the loading peak). CUDA: torch's
    allocator peaks."""

    def __init__(self, device: str):
        import torch
        self.torch, self.cuda = torch, torch.device(device).type == "cuda"

    def start(self):
        self.rss_before = _status_kb("VmRSS")
        self.process_peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        try:
            Path("/proc/self/clear_refs").write_text("5")
            self.reset = True
        except OSError:
            self.reset = False
        if self.cuda:
            self.torch.cuda.synchronize()
            self.allocated_before = self.torch.cuda.memory_allocated()
            self.torch.cuda.reset_peak_memory_stats()

    def stop(self) -> dict:
        peak_now = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        mb = 1 / 1024
        out = {"peak_rss_mb": round(max(peak_now, self.process_peak_before) * mb, 1),
               "rss_before_train_mb": round(self.rss_before * mb, 1),
               "train_peak_rss_mb": round(_status_kb("VmHWM") * mb, 1) if self.reset else None}
        if self.cuda:
            self.torch.cuda.synchronize()
            out.update(cuda_before_train_mb=round(self.allocated_before / 2**20, 1),
                       cuda_max_allocated_mb=round(self.torch.cuda.max_memory_allocated() / 2**20, 1),
                       cuda_max_reserved_mb=round(self.torch.cuda.max_memory_reserved() / 2**20, 1))
        return out


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def step_work(batch: dict, pad_id: int = 0) -> tuple[int, int]:
    """(non-padding input tokens, sum over them of causal context length) for one batch."""
    real = batch["input_ids"] != pad_id
    if "position_ids" in batch:
        context = batch["position_ids"] + 1
    else:
        context = batch["attention_mask"].cumsum(-1)
    return int(real.sum()), int((context * real).sum())


def flops_per_step(config, method: str, trainable: int, tokens: int, context_sum: int) -> float:
    """Training FLOPs: 6·N per token (full) or 4·N + 6·N_lora (LoRA: no weight gradient for the frozen base),
    N = weights used in matmuls (every linear and the output head; not the embedding lookup), plus causal
    attention 12·L·d·(context) per token (QK^T and AV, forward and backward); recomputation is not counted."""
    h, layers = config.hidden_size, config.num_hidden_layers
    head_dim = getattr(config, "head_dim", None) or h // config.num_attention_heads
    q, kv = config.num_attention_heads * head_dim, config.num_key_value_heads * head_dim
    per_layer = h * (q + 2 * kv) + q * h + 3 * h * config.intermediate_size
    n = layers * per_layer + config.vocab_size * h
    dense = 6 * n * tokens if method == "full" else (4 * n + 6 * trainable) * tokens
    return float(dense + 12 * layers * q * context_sum)


def summarise(spec, steps, batches, memory, load_s, trainable) -> dict:
    warm = spec["warmup"]
    timed = steps[warm:]
    seconds = timed[-1]["elapsed"] - (steps[warm - 1]["elapsed"] if warm else 0.0)
    work = [step_work(b) for b in batches]
    config = _hf_config(spec["model_dir"])
    flops = sum(flops_per_step(config, spec["method"], trainable, t, c) for t, c in work[warm:])
    targets = sum(s["target_tokens"] for s in timed)
    counted = [int((b["labels"][:, 1:] != -100).sum()) for b in batches]
    out = dict(target_tokens_per_s=round(targets / seconds, 2),
               input_tokens_per_s=round(sum(t for t, _ in work[warm:]) / seconds, 2),
               timed_seconds=round(seconds, 3), load_s=round(load_s, 2),
               step_target_tokens=[s["target_tokens"] for s in steps], same_batches_as_planned=counted == [
                   s["target_tokens"] for s in steps],
               losses=[round(s["loss"], 6) for s in steps], first_loss=steps[0]["loss"],
               trainable_params=int(trainable), memory=memory, tflops=round(flops / seconds / 1e12, 4))
    peak = spec.get("peak_tflops")
    if peak:
        out["mfu"] = round(flops / seconds / (peak * 1e12), 4)
    return out


def _hf_config(model_dir):
    from transformers import AutoConfig
    return AutoConfig.from_pretrained(model_dir)


if __name__ == "__main__":
    main()
