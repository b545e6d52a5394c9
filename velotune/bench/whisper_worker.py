"""One system of the Whisper fine-tuning benchmark in one process: train a few LoRA steps, print one JSON line.

    python -m velotune.bench.whisper_worker '{"system": "velotune", "model_dir": ..., "manifest": ..., ...}'

velotune: `vt.train` with objective asr (features computed from the raw clips inside each step, no eval split, so
no WER pass before or after training). hf: transformers' Seq2SeqTrainer over a PEFT-wrapped
WhisperForConditionalGeneration, as its users write it: WhisperProcessor's feature extractor and tokenizer in a data
collator (features computed per batch, labels = the tokenizer's ids with the <|startoftranscript|> column cut and
-100 padding; the model builds its decoder inputs from them), no evaluation, no saving, and the sampler set to
"sequential" so that both systems train on the same clips in the same batches.
Both: the same model directory, LoRA r=32, alpha=64, dropout 0 on every q_proj and v_proj (encoder, decoder, cross
attention), AdamW at a constant lr, clipping at 1.0, no weight decay, seed 0, the model's own dropout (0 in tiny.en).

Timed: the optimizer steps after the warm-up ones (from the end of the last warm-up step). Memory: read at the end of
the last step, so that velotune writing its adapter afterwards is not counted.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from .embeddings_worker import StepClock
from .processes import worker_main

SYSTEMS = ("velotune", "hf")
LORA_RANK, LORA_ALPHA = 32, 64
LORA_TARGETS = ["q_proj", "v_proj"]


def read_manifest(path: str) -> list[dict]:
    """The manifest's rows ({"audio": file name beside the manifest, "text": transcript}), in order."""
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


def run_velotune(spec: dict, clock: StepClock) -> dict:
    """Losses, label tokens per step, trainable parameters."""
    import velotune as vt
    losses, tokens = [], []

    def on_event(event):
        if event.kind == "start":
            clock.start()
        elif event.kind == "step":
            clock.step()
            losses.append(event.metrics["loss"])
            tokens.append(event.metrics["tokens"])
    cfg = {"objective": "asr",
           "model": {"path": spec["model_dir"], "dtype": spec["dtype"], "device": spec["device"]},
           "finetune": {"method": "lora"},
           "lora": {"r": LORA_RANK, "alpha": LORA_ALPHA, "dropout": 0.0, "targets": LORA_TARGETS},
           # An English-only model takes no language token; without an eval split nothing is transcribed.
           "speech": {"language": None},
           "data": {"path": spec["manifest"], "shuffle": False, "eval_fraction": 0.0},
           "train": {"output_dir": spec["out_dir"], "overwrite": True, "batch_size": spec["batch"],
                     "max_steps": clock.total, "lr": spec["lr"], "scheduler": "constant", "warmup_steps": 0,
                     "weight_decay": 0.0, "max_grad_norm": 1.0, "progress": False, "log_every": 1, "seed": 0,
                     "precision": spec["precision"]}}
    result = vt.train(cfg, callbacks=[on_event])
    return dict(losses=losses, tokens=tokens, trainable=result.params["trainable_params"], collate_s=None,
                samples=None)


class TimedCollator:
    """What a Whisper fine-tuning script's collator does, per batch: the clips' log-mel features from the feature
    extractor (padded to 30 s), the transcripts' ids from the tokenizer padded with -100, and the leading
    <|startoftranscript|> column cut (the model puts it back when it shifts the labels into decoder inputs).
    It also counts each batch's label tokens and the seconds it spends, for the report."""

    def __init__(self, processor, start_id: int):
        self.processor, self.start_id = processor, start_id
        self.label_tokens, self.clips, self.seconds = [], [], 0.0

    def __call__(self, rows: list[dict]) -> dict:
        started = time.perf_counter()
        extractor, tokenizer = self.processor.feature_extractor, self.processor.tokenizer
        batch = extractor([r["audio"] for r in rows], sampling_rate=extractor.sampling_rate, return_tensors="pt")
        padded = tokenizer.pad({"input_ids": [r["labels"] for r in rows]}, return_tensors="pt")
        labels = padded["input_ids"].masked_fill(padded["attention_mask"].ne(1), -100)
        if bool((labels[:, 0] == self.start_id).all()):
            labels = labels[:, 1:]
        self.label_tokens.append(int((labels != -100).sum()))
        self.clips.append(len(rows))
        self.seconds += time.perf_counter() - started
        return {"input_features": batch["input_features"], "labels": labels}


