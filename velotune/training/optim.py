"""Optimizers and learning-rate schedules (warm-up, then linear / cosine / constant)."""
from __future__ import annotations

import math
import sys

import torch

from ..errors import ConfigError, UnsupportedError
from ..models.bitsandbytes_import import require_bitsandbytes
from .lean_optim import AdamW, lean


def build_optimizer(params, cfg, named=None, embedding_params=()):
    """AdamW, or 8-bit AdamW from bitsandbytes. No weight decay on biases and norms (1-D tensors). Both are
    torch's / bitsandbytes' own update without torch's compiler import (lean_optim: ~150 MB less per process).

    `named` ({parameter: name}) and `embedding_params` (the trained embedding and head weights) give the groups
    with their own learning rate: LoRA's B matrices at lr x train.lora_plus_ratio (LoRA+), embeddings and head at
    train.embedding_lr. The first group always runs at train.lr (the rate the log shows); the schedule scales
    every group alike."""
    params = [p for p in params if p.requires_grad]
    if not params:
        raise ConfigError("nothing to train: no parameter requires a gradient (check finetune / lora settings)")
    groups = {}  # (lr, decays) -> parameters, in first-seen order
    embedding_ids = {id(p) for p in embedding_params}
    for p in params:
        groups.setdefault((_rate(p, cfg, named or {}, embedding_ids), p.dim() >= 2), []).append(p)
    ordered = sorted(groups.items(), key=lambda item: (item[0][0] != cfg.lr, not item[0][1]))
    groups = [{"params": ps, "lr": lr, "weight_decay": cfg.weight_decay if decays else 0.0}
              for (lr, decays), ps in ordered]
    betas = tuple(float(b) for b in cfg.betas)
    if cfg.optimizer == "adamw8bit":
        try:
            bnb = require_bitsandbytes()
        except UnsupportedError:
            raise ConfigError("train.optimizer: 'adamw8bit' needs bitsandbytes (pip install bitsandbytes)") from None
        return lean(bnb.optim.AdamW8bit)(groups, lr=cfg.lr, betas=betas)
    return AdamW(groups, lr=cfg.lr, betas=betas, **adamw_impl(params))


def _rate(p, cfg, named: dict, embedding_ids: set) -> float:
    if id(p) in embedding_ids and cfg.embedding_lr is not None:
        return cfg.embedding_lr
    name = f".{named.get(p, '')}."
    if cfg.lora_plus_ratio is not None and (".lora_B." in name or ".lora_embedding_B." in name):
        return cfg.lr * cfg.lora_plus_ratio
    return cfg.lr


def trained_embedding_params(model) -> list:
    """The input embedding and output head weights of `model` (unwrapped) that train: what train.embedding_lr
    sets the rate of (trained in full, or as modules_to_save)."""
    from ..models.interface import LanguageModel, VelotuneModel
    modules = [model.get_input_embeddings()] if isinstance(model, VelotuneModel) else []
    if isinstance(model, LanguageModel):
        modules.append(model.get_output_embeddings())
    found = []
    for module in modules:
        weight = getattr(module, "weight", None)  # a head wrapped in LoRA has none of its own
        if isinstance(weight, torch.nn.Parameter) and weight.requires_grad and all(weight is not f for f in found):
            found.append(weight)
    return found


def adamw_impl(params) -> dict:
    """The fused AdamW kernel (one pass per tensor, no temporaries: ~7x faster than the per-tensor loop on the
    CPU for a full fine-tune, and no transient copies of the largest tensors) for plain CPU / CUDA tensors;
    the per-tensor loop for the rest (sharded DTensors, other devices)."""
    # A sharded parameter exists only once torch.distributed.tensor was imported (by FSDP2); importing it just to
    # ask would pull in sympy and PyTorch's symbolic shapes (~35 MB resident) for every single-process run.
    tensor_module = sys.modules.get("torch.distributed.tensor")
    DTensor = getattr(tensor_module, "DTensor", ())
    plain = all(not isinstance(p, DTensor) and p.device.type in ("cpu", "cuda") and p.is_floating_point()
                for p in params)
    return {"fused": True} if plain else {"foreach": False}


def lr_factor(step: int, total: int, warmup: int, kind: str) -> float:
    """Multiplier of the base learning rate before optimizer step `step` (0-based)."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    if kind == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if kind == "linear":
        return max(0.0, 1.0 - progress)
    if kind == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ConfigError(f"train.scheduler: unknown schedule {kind!r}")


def build_scheduler(optimizer, cfg, total_steps: int):
    warmup = cfg.warmup_steps or int(round(cfg.warmup_ratio * total_steps))
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, total_steps, warmup, cfg.scheduler))
