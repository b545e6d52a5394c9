"""`vt.load` and `vt.save`: Hugging Face checkpoint directory <-> our model, plus its tokenizer."""
from __future__ import annotations

import logging
from pathlib import Path

import torch

from ..errors import CheckpointError, UnsupportedError
from . import checkpoint as ckpt
from .build import parameters_on_meta, rebuild_buffers, skip_weight_init
from .checkpoint_io import cast_state, dtype_name, write_model_dir
from .header_check import check_layer_count, check_native, check_positive_sizes, header_shapes, warn_if_not_finite
from .heap import release_freed_memory
from .dtypes import default_dtype, parse_dtype, warn_if_emulated
from .interface import VelotuneModel, require_model
from .registry import SPEECH_SEQ2SEQ, architecture, supported_model_types
from .tokenizer import load_tokenizer

log = logging.getLogger("velotune")

# Tensors some checkpoints carry that are rebuilt from the config, never loaded.
_DERIVED_SUFFIXES = ("rotary_emb.inv_freq",)
# Files copied beside saved weights so the directory stays a complete checkpoint.
SIDE_FILES = ("generation_config.json",)

def load(name_or_path, dtype=None, quantize=None, device=None, max_seq_length=None, load_tokenizer_files=True):
    """Loads a Hugging Face format checkpoint: returns (model, tokenizer or None)."""
    try:
        return _load(name_or_path, dtype, quantize, device, max_seq_length, load_tokenizer_files)
    finally:
        release_freed_memory()  # the read buffers freed by casts and quantization, back to the system


def _load(name_or_path, dtype, quantize, device, max_seq_length, load_tokenizer_files):
    model_dir = ckpt.resolve_model_dir(name_or_path)
    config = ckpt.read_config(model_dir)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = parse_dtype(dtype) if dtype is not None else default_dtype(device, config)
    warn_if_emulated(dtype, device)
    if quantize not in (None, "nf4", "int8"):
        raise ValueError(f"quantize={quantize!r}: expected None, 'nf4' or 'int8'")
    module = architecture(config["model_type"])
    from .vision.files import is_vision_config
    if architecture(config["model_type"], SPEECH_SEQ2SEQ) is not None:   # Whisper: its own loader
        if quantize:
            raise UnsupportedError(f"{model_dir}: a speech-to-text model loads unquantized here; drop quantize")
        from .whisper_files import load_whisper
        return _with_tokenizer(load_whisper(model_dir, dtype, device), model_dir, max_seq_length,
                               load_tokenizer_files)
    if is_vision_config(config):
        from .vision.files import load_vision_model
        model = load_vision_model(model_dir, dtype, device)
        if quantize:
            from .quantize import quantize_model
            model = quantize_model(model, quantize, compute_dtype=dtype, device=device)
        return _with_tokenizer(model, model_dir, max_seq_length, load_tokenizer_files)
    if module is None:
        from .generic import load_generic
        model = load_generic(model_dir, config, dtype, device, quantize)
    else:
        model = _load_native(module, model_dir, config, dtype, device, quantize)
        if quantize:
            from .quantize import quantize_model
            model = quantize_model(model, quantize, compute_dtype=dtype, device=device)
    model.set_source(model_dir, max_seq_length or config.get("max_position_embeddings"))
    tokenizer = load_tokenizer(model_dir) if load_tokenizer_files else None
    return model, tokenizer


def _with_tokenizer(model, model_dir: Path, max_seq_length, load_tokenizer_files: bool):
    """(model, tokenizer) of a family whose loader set its own source and length (max_seq_length overrides it)."""
    if max_seq_length:
        model.max_seq_length = max_seq_length
    return model, (load_tokenizer(model_dir) if load_tokenizer_files else None)


