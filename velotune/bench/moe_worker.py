"""One system of the mixture-of-experts fine-tuning benchmark in one process: train a few LoRA steps, print one JSON
line.

    python -m velotune.bench.moe_worker '{"system": "velotune", "model_dir": ..., "seq": 512, "batch": 2, ...}'

velotune: `vt.load` + `vt.add_lora` (its own Mixtral / Qwen3-MoE code: per-expert linears, tokens grouped per
expert). hf: transformers' AutoModelForCausalLM as it loads by default (its default attention implementation and its
default experts implementation, both recorded in the result) wrapped by PEFT's get_peft_model.
Both: the same checkpoint, the same batches (rows of random token ids, labels = ids, seeded), LoRA r=16, alpha=32,
dropout 0 on q_proj, k_proj, v_proj and o_proj of every layer, and with method "experts" on every expert too
(velotune: each expert's three linears, each its own A and B; PEFT: target_parameters on transformers 5's fused
[experts, out, in] tensors, where gate and up share one A: a few fewer trainable parameters, both counted); each system's AdamW (make_optimizer; weight decay 0) at a constant lr, clipping at 1.0, the model's
config.json as written (no router load-balancing loss: output_router_logits false), seed 0; CUDA "bf16": autocast
over fp32 weights on both sides.

A third "system", checkpoint, writes the benchmark's model with transformers' save_pretrained in this separate
process, so that the driver never imports torch.

Timed: the optimizer steps after the warm-up ones. Memory: read at the end of the last step.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from .processes import worker_main
from .vision_worker import CpuClock

SYSTEMS = ("velotune", "hf")
# lora: LoRA on attention; experts: on attention and every expert (PEFT: target_parameters on transformers' fused
# expert tensors); qlora: LoRA on attention over an NF4 base.
METHODS = ("lora", "experts", "qlora")
# transformers' fused expert parameters, which PEFT adapts through target_parameters (the same name in both families)
HF_EXPERT_PARAMETERS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
LORA_RANK, LORA_ALPHA = 16, 32
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
FIRST_ID = 4  # random token ids start after the word-level tokenizer's specials (assets.SPECIALS)


def make_batches(spec: dict, vocab_size: int) -> list:
    """warmup + steps batches of [batch, seq] random ids, the same for both systems (seeded)."""
    import torch
    g = torch.Generator().manual_seed(spec["seed"])
    return [torch.randint(FIRST_ID, vocab_size, (spec["batch"], spec["seq"]), generator=g)
            for _ in range(spec["warmup"] + spec["steps"])]


def make_optimizer(system: str, trainable: list, lr: float):
    """Each system's own AdamW, weight decay 0: velotune's is what `vt.train` builds (torch's fused update without
    torch's compiler import, ~150 MB resident: training/lean_optim.py), transformers' Trainer builds torch's. The
    update is the same arithmetic; only the process's imports differ."""
    if system == "velotune":
        from ..training.optim import adamw_impl
        from ..training.lean_optim import AdamW
        return AdamW(trainable, lr=lr, weight_decay=0.0, **adamw_impl(trainable))
    import torch
    return torch.optim.AdamW(trainable, lr=lr, weight_decay=0.0)


def train(model, batches: list, spec: dict, clock: CpuClock) -> list[float]:
    """The loop both systems run: labels = ids, AdamW over the trainable parameters, clipping, constant lr."""
    import torch
    device = torch.device(spec["device"])
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(spec["system"], trainable, spec["lr"])
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=spec["precision"] == "bf16")
    model.train()
    losses = []
    clock.start()
    for ids in batches:
        ids = ids.to(device)
        with autocast:
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        clock.step()
    return losses


def build_velotune(spec: dict):
    import velotune as vt
    quantize = "nf4" if spec.get("method") == "qlora" else None
    model, _ = vt.load(spec["model_dir"], dtype=spec["dtype"], device=spec["device"], quantize=quantize,
                       load_tokenizer_files=False)
    # experts: velotune's default targets, every linear but the head and the routers: attention and each expert
    targets = "all-linear" if spec.get("method") == "experts" else LORA_TARGETS
    vt.add_lora(model, r=LORA_RANK, alpha=LORA_ALPHA, dropout=0.0, targets=targets, seed=0)
    return model, {}


def build_hf(spec: dict):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    torch.manual_seed(0)
    extra = {}
    if spec.get("method") == "qlora":  # QLoRA as its users write it: NF4, double quantization, bf16 compute
        from transformers import BitsAndBytesConfig
        extra["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=getattr(torch, spec["dtype"]))
    model = AutoModelForCausalLM.from_pretrained(spec["model_dir"], dtype=getattr(torch, spec["dtype"]), **extra)
    config = model.config
    used = dict(attn_implementation=getattr(config, "_attn_implementation", None),
                experts_implementation=getattr(config, "_experts_implementation", None))
    parameters = HF_EXPERT_PARAMETERS if spec.get("method") == "experts" else None
    model = get_peft_model(model.to(spec["device"]), LoraConfig(r=LORA_RANK, lora_alpha=LORA_ALPHA, lora_dropout=0.0,
                                                                bias="none", target_modules=LORA_TARGETS,
                                                                target_parameters=parameters))
    return model, used


def write_checkpoint(spec: dict) -> dict:
    """The case's model: transformers' config for `spec["shape"]`, random weights (normal, std 0.02; norms at 1),
    written by save_pretrained, and a word-level tokenizer (both from velotune.bench.assets)."""
    from . import assets
    out = Path(spec["out_dir"])
    assets._write_checkpoint(out, spec["shape"], "float32", "cpu")
    assets._write_tokenizer(out, spec["shape"]["vocab_size"])
    return dict(model_dir=str(out), parameters=_safetensors_elements(out / "model.safetensors"))


def _safetensors_elements(path: Path) -> int:
    """Parameters in a safetensors file, from its header."""
    with path.open("rb") as f:
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    total = 0
    for name, entry in header.items():
        if name != "__metadata__":
            count = 1
            for dim in entry["shape"]:
                count *= dim
            total += count
    return total


def run_system(spec: dict) -> dict:
    if spec["system"] == "checkpoint":
        return write_checkpoint(spec)
    builders = {"velotune": build_velotune, "hf": build_hf}
    if spec["system"] not in builders:
        raise ValueError(f"system {spec['system']!r}: expected one of {', '.join(builders)}")
    config = json.loads((Path(spec["model_dir"]) / "config.json").read_text(encoding="utf-8"))
    called = time.perf_counter()
    model, used = builders[spec["system"]](spec)
    setup_s = time.perf_counter() - called
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    batches = make_batches(spec, config["vocab_size"])
    clock = CpuClock(spec)
    losses = train(model, batches, spec, clock)
    targets = spec["batch"] * (spec["seq"] - 1)  # position t predicts t+1: the last one has no target
    seconds, timed_targets, fields = clock.timed(spec["warmup"], dict(losses=losses, tokens=[targets] * len(losses),
                                                                      trainable=trainable))
    rows, tokens = spec["batch"] * spec["steps"], spec["batch"] * spec["seq"] * spec["steps"]
    cpu_seconds = clock.cpu_times[-1] - clock.cpu_times[spec["warmup"]]
    return dict(samples_per_s=round(rows / seconds, 4), target_tokens_per_s=round(timed_targets / seconds, 2),
                input_tokens_per_s=round(tokens / seconds, 2), tokens_per_cpu_s=round(tokens / cpu_seconds, 2),
                timed_tokens=tokens, setup_s=round(setup_s, 2), **used, **fields)


def main(argv=None):
    worker_main(run_system, argv)


if __name__ == "__main__":
    main()
