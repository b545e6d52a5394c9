"""What every family's loader and saver share: checking a checkpoint's tensors (names and shapes, from the headers)
against the model before any data is read, and writing a checkpoint directory (config, safetensors, the files that
travel beside the weights, the tokenizer) atomically."""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import torch

from ..errors import CheckpointError
from . import checkpoint as ckpt
from .dtypes import parse_dtype

log = logging.getLogger("velotune")


def tensors_to_load(model, shapes: dict, model_dir: Path, *, skipped=lambda name: False) -> set[str]:
    """The names of `model`'s state the checkpoint must give, checked against `shapes` (our name -> (shape, file),
    from the headers): every needed tensor is there with its shape; `skipped(name)` marks tensors the file may
    leave out (a tied head, derived tables). Tensors the model does not use are reported and ignored."""
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    needed = {name for name in expected if not skipped(name)}
    for name, (shape, file) in shapes.items():
        if name in needed and tuple(shape) != expected[name]:
            raise CheckpointError(f"{file}: tensor '{name}' has shape {list(shape)} but config.json implies "
                                  f"{list(expected[name])} (does the config belong to these weights?)")
    missing = sorted(needed - set(shapes))
    if missing:
        shown = ", ".join(f"'{m}'" for m in missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise CheckpointError(f"{model_dir}: tensor {shown} missing from the checkpoint")
    unused = sorted(set(shapes) - set(expected))
    if unused:
        log.warning("%s: ignoring %d tensor(s) the model does not use, e.g. %s", model_dir, len(unused), unused[0])
    return needed


def cast_state(state: dict, dtype) -> dict:
    """Floating tensors in `dtype` (None: as they are)."""
    if dtype is None:
        return state
    target = parse_dtype(dtype) if not isinstance(dtype, torch.dtype) else dtype
    return {k: v.to(target) if v.is_floating_point() else v for k, v in state.items()}


def write_model_dir(out_dir, state: dict, config: dict, *, source_dir=None, side_files=(), tokenizer=None,
                    overwrite: bool = False, max_shard_bytes: int = ckpt.DEFAULT_SHARD_BYTES) -> Path:
    """config.json, the safetensors (sharded above max_shard_bytes), `side_files` copied from `source_dir` where it
    has them, and the tokenizer's files, written into `out_dir` at once (an overwrite replaces only files velotune
    wrote there)."""
    out_dir = Path(out_dir)
    with ckpt.atomic_dir(out_dir, overwrite=overwrite) as tmp:
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        ckpt.save_safetensors(state, tmp, max_shard_bytes)
        for name in side_files:
            if source_dir is not None and (Path(source_dir) / name).is_file():
                shutil.copy2(Path(source_dir) / name, tmp / name)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
    return out_dir


def dtype_name(state: dict) -> str:
    """The dtype of a state's first tensor as config.json writes it ("bfloat16")."""
    return str(next(iter(state.values())).dtype).replace("torch.", "")


__all__ = ["cast_state", "dtype_name", "tensors_to_load", "write_model_dir"]
