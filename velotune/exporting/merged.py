"""Merged Hugging Face checkpoints: LoRA folded into the base weights, written as a plain model directory that
`transformers.AutoModelForCausalLM.from_pretrained` (or `vt.load`) reads with no adapter code.

Each merged weight is W + scaling * B @ A computed in fp32 and cast once to the export dtype. A quantized base
(QLoRA's NF4, or int8) is dequantized in fp32 and merged once, never re-quantized. The live model is not
touched: merging reads the weights and writes new tensors.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from ..errors import UnsupportedError
from ..models import checkpoint as ckpt
from ..models.dtypes import parse_dtype
from .output import check_output

GENERATION_CONFIG = "generation_config.json"
# Copied from the source checkpoint when there is no tokenizer object to save.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
                   "added_tokens.json", "chat_template.jinja", "chat_template.json", "vocab.json", "merges.txt")


def export_merged(model, tokenizer, out, dtype=None, overwrite: bool = False,
                  max_shard_bytes: int = ckpt.DEFAULT_SHARD_BYTES, adapter_dir=None) -> Path:
    """Writes config.json, the merged safetensors (sharded above `max_shard_bytes`), generation_config.json
    and the tokenizer files into `out`, atomically; returns `out`. A speech model also gets its feature
    extractor's files; the generation config and those files come from `adapter_dir` when it has them (a speech
    adapter records the language and task it was trained for), else from the source."""
    out = Path(out)
    check_output(out, overwrite)
    target = export_dtype(model, dtype)
    state = merged_weights(model, target)
    if getattr(model, "task", None) == "image-text-to-text":   # our module paths -> the family's file names
        state = model.checkpoint_names(state)
    with ckpt.atomic_dir(out, overwrite=overwrite) as tmp:
        write_config(model, tmp, target)
        ckpt.save_safetensors(state, tmp, max_shard_bytes)
        write_generation_config(model, tokenizer, tmp, adapter_dir)
        write_tokenizer(model, tokenizer, tmp)
        if getattr(model, "task", None) == "speech-seq2seq":
            copy_first(SPEECH_FILES, [adapter_dir, model.source_dir], tmp)
        if getattr(model, "task", None) == "image-text-to-text":
            copy_first(VISION_FILES, [adapter_dir, model.source_dir], tmp)
    return out


# What a speech checkpoint needs beside its weights for transformers' processor (feature extractor, normaliser).
SPEECH_FILES = ("preprocessor_config.json", "normalizer.json")
# ... and a vision-language one (image processor, the processor's image-token settings).
VISION_FILES = ("preprocessor_config.json", "processor_config.json")


def copy_first(names, sources, out_dir: Path):
    """Each of `names` copied from the first of `sources` (directories, None skipped) that holds it."""
    for name in names:
        for source in sources:
            if source is not None and (Path(source) / name).is_file():
                shutil.copy2(Path(source) / name, out_dir / name)
                break


def export_dtype(model, dtype) -> torch.dtype:
    """The dtype asked for, else that of the (never quantized) token embeddings."""
    if dtype is not None:
        target = parse_dtype(dtype)
    else:
        target = model.get_input_embeddings().weight.dtype
    if target not in (torch.float32, torch.bfloat16, torch.float16):
        raise UnsupportedError(f"merged export dtype {target}: expected float32, bfloat16 or float16")
    return target


def merged_weights(model, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The plain state dict under checkpoint names, adapters merged, each tied tensor once (first name kept)."""
    from ..lora import merged_state_dict
    state = merged_state_dict(model, dtype)
    for name in tied_duplicates(model):
        state.pop(name, None)
    return state


def tied_duplicates(model) -> list[str]:
    """State-dict names that share storage with an earlier one (a tied lm_head): checkpoints store it once."""
    seen, duplicates = set(), []
    for name, tensor in model.state_dict(keep_vars=True).items():
        if tensor.device.type == "meta" or tensor.numel() == 0:
            continue
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape), tensor.dtype)
        if key in seen:
            duplicates.append(name)
        seen.add(key)
    return duplicates


def write_config(model, out_dir: Path, dtype: torch.dtype):
    config = dict(model.args.to_dict())
    config.pop("quantization_config", None)  # the weights are plain now, whatever the source was
    key = "torch_dtype" if "torch_dtype" in config and "dtype" not in config else "dtype"
    config[key] = str(dtype).replace("torch.", "")
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")


def write_generation_config(model, tokenizer, out_dir: Path, adapter_dir=None):
    """The adapter's generation_config.json, else the source's, when one has it; else one naming BOS, PAD and
    every id that ends a reply (EOS and the chat template's end-of-turn token), so that generation stops where
    the model does."""
    for source in (adapter_dir, model.source_dir):
        if source is not None and (Path(source) / GENERATION_CONFIG).is_file():
            shutil.copy2(Path(source) / GENERATION_CONFIG, out_dir / GENERATION_CONFIG)
            return
    config = default_generation_config(model, tokenizer)
    (out_dir / GENERATION_CONFIG).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")


def default_generation_config(model, tokenizer) -> dict:
    from ..infer.defaults import eos_token_ids
    from .gguf_vocab import end_of_turn_id
    eos = eos_token_ids(model, tokenizer, generation_config={})
    if tokenizer is not None and end_of_turn_id(tokenizer) is not None:
        eos = list(dict.fromkeys(eos + [end_of_turn_id(tokenizer)]))
    args = model.args
    config = {"bos_token_id": getattr(tokenizer, "bos_token_id", None) if tokenizer is not None
              else args.bos_token_id,
              "eos_token_id": eos[0] if len(eos) == 1 else (eos or None),
              "pad_token_id": getattr(tokenizer, "pad_token_id", None) if tokenizer is not None
              else args.pad_token_id}
    return {k: v for k, v in config.items() if v is not None}


def write_tokenizer(model, tokenizer, out_dir: Path):
    """The tokenizer (with its chat template) as transformers saves it; without one, the source's files."""
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out_dir))
        return
    source = model.source_dir
    for name in TOKENIZER_FILES if source is not None else ():
        if (source / name).is_file():
            shutil.copy2(source / name, out_dir / name)


def export_adapter(model, out, overwrite: bool = False, tokenizer=None) -> Path:
    """The LoRA adapter in PEFT's format (adapter_config.json + adapter_model.safetensors), with the tokenizer's
    files beside it when one is given, so that its chat template travels with the adapter."""
    from ..lora.peft_io import save_adapter
    out = Path(out)
    check_output(out, overwrite)
    return save_adapter(model, out, overwrite=overwrite, tokenizer=tokenizer)
