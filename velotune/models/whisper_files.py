"""Whisper checkpoints in and out: a Hugging Face directory (config.json + safetensors) <-> velotune's Whisper.

WhisperForConditionalGeneration checkpoints load by name; a WhisperModel (base, no head) checkpoint's names get the
`model.` prefix, its head being the tied embeddings. Names, shapes and layer counts are checked from the safetensors
headers before any module is built or tensor read; only safetensors are read (no pickle). The model class is found
through the registry, (model_type, "speech-seq2seq"), so this file and whisper.py do not import each other.
"""
from __future__ import annotations

import logging
import re
from pathlib import Path

import torch

from ..errors import CheckpointError, UnsupportedError
from . import checkpoint as ckpt
from .dtypes import default_dtype, parse_dtype
from .checkpoint_io import cast_state, dtype_name, tensors_to_load, write_model_dir
from .header_check import check_positive_sizes, header_shapes, warn_if_not_finite
from .interface import VelotuneModel
from .build import parameters_on_meta, skip_weight_init
from .registry import SPEECH_SEQ2SEQ, architecture, supported_model_types

log = logging.getLogger("velotune")

HEAD = "proj_out.weight"
# Files beside the weights that keep a saved directory usable by transformers' processor and generate().
SIDE_FILES = ("generation_config.json", "preprocessor_config.json", "tokenizer.json", "tokenizer_config.json",
              "vocab.json", "merges.txt", "normalizer.json", "added_tokens.json", "special_tokens_map.json")
_LAYER = re.compile(r"^model\.(encoder|decoder)\.layers\.(\d+)\.")


def load_whisper(directory, dtype=None, device=None):
    """The Whisper model of a Hugging Face checkpoint directory (or hub id), in eval mode.

    dtype: None picks the device's default (bf16 on GPUs, fp32 on most CPUs); device: None picks CUDA when there."""
    model_dir = ckpt.resolve_model_dir(directory)
    config = ckpt.read_config(model_dir)
    config_path = model_dir / "config.json"
    module = architecture(config["model_type"], SPEECH_SEQ2SEQ)
    if module is None:
        raise UnsupportedError(f"{config_path}: model_type '{config['model_type']}' is not a speech-to-text model "
                               f"velotune has; supported: {', '.join(supported_model_types(SPEECH_SEQ2SEQ))}")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = parse_dtype(dtype) if dtype is not None else default_dtype(device, config)
    check_positive_sizes(config, config_path)
    files = ckpt.weight_files(model_dir)
    shapes = _our_names(header_shapes(files))
    _check_layer_counts(config, shapes, config_path)  # before building: a config of a million layers fails here
    args = module.Args.from_dict(config, source=str(config_path))
    with parameters_on_meta(), skip_weight_init():
        model = module.Model(args)
    wanted = _tensors_to_load(model, shapes, model_dir)
    loaded = {}
    for name, tensor, file in ckpt.iter_tensors(files):
        ours = _our_name(name)
        if ours in wanted:
            loaded[ours] = tensor.to(device=device, dtype=dtype if tensor.is_floating_point() else tensor.dtype)
            warn_if_not_finite(name, loaded[ours], file)
    model.load_state_dict(loaded, strict=False, assign=True)  # assign keeps each parameter's requires_grad
    if args.tie_word_embeddings:
        model.tie_weights()
    model.set_source(model_dir, args.max_target_positions)
    return model.eval()


def _our_name(name: str) -> str:
    """WhisperModel (base) checkpoints name `encoder.*` / `decoder.*` what ours calls `model.encoder.*`."""
    return "model." + name if name.startswith(("encoder.", "decoder.")) else name


def _our_names(shapes: dict) -> dict:
    return {_our_name(name): value for name, value in shapes.items()}


def _check_layer_counts(config: dict, shapes: dict, source: Path):
    held = {"encoder": 0, "decoder": 0}
    for name in shapes:
        match = _LAYER.match(name)
        if match:
            held[match[1]] = max(held[match[1]], int(match[2]) + 1)
    for part in ("encoder", "decoder"):
        asked = config.get(f"{part}_layers", 4)  # transformers' default when the field is left out
        if isinstance(asked, int) and asked > held[part]:
            raise CheckpointError(f"{source}: {part}_layers is {asked} but the weights hold {held[part]} {part} "
                                  "layers (does the config belong to these weights?)")


def _tensors_to_load(model, shapes: dict, model_dir: Path) -> set[str]:
    """Every tensor the model needs is there with its shape (a tied head may be left out)."""
    tied = model.args.tie_word_embeddings
    try:
        return tensors_to_load(model, shapes, model_dir, skipped=lambda name: tied and name == HEAD)
    except CheckpointError as exc:
        if not tied and f"'{HEAD}'" in str(exc) and "missing" in str(exc):
            raise CheckpointError(f"{exc} (tie_word_embeddings is false: the head must be stored)") from None
        raise


def save_whisper(model, out_dir, overwrite: bool = False, dtype=None) -> Path:
    """Writes config.json + safetensors that transformers' WhisperForConditionalGeneration loads, atomically (an
    overwrite replaces only files velotune wrote there), with the source directory's generation, feature-extractor
    and tokenizer files copied beside them. dtype: None keeps the model's."""
    if not isinstance(model, VelotuneModel) or model.task != SPEECH_SEQ2SEQ:
        raise UnsupportedError(f"save_whisper: {type(model).__name__} is not a velotune Whisper model; load one "
                               "with load_whisper(dir)")
    if any("lora_" in name for name, _ in model.named_parameters()):
        raise UnsupportedError("this Whisper model carries LoRA adapters: save them with vt.save_adapter(model, "
                               "dir), or merge them first (velotune.lora.merge_and_unload(model))")
    state = cast_state(model.state_for_saving(), dtype)
    config = model.args.to_dict()
    config["architectures"] = [model.hf_architecture]
    config["torch_dtype" if "torch_dtype" in config else "dtype"] = dtype_name(state)
    return write_model_dir(out_dir, state, config, source_dir=model.source_dir, side_files=SIDE_FILES,
                           overwrite=overwrite)


__all__ = ["SPEECH_SEQ2SEQ", "load_whisper", "save_whisper"]
