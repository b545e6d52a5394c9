"""Sequence log-probabilities of completions, for the policy and for DPO's frozen reference, never from full logits.

The policy's come from the model's own forward with `reduction="none"` (the fused, chunked cross-entropy per token:
no [batch, seq, vocab] tensor, and the forward runs through any DDP / FSDP2 wrapper, so gradients sync as in SFT).

The reference is the model before training, in one of three ways (`preference.reference`):
  adapter_off   LoRA / QLoRA: the same model with its adapters switched off, under no_grad, every step (no second
                copy of the weights in memory).
  precomputed   any method: one pass over the data before step 1, kept in output_dir/checkpoints/ with a fingerprint
                of the data, so that a resumed full fine-tune (whose weights have moved) reads the same values.
                Not for GRPO, whose completions are sampled during the run.
  model         any method: a second, frozen copy of the starting model, read again from model.path (so a resumed
                run has the same one), used every step. Twice the weights in memory.
"""
from __future__ import annotations

import hashlib
import logging
import os
from contextlib import nullcontext
from pathlib import Path

import torch

from ...data.encode import IGNORE_INDEX
from ...errors import CheckpointError, ConfigError
from ...lora import adapters_disabled, lora_layers
from ..distributed import unwrap
from ..state import CHECKPOINTS, REFERENCE_CACHE

log = logging.getLogger("velotune")



def token_logprobs(model, batch: dict) -> torch.Tensor:
    """fp32 log-probs [N, T] of a padded batch's labels: position t holds that of label t + 1, 0 where there is
    none. One forward of `model` (through its DDP / FSDP2 wrapper), the chunked cross-entropy per token."""
    out = model(batch["input_ids"], labels=batch["labels"], attention_mask=batch.get("attention_mask"),
                reduction="none", return_logits=False)
    return -out.loss.float()


def sequence_logprobs(model, batch: dict):
    """(sum of the label tokens' log-probs per row [N], fp32; target tokens per row [N]) of a padded batch."""
    return token_logprobs(model, batch).sum(dim=1), (batch["labels"][:, 1:] != IGNORE_INDEX).sum(dim=1)


def check_reference_setting(config, *, fixed_data: bool = True):
    """The preference.reference choices that cannot work, refused before any weights load."""
    setting = config.preference.reference
    if setting == "precomputed" and not fixed_data:
        raise ConfigError("preference.reference: precomputed needs the data before training; grpo samples its "
                          "completions as it trains: use adapter_off (LoRA) or model")
    if setting == "adapter_off" and config.finetune.method == "full":
        raise ConfigError("preference.reference: adapter_off needs LoRA (finetune.method: lora); with full "
                          "fine-tuning use precomputed or model")


def reference_mode(setting: str, model, *, fixed_data: bool = True) -> str:
    """preference.reference resolved: `auto` is adapter_off for a LoRA model whose only trained weights are its
    adapters; otherwise (full fine-tuning, or modules_to_save trained in full) precomputed when the data is known
    before training, else a frozen copy of the model."""
    if setting == "precomputed" and not fixed_data:
        raise CheckpointError("preference.reference: precomputed needs the data before training; grpo samples its "
                              "completions as it trains: use adapter_off (LoRA) or model")
    if setting != "auto":
        return setting
    plain = unwrap(model)
    trained_outside = [n for n, p in plain.named_parameters() if p.requires_grad and "lora_" not in n]
    if lora_layers(plain) and not trained_outside:
        return "adapter_off"
    return "precomputed" if fixed_data else "model"


class Reference:
    """The reference of one run, resolved once (`start`), asked for log-probs every step (under no_grad)."""

    def __init__(self, setting: str, model, run, *, fixed_data: bool = True):
        self.mode = reference_mode(setting, model, fixed_data=fixed_data)
        self.copy = frozen_copy(model, run) if self.mode == "model" else None

    @torch.no_grad()
    def token_logps(self, model, batch: dict) -> torch.Tensor:
        """Per-token log-probs [N, T] of the batch's labels under the reference (0 where there is no target)."""
        if self.mode == "precomputed":
            raise RuntimeError("a precomputed reference has sequence sums only")
        source = self.copy if self.copy is not None else model
        plain = unwrap(model)
        if self.mode == "adapter_off" and not lora_layers(plain):
            raise CheckpointError("preference.reference: adapter_off needs a LoRA model (finetune.method: lora); "
                                  "use reference: precomputed or model for full fine-tuning")
        with adapters_disabled(plain) if self.mode == "adapter_off" else nullcontext():
            return token_logprobs(source, batch)

    def sequence_logps(self, model, batch: dict, precomputed=None) -> torch.Tensor:
        """Per-row sums [N]: the precomputed values when this reference is precomputed, else computed now."""
        if self.mode == "precomputed":
            if precomputed is None:
                raise RuntimeError("the batch has no precomputed reference log-probs (start() was not called)")
            return precomputed
        return self.token_logps(model, batch).sum(dim=1)


