"""One system of the vision-language fine-tuning benchmark in one process: train a few LoRA steps, print one JSON line.

    python -m velotune.bench.vision_worker '{"system": "velotune", "model_dir": ..., "data": ..., ...}'

velotune: `vt.train` with objective sft on the LLaVA directory (which makes it the vision objective), LoRA on the
language model's attention and MLP linears (vision: vision_layers false, projector frozen); its images are processed
once while the data is prepared, before the first step. hf: transformers' LlavaForConditionalGeneration wrapped by
PEFT, trained by a plain loop (AdamW, clipping, constant lr) over batches that the checkpoint's own LlavaProcessor
builds per batch in a collator, as a LLaVA fine-tuning script writes it: the chat template renders each conversation
with one `<image>` placeholder, the processor expands it and makes the pixel values, and the labels keep only the
assistant's answer (the tokens after "<|im_start|>assistant\\n", up to and including its <|im_end|>), as velotune's
do. The images are decoded (PIL) before training, so the collator's time is the processor's own.
Both: the same directory, batches in the data's order, LoRA r=16, alpha=32, dropout 0, AdamW (weight decay 0) at a
constant lr, clipping at 1.0, seed 0.

A third "system", checkpoint, writes the benchmark's model (velotune.bench.tiny_vlm) in this separate process, so
that the driver never imports torch.

Timed: the optimizer steps after the warm-up ones. Memory: read at the end of the last step (velotune then writes
its adapter; that is not counted).
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from .embeddings_worker import StepClock
from .processes import worker_main

SYSTEMS = ("velotune", "hf")
LORA_RANK, LORA_ALPHA = 16, 32
# The language model's attention and MLP linears, by their names in transformers' LLaVA (model.language_model...).
HF_LORA_TARGETS = r".*language_model\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)"


class CpuClock(StepClock):
    """StepClock that also reads the process's CPU time at each step: on a machine other work shares, the CPU
    seconds of the timed steps are steadier than their wall time (with one torch thread they are equal on an idle
    machine)."""

    def start(self):
        super().start()
        self.cpu_times = [time.process_time()]

    def step(self):
        super().step()
        self.cpu_times.append(time.process_time())


def read_rows(path: str) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


def run_velotune(spec: dict, clock: CpuClock) -> dict:
    """Losses, label tokens per step, trainable parameters, seconds from the call to the first step."""
    import velotune as vt
    losses, tokens, called = [], [], time.perf_counter()
    setup = []

    def on_event(event):
        if event.kind == "start":
            setup.append(time.perf_counter() - called)
            clock.start()
        elif event.kind == "step":
            clock.step()
            losses.append(event.metrics["loss"])
            tokens.append(event.metrics["tokens"])
    cfg = {"objective": "sft",
           "model": {"path": spec["model_dir"], "dtype": spec["dtype"], "device": spec["device"]},
           "finetune": {"method": "lora"},
           "lora": {"r": LORA_RANK, "alpha": LORA_ALPHA, "dropout": 0.0},
           "vision": {"vision_layers": False, "language_layers": True, "attention_modules": True,
                      "mlp_modules": True, "projector": "frozen"},
           "data": {"path": spec["data"], "shuffle": False, "eval_fraction": 0.0, "packing": False},
           "train": {"output_dir": spec["out_dir"], "overwrite": True, "batch_size": spec["batch"],
                     "max_steps": clock.total, "lr": spec["lr"], "scheduler": "constant", "warmup_steps": 0,
                     "weight_decay": 0.0, "max_grad_norm": 1.0, "progress": False, "log_every": 1, "seed": 0,
                     "precision": spec["precision"]}}
    result = vt.train(cfg, callbacks=[on_event])
    return dict(losses=losses, tokens=tokens, trainable=result.params["trainable_params"], collate_s=None,
                setup_s=setup[0] if setup else None)


class LlavaCollator:
    """A LLaVA fine-tuning script's collator: chat-template text with one `<image>` per image, the processor's
    input ids, attention mask and pixel values for the batch (padded to its longest row), labels on the assistant's
    answer only. Counts each batch's label tokens and the seconds it spends."""

    def __init__(self, processor):
        tokenizer = processor.tokenizer
        self.processor, self.tokenizer = processor, tokenizer
        self.header = tokenizer("<|im_start|>assistant\n", add_special_tokens=False).input_ids
        self.end_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
        self.label_tokens, self.seconds = [], []

    def text(self, messages: list[dict]) -> str:
        """The conversation as the chat template renders it, each image part as the processor's placeholder."""
        flat = []
        for m in messages:
            content = m["content"]
            if not isinstance(content, str):
                content = "".join(self.processor.image_token if p["type"] == "image" else p["text"] for p in content)
            flat.append({"role": m["role"], "content": content})
        return self.tokenizer.apply_chat_template(flat, tokenize=False)

    def answer_mask(self, ids: list[int]) -> list[bool]:
        """True on the last assistant answer: after its header, up to and including its <|im_end|>."""
        n, k = len(ids), len(self.header)
        start = max(i + k for i in range(n - k + 1) if ids[i:i + k] == self.header)
        end = next(i for i in range(start, n) if ids[i] == self.end_id)
        return [start <= i <= end for i in range(n)]

    def __call__(self, rows: list[dict]) -> dict:
        import torch
        started = time.perf_counter()
        batch = self.processor(text=[self.text(r["messages"]) for r in rows], images=[r["image"] for r in rows],
                               padding=True, return_tensors="pt")
        ids, mask = batch["input_ids"], batch["attention_mask"]
        keep = torch.tensor([self.answer_mask(row.tolist()) for row in ids]) & mask.bool()
        batch["labels"] = ids.masked_fill(~keep, -100)
        self.label_tokens.append(int(keep.sum()))
        self.seconds.append(time.perf_counter() - started)
        return dict(batch)