def _hf_rows(spec: dict, tokenizer) -> list[dict]:
    """The clips' samples (16 kHz mono, read with soundfile) and the tokenizer's ids of their transcripts."""
    import numpy as np
    import soundfile
    folder = Path(spec["manifest"]).parent
    rows = []
    for row in read_manifest(spec["manifest"]):
        samples, rate = soundfile.read(str(folder / row["audio"]), dtype="float32")
        if rate != 16000 or samples.ndim != 1:
            raise ValueError(f"{row['audio']}: expected 16 kHz mono, got {rate} Hz, shape {samples.shape}")
        rows.append({"audio": np.ascontiguousarray(samples), "labels": tokenizer(row["text"].strip()).input_ids})
    return rows


def run_hf(spec: dict, clock: StepClock) -> dict:
    """Losses, label tokens and clips per step, trainable parameters, seconds spent in the collator per batch."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import (Seq2SeqTrainer, Seq2SeqTrainingArguments, TrainerCallback,
                              WhisperForConditionalGeneration, WhisperProcessor)
    processor = WhisperProcessor.from_pretrained(spec["model_dir"])
    model = WhisperForConditionalGeneration.from_pretrained(spec["model_dir"], dtype=getattr(torch, spec["dtype"]))
    model = get_peft_model(model, LoraConfig(r=LORA_RANK, lora_alpha=LORA_ALPHA, lora_dropout=0.0, bias="none",
                                             target_modules=LORA_TARGETS))
    rows = _hf_rows(spec, processor.tokenizer)
    collator = TimedCollator(processor, model.config.decoder_start_token_id)
    logged = []

    class Timer(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            clock.start()

        def on_step_end(self, args, state, control, **kwargs):
            clock.step()

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                logged.append(logs["loss"])
    args = Seq2SeqTrainingArguments(
        output_dir=spec["out_dir"], per_device_train_batch_size=spec["batch"], learning_rate=spec["lr"],
        max_steps=clock.total, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0,
        logging_steps=1, report_to=[], use_cpu=not spec["device"].startswith("cuda"),
        bf16=spec["precision"] == "bf16", seed=0, save_strategy="no", eval_strategy="no",
        train_sampling_strategy="sequential", remove_unused_columns=False, label_names=["labels"],
        dataloader_num_workers=0, dataloader_drop_last=False, predict_with_generate=False)
    Seq2SeqTrainer(model=model, args=args, train_dataset=rows, data_collator=collator,
                   callbacks=[Timer()]).train()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    # The data loader may build one batch ahead of the last step: only the steps' own batches count.
    tokens = collator.label_tokens[:clock.total]
    return dict(losses=logged, tokens=tokens, trainable=trainable, samples=collator.clips[:clock.total],
                collate_s=collator.seconds / max(1, len(collator.label_tokens)))


def run_system(spec: dict) -> dict:
    runners = {"velotune": run_velotune, "hf": run_hf}
    if spec["system"] not in runners:
        raise ValueError(f"system {spec['system']!r}: expected one of {', '.join(runners)}")
    clock = StepClock(spec)
    ran = runners[spec["system"]](spec, clock)
    seconds, timed_tokens, fields = clock.timed(spec["warmup"], ran)
    # hf's collator counts the clips of each batch; velotune's batches are whole by the plan (clips % batch == 0).
    clips = sum(ran["samples"][spec["warmup"]:]) if ran["samples"] else spec["batch"] * spec["steps"]
    rate = round(timed_tokens / seconds, 2)
    return dict(samples_per_s=round(clips / seconds, 4), target_tokens_per_s=rate, input_tokens_per_s=rate,
                timed_samples=clips, timed_tokens=timed_tokens,
                collate_s_per_batch=None if ran["collate_s"] is None else round(ran["collate_s"], 4), **fields)


def main(argv=None):
    worker_main(run_system, argv)


if __name__ == "__main__":
    main()