def frozen_copy(model, run):
    """The starting model, frozen: read again from model.path (also right on a resume, whose weights have moved),
    or copied from the model passed in (a fresh run only)."""
    import copy
    if run.config.model.path:
        from ..model_setup import load_model
        ref = load_model(run.config)
    elif not run.resumed:
        ref = copy.deepcopy(unwrap(model))
    else:
        raise CheckpointError("preference.reference: model, on a resumed run whose model was passed in: its starting "
                              "weights are not on disk; set model.path")
    ref.to(run.device).eval().requires_grad_(False)
    log.info("reference: a frozen copy of the starting model (%s)", run.config.model.path or "the model passed in")
    return ref


@torch.no_grad()
def precompute(model, run, examples: list, batches, name: str) -> torch.Tensor:
    """[len(examples), 2] reference log-probs of both sequences of each example (a batch of n examples holds their
    first sequences, then their second), in eval mode. `batches` yields (indices, batch). Every rank computes all
    of them: with FSDP2 the ranks must run the same forwards."""
    out = torch.zeros(len(examples), 2, dtype=torch.float32)
    was_training = model.training
    model.eval()
    try:
        for indices, batch in batches:
            batch = {k: v.to(run.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
            with run.autocast():
                logps = sequence_logprobs(model, batch)[0].float().cpu()
            n = len(indices)
            out[indices, 0], out[indices, 1] = logps[:n], logps[n:]
    finally:
        model.train(was_training)
    log.info("reference log-probs of %d %s examples computed", len(examples), name)
    return out


def fingerprint(examples: list) -> str:
    """What the cached values belong to: every example's token ids and labels (both sequences), in order."""
    digest = hashlib.sha256()
    for example in examples:
        for side in example.sides():
            digest.update(side.input_ids.numpy().tobytes())
            digest.update(side.labels.numpy().tobytes())
        digest.update(b"|")
    return digest.hexdigest()


def cache_path(out_dir) -> Path:
    return Path(out_dir) / CHECKPOINTS / REFERENCE_CACHE


def save_cache(out_dir, values: dict, prints: dict):
    """Writes the reference log-probs (atomically: a partial file is never read as whole)."""
    from safetensors.torch import save_file
    path = cache_path(out_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    save_file({k: v.contiguous() for k, v in values.items()}, str(tmp),
              metadata={f"fingerprint_{k}": v for k, v in prints.items()})
    os.replace(tmp, path)


def load_cache(out_dir, prints: dict) -> dict | None:
    """The cached reference log-probs when they were computed for the same data; None when there are none."""
    from safetensors import safe_open
    path = cache_path(out_dir)
    if not path.is_file():
        return None
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        for split, value in prints.items():
            if meta.get(f"fingerprint_{split}") != value:
                raise CheckpointError(f"{path}: the reference log-probs were computed for other {split} data (the "
                                      "data, its chat template or max_seq_length changed since): the reference of "
                                      "a resumed run must be the one it started with. Start a new run "
                                      "(train.overwrite=true) or restore the data")
        return {k: f.get_tensor(k) for k in f.keys()}


def attach_precomputed(model, run, collate):
    """Sets `example.reference` on every train and eval example: read back on a resume (checked against the
    data), else computed now, before step 1, and saved with the run's checkpoints. `collate` makes a batch of
    examples whose first half of rows are the examples' first sequences and second half their second."""
    splits = {"train": run.train, "eval": run.eval}
    prints = {name: fingerprint(examples) for name, examples in splits.items()}
    values = load_cache(run.out_dir, prints) if run.resumed else None
    if values is None:
        if run.resumed:
            raise CheckpointError(f"{run.out_dir}: the run is resumed with preference.reference: precomputed but "
                                  f"its reference log-probs are missing ({CHECKPOINTS}/{REFERENCE_CACHE}); they "
                                  "cannot be computed again from trained weights")
        size = run.config.train.batch_size

        def batches(examples):
            for start in range(0, len(examples), size):
                indices = list(range(start, min(start + size, len(examples))))
                yield indices, collate([[examples[i]] for i in indices], pad_id=run.pad_id, packing=False,
                                       max_width=None)
        values = {name: precompute(model, run, examples, batches(examples), name)
                  for name, examples in splits.items() if examples}
        run.dist.on_main(save_cache, run.out_dir, values, prints)
    for name, examples in splits.items():
        for example, ref in zip(examples, values.get(name, ())):
            example.reference = ref