def _load_native(module, model_dir: Path, config: dict, dtype, device, quantize=None):
    config_path = model_dir / "config.json"
    check_positive_sizes(config, config_path)
    files = ckpt.weight_files(model_dir)
    shapes = header_shapes(files)
    # Before Args: some architectures' validation lists a setting per layer.
    check_layer_count(config.get("num_hidden_layers"), shapes, config_path)
    args = module.Args.from_dict(config, source=str(config_path))
    # The family maps stored layouts to its own (mixture-of-experts: fused expert tensors split per expert).
    shapes = module.Model.checkpoint_shapes(args, shapes, config_path)
    check_native(args, shapes, config_path, model_dir)  # before building: the sizes are the weights' own
    with parameters_on_meta(), skip_weight_init():
        model = module.Model(args)
    wanted = _tensors_to_load(model.state_dict(), shapes, args.tie_word_embeddings, model_dir)
    stream = None
    if quantize:  # each linear quantized as soon as it is read: the full-precision model never exists at once
        from .quantize import StreamingQuantizer
        stream = StreamingQuantizer(model, quantize, dtype, device)
    loaded = {}
    for stored, tensor, file in ckpt.iter_tensors(files):
        for name, part in module.Model.checkpoint_tensors(stored, tensor):
            if name in wanted:
                loaded[name] = part.to(device=device, dtype=dtype if part.is_floating_point() else part.dtype)
                warn_if_not_finite(name, loaded[name], file)
                if stream is not None:
                    stream.offer(name, loaded)
    model.load_state_dict(loaded, strict=False, assign=True)
    if args.tie_word_embeddings:
        model.tie_weights()
    rebuild_buffers(model, device)
    return model.eval()


def _tensors_to_load(expected: dict, shapes: dict, tied: bool, model_dir: Path) -> set[str]:
    """The checkpoint tensors the model takes, checked against it (names and shapes, from the headers) before any
    tensor data is read."""
    def skipped(name):
        return name.endswith(_DERIVED_SUFFIXES) or (tied and name == "lm_head.weight")
    for name, (shape, file) in shapes.items():
        if name in expected and not skipped(name) and shape != tuple(expected[name].shape):
            raise CheckpointError(
                f"{file}: tensor '{name}' has shape {list(shape)} but config.json implies "
                f"{list(expected[name].shape)} (does the config belong to these weights?)")
    needed = [k for k in expected if not skipped(k)]
    missing = [k for k in needed if k not in shapes]
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise CheckpointError(f"{model_dir}: weights missing from the checkpoint: {shown}")
    unexpected = [n for n in shapes if n not in expected and not skipped(n)]
    if unexpected:
        log.warning("%s: ignoring %d tensor(s) this architecture does not use, e.g. %s",
                    model_dir, len(unexpected), unexpected[0])
    return set(needed)


def save(model, tokenizer, out_dir, dtype=None, max_shard_bytes: int = ckpt.DEFAULT_SHARD_BYTES,
         overwrite: bool = False):
    """Writes a Hugging Face checkpoint directory (config, safetensors, tokenizer), atomically."""
    model = require_model(model, "vt.save", VelotuneModel)
    if model.task == SPEECH_SEQ2SEQ:
        from .whisper_files import save_whisper
        return save_whisper(model, out_dir, overwrite=overwrite, dtype=dtype)
    from .vision.base import VisionLanguageModel
    if isinstance(model, VisionLanguageModel):
        from .vision.files import save_vision_model
        return save_vision_model(model, out_dir, overwrite=overwrite, dtype=dtype, tokenizer=tokenizer)
    if any("lora_" in name for name, _ in model.named_parameters()):
        raise UnsupportedError("this model carries LoRA adapters: use vt.save_adapter(model, dir) for the "
                               "adapter, or vt.export(model, tokenizer, dir, format='merged') for merged weights")
    target = parse_dtype(dtype) if dtype is not None else None
    state = cast_state(model.state_for_saving(), target)
    config = dict(model.args.to_dict())
    if target is not None or "torch_dtype" in config or "dtype" in config:
        config["dtype" if "dtype" in config or "torch_dtype" not in config else "torch_dtype"] = dtype_name(state)
    return write_model_dir(out_dir, state, config, source_dir=model.source_dir, side_files=SIDE_FILES,
                           tokenizer=tokenizer, overwrite=overwrite, max_shard_bytes=max_shard_bytes)


__all__ = ["load", "save", "supported_model_types"]
