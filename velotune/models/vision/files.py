"""Vision-language checkpoints in and out: a Hugging Face directory (config.json + safetensors, any spelling of the
family's tensor names that `Model.our_name` knows) <-> a velotune VisionLanguageModel.

Names and shapes are checked from the safetensors headers before any tensor is read; only safetensors are read (no
pickle). A save writes the names transformers writes for the family (`state_for_saving`) and copies the processor,
chat-template and generation files beside the weights, so the directory stays a complete checkpoint that transformers
and velotune both load.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch

from ...errors import UnsupportedError
from .. import checkpoint as ckpt
from ..checkpoint_io import cast_state, dtype_name, tensors_to_load, write_model_dir
from ..dtypes import default_dtype, parse_dtype
from ..header_check import check_positive_sizes, header_shapes, warn_if_not_finite
from ..build import parameters_on_meta, rebuild_buffers, skip_weight_init
from ..registry import IMAGE_TEXT, architecture, supported_model_types

log = logging.getLogger("velotune")

HEAD = "language_model.lm_head.weight"   # left out of files whose head is tied to the embeddings

# Files beside the weights that keep a directory usable by transformers' processor, generate() and chat templates.
SIDE_FILES = ("generation_config.json", "preprocessor_config.json", "processor_config.json",
              "video_preprocessor_config.json", "chat_template.json",
              "chat_template.jinja", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
              "added_tokens.json", "vocab.json", "merges.txt", "tokenizer.model")


def is_vision_config(config: dict) -> bool:
    """Whether config.json describes a vision-language model velotune has a file for."""
    return architecture(str(config.get("model_type")), IMAGE_TEXT) is not None


def load_vision_model(directory, dtype=None, device=None):
    """The vision-language model of a Hugging Face checkpoint directory, in eval mode.

    dtype: None picks the device's default (bf16 on GPUs, fp32 on most CPUs); device: None picks CUDA when there."""
    model_dir = ckpt.resolve_model_dir(directory)
    config = ckpt.read_config(model_dir)
    config_path = model_dir / "config.json"
    module = architecture(str(config.get("model_type")), IMAGE_TEXT)
    if module is None:
        raise UnsupportedError(f"{config_path}: model_type '{config.get('model_type')}' is not a vision-language "
                               f"family velotune has; supported: {', '.join(supported_model_types(IMAGE_TEXT))}")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = parse_dtype(dtype) if dtype is not None else default_dtype(device, config.get("text_config") or config)
    check_positive_sizes(config, config_path)
    files = ckpt.weight_files(model_dir)
    model_class = module.Model
    shapes = {model_class.our_name(name): value for name, value in header_shapes(files).items()}
    args = module.Args.from_dict(config, source=str(config_path))
    with parameters_on_meta(), skip_weight_init():
        model = model_class(args)
    tied = args.tie_word_embeddings
    wanted = tensors_to_load(model, shapes, model_dir,
                             skipped=lambda n: (tied and n == HEAD) or n.endswith(".inv_freq"))
    loaded = {}
    for name, tensor, file in ckpt.iter_tensors(files):
        ours = model_class.our_name(name)
        if ours in wanted:
            loaded[ours] = tensor.to(device=device, dtype=dtype if tensor.is_floating_point() else tensor.dtype)
            warn_if_not_finite(name, loaded[ours], file)
    model.load_state_dict(loaded, strict=False, assign=True)  # assign keeps each parameter's requires_grad
    if args.tie_word_embeddings:
        model.tie_weights()
    rebuild_buffers(model, device)
    model.to(device)  # buffers a family builds in its constructor (rotary tables of the vision tower)
    model.set_source(model_dir, args.max_position_embeddings)
    return model.eval()


def save_vision_model(model, out_dir, overwrite: bool = False, dtype=None, tokenizer=None) -> Path:
    """Writes config.json + safetensors under transformers' names for the family, atomically (an overwrite replaces
    only files velotune wrote there), with the source directory's processor, template and generation files (and
    `tokenizer`'s files when given). dtype: None keeps the model's."""
    from .base import VisionLanguageModel
    if not isinstance(model, VisionLanguageModel):
        raise UnsupportedError(f"save_vision_model: {type(model).__name__} is not a velotune vision-language model")
    if any("lora_" in name for name, _ in model.named_parameters()):
        raise UnsupportedError("this model carries LoRA adapters: save them with vt.save_adapter(model, dir), or "
                               "export merged weights with vt.export(model, tokenizer, dir, format='merged')")
    state = cast_state(model.state_for_saving(), dtype)
    config = model.args.to_dict()
    if model.hf_architecture:
        config["architectures"] = [model.hf_architecture]
    config["torch_dtype" if "torch_dtype" in config else "dtype"] = dtype_name(state)
    return write_model_dir(out_dir, state, config, source_dir=model.source_dir, side_files=SIDE_FILES,
                           tokenizer=tokenizer, overwrite=overwrite)


__all__ = ["SIDE_FILES", "is_vision_config", "load_vision_model", "save_vision_model"]
