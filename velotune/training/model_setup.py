"""Turning a config into a model ready to train: load, then LoRA adapters or full fine-tuning with freezing."""
from __future__ import annotations

import logging

import torch

from ..errors import ConfigError, UnsupportedError
from ..models.dtypes import warn_if_emulated

log = logging.getLogger("velotune")


def check_settings(cfg):
    """Settings that cannot work together, refused before anything loads."""
    if cfg.finetune.method == "full" and cfg.model.quantize:
        raise ConfigError("finetune.method: 'full' cannot train a quantized base (model.quantize is set); "
                          "use method 'lora' (QLoRA) or remove model.quantize")


def load_model(cfg):
    """The model's weights per the config's model section (the tokenizer is loaded before, on its own)."""
    from ..models.loader import load
    if not cfg.model.path:
        raise ConfigError("model.path: required (a Hugging Face model directory or hub id)")
    dtype = None if cfg.model.dtype == "auto" else cfg.model.dtype
    model, _ = load(cfg.model.path, dtype=dtype, quantize=cfg.model.quantize, device=cfg.model.device,
                    max_seq_length=cfg.model.max_seq_length, load_tokenizer_files=False)
    return model


def prepare_for_training(model, cfg, adjust=None) -> dict:
    """Adds LoRA (or trains the LoRA layers the model already carries) or sets up full fine-tuning per
    `cfg.finetune`, then `adjust(model, cfg)` (the objective's own freezing) when given; returns parameter counts."""
    from ..lora import lora_layers
    has_lora = bool(lora_layers(model))
    if cfg.finetune.method == "lora" and has_lora:
        _use_existing_lora(model, cfg.lora)
    elif cfg.finetune.method == "lora":
        from ..lora import add_lora
        lora = cfg.lora
        add_lora(model, r=lora.r, alpha=lora.alpha, dropout=lora.dropout, targets=lora.targets,
                 rslora=lora.rslora, dora=lora.dora, modules_to_save=lora.modules_to_save or None,
                 seed=cfg.train.seed)
    else:
        check_settings(cfg)
        if has_lora:
            raise ConfigError("finetune.method: 'full', but the model carries LoRA adapters: train them with "
                              "finetune.method=lora, or merge them into the weights first (velotune.lora."
                              "merge_and_unload)")
        _setup_full(model, cfg.finetune)
        half = {p.dtype for p in model.parameters() if p.requires_grad} & {torch.bfloat16, torch.float16}
        if half:
            log.info("full fine-tuning with %s weights: the optimizer updates them in that dtype (no fp32 master "
                     "copy); for fp32 master weights set model.dtype: float32 and train.precision: bf16",
                     str(half.pop()).replace("torch.", ""))
    if adjust is not None:
        adjust(model, cfg)
    if cfg.train.gradient_checkpointing:
        try:
            model.set_checkpoint_every(cfg.train.checkpoint_every_n_layers)
        except UnsupportedError as exc:
            raise ConfigError(f"train.checkpoint_every_n_layers: {exc}") from None
        model.set_gradient_checkpointing(cfg.train.gradient_checkpointing)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return {"trainable_params": trainable, "total_params": total}


def _use_existing_lora(model, lora_cfg):
    """A model passed with LoRA layers is trained with those; the config's lora section is not applied, and
    a warning names each of its settings that differs from the model's adapters."""
    from ..config import LoraConfig
    from ..lora import lora_layers, resolve_targets
    settings = model.lora_settings
    log.info("the model already carries LoRA adapters (r=%d, %d modules): training those; the config's lora "
             "section is not applied", settings.r, len(lora_layers(model)))
    defaults, differ = LoraConfig(), []
    for key in ("r", "alpha", "dropout", "rslora", "dora"):
        wanted, has = getattr(lora_cfg, key), getattr(settings, key)
        if wanted != getattr(defaults, key) and wanted != has:
            differ.append(f"lora.{key}={wanted} (the model's: {has})")
    if lora_cfg.targets != defaults.targets:
        try:
            same = sorted(resolve_targets(model, lora_cfg.targets)) == sorted(settings.targets)
        except ConfigError:
            same = False
        if not same:
            differ.append(f"lora.targets={lora_cfg.targets} (the model's: {len(settings.targets)} modules)")
    if differ:
        log.warning("the config's lora section differs from the adapters the model carries, which are the ones "
                    "trained: %s", ", ".join(differ))


def _setup_full(model, ft):
    for p in model.parameters():
        p.requires_grad_(True)
    if ft.freeze_embeddings:
        model.get_input_embeddings().requires_grad_(False)
        model.get_output_embeddings().requires_grad_(False)
    if ft.train_last_n_layers is not None:
        blocks = model.blocks()
        n = ft.train_last_n_layers
        if not 0 <= n <= len(blocks):
            raise ConfigError(f"finetune.train_last_n_layers: {n} is outside 0..{len(blocks)}")
        for block in blocks[: len(blocks) - n]:
            block.requires_grad_(False)


def autocast_dtype(precision: str, device: torch.device, model_dtype: torch.dtype):
    """The dtype the forward runs in under autocast, or None for none (fp32, or weights already half)."""
    if precision == "auto":
        return None
    if precision == "fp32":
        return None
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    warn_if_emulated(dtype, device)   # autocast to a dtype this CPU only emulates: many times slower than fp32
    return None if model_dtype == dtype else dtype
