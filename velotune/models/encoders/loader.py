"""Encoder checkpoints in and out: a Hugging Face directory (config.json + safetensors) <-> an EncoderModel.

Checkpoints come from the base model (`embeddings.word_embeddings.weight`) or from a task model that puts a prefix
before the same names (`bert.` in BertForMaskedLM, `roberta.`, `model.` in ModernBertForMaskedLM) and adds heads,
which embeddings do not use. Names and shapes are checked from the safetensors headers before any tensor is read;
only safetensors are read (no pickle).
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from ...errors import CheckpointError, UnsupportedError
from .. import checkpoint as ckpt
from ..dtypes import default_dtype, parse_dtype
from ..header_check import check_layer_count, check_positive_sizes, header_shapes, warn_if_not_finite
from ..build import parameters_on_meta, skip_weight_init
from ..registry import ENCODER, architecture, supported_model_types
from ..rope import RotaryEmbedding
from .base import EncoderModel

log = logging.getLogger("velotune")

# Task heads and poolers of *ForMaskedLM / *ForSequenceClassification / ... checkpoints: skipped, as
# sentence-transformers does (its Transformer module is the base model).
HEAD_PREFIXES = ("cls.", "lm_head.", "pooler.", "classifier.", "head.", "decoder.", "qa_outputs.")
# Buffers some checkpoints carry that the model rebuilds from the config.
DERIVED_SUFFIXES = ("position_ids", "token_type_ids", "inv_freq")
# TensorFlow-era names of LayerNorm parameters (original BERT conversions), renamed as transformers does on load.
_LEGACY_SUFFIXES = {".gamma": ".weight", ".beta": ".bias"}


def encoder_model_types() -> list[str]:
    """The config.json model_types velotune has an encoder file for."""
    return supported_model_types(ENCODER)


def load_encoder(model_dir, dtype=None, device=None, max_seq_length: int | None = None) -> EncoderModel:
    """Loads the encoder of a Hugging Face checkpoint directory (or hub id) in eval mode.

    dtype: None picks the device's default (bf16 on GPUs, fp32 on most CPUs); max_seq_length: None takes the
    longest input the position table holds."""
    model_dir = ckpt.resolve_model_dir(model_dir)
    config = ckpt.read_config(model_dir)
    config_path = model_dir / "config.json"
    module = architecture(config["model_type"], ENCODER)
    if module is None:
        raise UnsupportedError(f"{config_path}: model_type '{config['model_type']}' has no encoder in velotune; "
                               f"supported encoder types: {', '.join(encoder_model_types())}")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = parse_dtype(dtype) if dtype is not None else default_dtype(device, config)
    check_positive_sizes(config, config_path)
    files = ckpt.weight_files(model_dir)
    shapes = header_shapes(files)
    # Before any module is built: a config asking for more layers than the weights hold fails here.
    check_layer_count(config.get("num_hidden_layers"), shapes, config_path)
    args = module.Args.from_dict(config, source=str(config_path))
    with parameters_on_meta(), skip_weight_init():
        model = module.Model(args)
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    names = _checkpoint_names(shapes, expected, model.checkpoint_prefixes)
    _check_against_headers(names, shapes, expected, model_dir)
    loaded = {}
    for name, tensor, file in ckpt.iter_tensors(files):
        if name in names:
            ours = names[name]
            loaded[ours] = tensor.to(device=device, dtype=dtype if tensor.is_floating_point() else tensor.dtype)
            warn_if_not_finite(name, loaded[ours], file)
    model.load_state_dict(loaded, strict=True, assign=True)
    for table in model.modules():
        if isinstance(table, RotaryEmbedding):  # built on the CPU with the modules: rebuilt where the weights are
            table.rebuild(device)
    model.set_source(model_dir, max_seq_length or model.max_positions)
    return model.eval()


def _checkpoint_names(shapes: dict, expected: dict, prefixes: tuple) -> dict[str, str]:
    """Checkpoint name -> our name, for the tensors we load. A task prefix is detected from the names themselves;
    heads, derived buffers and anything else we do not use are left out (and reported)."""
    def ours(name):
        for old, new in _LEGACY_SUFFIXES.items():
            if name.endswith(old) and "LayerNorm" in name:
                name = name[: -len(old)] + new
        return name

    prefix = ""
    if not any(ours(n) in expected for n in shapes):
        prefix = next((p for p in prefixes if any(n.startswith(p) and ours(n[len(p):]) in expected for n in shapes)),
                      "")
    names, heads, unused = {}, [], []
    for name in shapes:
        short = ours(name[len(prefix):] if prefix and name.startswith(prefix) else name)
        if short in expected:
            names[name] = short
        elif short.startswith(HEAD_PREFIXES):
            heads.append(name)
        elif not short.endswith(DERIVED_SUFFIXES):
            unused.append(name)
    if heads:
        log.debug("skipping %d tensor(s) of heads and poolers embeddings do not use (%s)", len(heads),
                 ", ".join(sorted({h.split(".")[0] for h in heads})))
    if unused:
        log.warning("ignoring %d tensor(s) this encoder does not use, e.g. %s", len(unused), unused[0])
    return names


def _check_against_headers(names: dict, shapes: dict, expected: dict, model_dir: Path):
    """Every tensor the model needs is present with its shape; the error names the tensor and the file."""
    for theirs, ours in names.items():
        shape, file = shapes[theirs]
        if shape != expected[ours]:
            raise CheckpointError(f"{file}: tensor '{theirs}' has shape {list(shape)} but config.json implies "
                                  f"{list(expected[ours])} (does the config belong to these weights?)")
    missing = sorted(set(expected) - set(names.values()))
    if missing:
        files = sorted({file.name for _, file in shapes.values()}) or ["(no tensors)"]
        shown = ", ".join(f"'{m}'" for m in missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise CheckpointError(f"{model_dir}: tensor {shown} missing from {', '.join(files)}")


def save_encoder(model: EncoderModel, out_dir, overwrite: bool = False) -> Path:
    """Writes config.json + model.safetensors that transformers' AutoModel loads as the family's base model
    (BertModel, ...), atomically: an overwrite replaces only files velotune wrote there (checkpoint.atomic_dir).
    The BERT pooler is not written; transformers initialises it afresh on load (embeddings never use it)."""
    if not isinstance(model, EncoderModel):
        raise UnsupportedError(f"save_encoder: {type(model).__name__} is not a velotune encoder "
                               "(velotune.models.encoders.EncoderModel); load one with load_encoder(dir)")
    if any("lora_" in name for name, _ in model.named_parameters()):
        raise UnsupportedError("this encoder carries LoRA adapters: save them with vt.save_adapter(model, dir), "
                               "or merge them first (velotune.lora.merge_and_unload(model))")
    state = model.state_for_saving()
    config = model.args.to_dict()
    # The weights are the base model's whatever task model they came from: say so, for AutoModel's dispatch.
    config["architectures"] = [model.hf_architecture]
    if "torch_dtype" in config:
        config["torch_dtype"] = str(next(iter(state.values())).dtype).replace("torch.", "")
    else:
        config["dtype"] = str(next(iter(state.values())).dtype).replace("torch.", "")
    out_dir = Path(out_dir)
    with ckpt.atomic_dir(out_dir, overwrite=overwrite) as tmp:
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        ckpt.save_safetensors(state, tmp)
    return out_dir
