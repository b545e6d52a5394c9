"""One system of the embeddings benchmark in one process: train a few contrastive steps, print one JSON line.

    python -m velotune.bench.embeddings_worker '{"system": "velotune", "model_dir": ..., "data": ..., ...}'

velotune: `vt.train` with objective contrastive (in-batch negatives; `mini_batch` > 0: embedding.mini_batch_size,
GradCache). st: sentence-transformers' SentenceTransformerTrainer with MultipleNegativesRankingLoss (`mini_batch` > 0:
CachedMultipleNegativesRankingLoss), as its users write it but for the batch order: batches follow the data's order,
as velotune's do with shuffling off, so both systems train on the same batches with the same padding.
Both: the same model directory, scale 20, AdamW at a constant lr, clipping at 1.0, the model's own dropout, fp32;
full fine-tuning, or LoRA r=16, alpha=16 on every linear of the encoder layers.

Timed: the optimizer steps after the warm-up ones (from the end of the last warm-up step, or from the start of
training when there is none). Memory: read at the end of the last step, so that writing the trained model (velotune
does, sentence-transformers' trainer does not) is not counted.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from .memory import MemoryMeter
from .processes import worker_main

SYSTEMS = ("velotune", "st")
SCALE = 20.0
LORA_RANK = 16
# Every linear of the transformer layers; BERT's pooler (unused by mean pooling) stays out on both sides.
ST_LORA_TARGETS = r".*encoder\.layer\.\d+\..*(query|key|value|dense)$"


class StepClock:
    """Step end times (after the start time) and the memory at the end of the last step."""

    def __init__(self, spec: dict):
        import torch
        self.torch, self.cuda = torch, torch.device(spec["device"]).type == "cuda"
        self.meter, self.total = MemoryMeter(spec["device"]), spec["warmup"] + spec["steps"]
        self.times, self.memory = [], None

    def start(self):
        self.meter.start()
        self.times = [time.perf_counter()]

    def step(self):
        if self.cuda:  # a step ends when the device is done with it
            self.torch.cuda.synchronize()
        self.times.append(time.perf_counter())
        if len(self.times) == self.total + 1:
            self.memory = self.meter.stop()

    def timed(self, warmup: int, ran: dict) -> tuple[float, int, dict]:
        """(seconds of the steps after the warm-up, their target tokens, the fields every worker reports) for a run
        that returned its per-step `losses` and `tokens` and its `trainable` count; refuses a run cut short."""
        if len(self.times) != self.total + 1 or self.memory is None:
            raise RuntimeError(f"{len(self.times) - 1} steps timed, expected {self.total}")
        losses, tokens = ran["losses"], ran["tokens"]
        seconds = self.times[-1] - self.times[warmup]
        fields = dict(timed_seconds=round(seconds, 3),
                      step_seconds=[round(b - a, 3) for a, b in zip(self.times, self.times[1:])],
                      losses=[round(v, 6) for v in losses], first_loss=losses[0] if losses else None,
                      step_target_tokens=tokens, trainable_params=ran["trainable"], memory=self.memory, tflops=None)
        return seconds, sum(tokens[warmup:]), fields


def run_velotune(spec: dict, clock: StepClock) -> dict:
    """Losses, real tokens per step, trainable parameters (velotune runs its token-wise work on real tokens only:
    no padded count)."""
    import velotune as vt
    losses, tokens = [], []

    def on_event(event):
        if event.kind == "start":
            clock.start()
        elif event.kind == "step":
            clock.step()
            losses.append(event.metrics["loss"])
            tokens.append(event.metrics["input_tokens"])
    cfg = {"objective": "contrastive",
           "model": {"path": spec["model_dir"], "dtype": spec["dtype"], "device": spec["device"]},
           "finetune": {"method": spec["method"]}, "lora": {"r": LORA_RANK, "alpha": LORA_RANK},
           "data": {"path": spec["data"], "max_seq_length": spec["seq"], "shuffle": False},
           "embedding": {"scale": SCALE, "mini_batch_size": spec["mini_batch"]},
           "train": {"output_dir": spec["out_dir"], "overwrite": True, "batch_size": spec["batch"],
                     "max_steps": spec["warmup"] + spec["steps"], "lr": spec["lr"], "scheduler": "constant",
                     "progress": False, "log_every": 1, "max_grad_norm": 1.0, "seed": 0,
                     "precision": spec["precision"]}}
    result = vt.train(cfg, callbacks=[on_event])
    return dict(losses=losses, tokens=tokens, padded=None, trainable=result.params["trainable_params"])


def _st_model(spec: dict):
    from sentence_transformers import SentenceTransformer
    model = SentenceTransformer(spec["model_dir"], device=spec["device"])
    model.max_seq_length = spec["seq"]
    if spec["method"] == "lora":
        # What `model.add_adapter(config)` does (transformers' PeftAdapterMixin: inject_adapter_in_model, which
        # freezes all but the adapters), without its check for PEFT >= 0.22 that PEFT 0.21 fails.
        from peft import LoraConfig, TaskType, inject_adapter_in_model
        inject_adapter_in_model(LoraConfig(r=LORA_RANK, lora_alpha=LORA_RANK, lora_dropout=0.0, bias="none",
                                           target_modules=ST_LORA_TARGETS, task_type=TaskType.FEATURE_EXTRACTION),
                                model[0].auto_model)
    return model


def _st_step_tokens(model, rows: list, batch: int, steps: int) -> tuple[list, list]:
    """(real, padded) tokens of each step's batch as sentence-transformers tokenizes it: each column alone, cut to
    max_seq_length, special tokens included (what velotune's input_tokens counts), padded to its longest text."""
    real, padded = [], []
    for step in range(steps):
        chunk = rows[step * batch:(step + 1) * batch]
        masks = [model.tokenize([r[c] for r in chunk])["attention_mask"] for c in ("anchor", "positive")]
        real.append(sum(int(m.sum()) for m in masks))
        padded.append(sum(m.numel() for m in masks))
    return real, padded


def run_st(spec: dict, clock: StepClock) -> dict:
    """Losses, real and padded tokens per step, trainable parameters."""
    from datasets import Dataset
    from sentence_transformers import SentenceTransformerTrainer, SentenceTransformerTrainingArguments
    from sentence_transformers.sentence_transformer import losses as st_losses
    from torch.utils.data import BatchSampler, SequentialSampler
    from transformers import TrainerCallback
    model = _st_model(spec)
    rows = [json.loads(line) for line in Path(spec["data"]).read_text(encoding="utf-8").splitlines() if line.strip()]
    tokens, padded = _st_step_tokens(model, rows, spec["batch"], clock.total)
    logged = []

    class InOrder(SentenceTransformerTrainer):  # the data's order: velotune's batches, shuffle off
        def get_batch_sampler(self, dataset, batch_size, drop_last, *args, **kwargs):
            return BatchSampler(SequentialSampler(dataset), batch_size, drop_last=False)

    class Timer(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            clock.start()

        def on_step_end(self, args, state, control, **kwargs):
            clock.step()

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                logged.append(logs["loss"])
    if spec["mini_batch"]:
        loss = st_losses.CachedMultipleNegativesRankingLoss(model, scale=SCALE, mini_batch_size=spec["mini_batch"])
    else:
        loss = st_losses.MultipleNegativesRankingLoss(model, scale=SCALE)
    args = SentenceTransformerTrainingArguments(
        output_dir=spec["out_dir"], per_device_train_batch_size=spec["batch"], learning_rate=spec["lr"],
        max_steps=clock.total, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0,
        logging_steps=1, report_to=[], use_cpu=not spec["device"].startswith("cuda"),
        bf16=spec["precision"] == "bf16", seed=0, save_strategy="no", dataloader_drop_last=False,
        dataloader_num_workers=0)
    data = Dataset.from_dict({"anchor": [r["anchor"] for r in rows], "positive": [r["positive"] for r in rows]})
    InOrder(model=model, args=args, train_dataset=data, loss=loss, callbacks=[Timer()]).train()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return dict(losses=logged, tokens=tokens, padded=padded, trainable=trainable)


def run_system(spec: dict) -> dict:
    runners = {"velotune": run_velotune, "st": run_st}
    if spec["system"] not in runners:
        raise ValueError(f"system {spec['system']!r}: expected one of {', '.join(runners)}")
    clock = StepClock(spec)
    ran = runners[spec["system"]](spec, clock)
    seconds, timed_tokens, fields = clock.timed(spec["warmup"], ran)
    pairs = spec["batch"] * spec["steps"]
    return dict(pairs_per_s=round(pairs / seconds, 3), input_tokens_per_s=round(timed_tokens / seconds, 2),
                target_tokens_per_s=round(timed_tokens / seconds, 2), step_padded_tokens=ran["padded"], **fields)


def main(argv=None):
    worker_main(run_system, argv)


if __name__ == "__main__":
    main()