def _hf_rows(spec: dict) -> list[dict]:
    """The data rows with their image decoded (one image per conversation, in the benchmark's data)."""
    from PIL import Image
    folder = Path(spec["data"]).parent
    rows = []
    for row in read_rows(spec["data"]):
        parts = [p for m in row["messages"] if not isinstance(m["content"], str) for p in m["content"]]
        with Image.open(folder / next(p["image"] for p in parts if p["type"] == "image")) as image:
            rows.append({"messages": row["messages"], "image": image.convert("RGB")})
    return rows


def run_hf(spec: dict, clock: CpuClock) -> dict:
    """Losses, label tokens per step, trainable parameters, collator seconds per batch, setup seconds."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlavaForConditionalGeneration, LlavaProcessor
    called = time.perf_counter()
    torch.manual_seed(0)
    device = torch.device(spec["device"])
    processor = LlavaProcessor.from_pretrained(spec["model_dir"])
    model = LlavaForConditionalGeneration.from_pretrained(spec["model_dir"], dtype=getattr(torch, spec["dtype"]))
    model = get_peft_model(model.to(device), LoraConfig(r=LORA_RANK, lora_alpha=LORA_ALPHA, lora_dropout=0.0,
                                                        bias="none", target_modules=HF_LORA_TARGETS))
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=spec["lr"], weight_decay=0.0)
    rows, collator = _hf_rows(spec), LlavaCollator(processor)
    batch_size, losses = spec["batch"], []
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=spec["precision"] == "bf16")
    model.train()
    setup_s = time.perf_counter() - called
    clock.start()
    for step in range(clock.total):
        batch = collator(rows[step * batch_size:(step + 1) * batch_size])
        batch = {k: v.to(device) for k, v in batch.items()}
        with autocast:
            loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        clock.step()
    return dict(losses=losses, tokens=collator.label_tokens, trainable=sum(p.numel() for p in trainable),
                collate_s=collator.seconds, setup_s=setup_s)


def write_checkpoint(spec: dict) -> dict:
    """The benchmark's LLaVA directory (tiny_vlm's `size`, image and patch size), its tokenizer trained on the
    texts in spec["texts"] (a file, one JSON string a line)."""
    from .tiny_vlm import make_tiny_llava
    texts = [json.loads(line) for line in Path(spec["texts"]).read_text(encoding="utf-8").splitlines()]
    out = make_tiny_llava(spec["out_dir"], texts, image_size=spec["image_size"], patch_size=spec["patch_size"],
                          size=spec["size"], seed=0)
    config = json.loads((out / "config.json").read_text())
    return dict(model_dir=str(out), vocab=config["text_config"]["vocab_size"])


def run_system(spec: dict) -> dict:
    if spec["system"] == "checkpoint":
        return write_checkpoint(spec)
    runners = {"velotune": run_velotune, "hf": run_hf}
    if spec["system"] not in runners:
        raise ValueError(f"system {spec['system']!r}: expected one of {', '.join(runners)}")
    clock = CpuClock(spec)
    ran = runners[spec["system"]](spec, clock)
    seconds, timed_tokens, fields = clock.timed(spec["warmup"], ran)
    samples = spec["batch"] * spec["steps"]
    rate = round(timed_tokens / seconds, 2)
    # hf builds its batches inside the timed steps (velotune before the first): its rate without the collator too.
    collate = ran["collate_s"][spec["warmup"]:] if ran["collate_s"] is not None else None
    model_seconds = seconds - sum(collate or ())
    return dict(samples_per_s=round(samples / seconds, 4), target_tokens_per_s=rate, input_tokens_per_s=rate,
                timed_samples=samples, timed_tokens=timed_tokens, setup_s=round(ran["setup_s"] or 0.0, 2),
                model_samples_per_s=round(samples / model_seconds, 4),
                samples_per_cpu_s=round(samples / (clock.cpu_times[-1] - clock.cpu_times[spec["warmup"]]), 4),
                collate_s_per_batch=round(sum(collate) / len(collate), 4) if collate else None, **fields)


def main(argv=None):
    worker_main(run_system, argv)


if __name__ == "__main__":
    main()
