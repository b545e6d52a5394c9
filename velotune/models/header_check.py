"""config.json (and adapter_config.json) checked against the weights' safetensors headers - tensor names and
shapes, no tensor data - before any module is built or any memory allocated: a tampered or mismatched config
(`num_hidden_layers: 1000000`, `vocab_size: 10**9`) is a one-line error instead of gigabytes of allocation.
Also the one cheap finiteness check each weight gets as it is loaded."""
from __future__ import annotations

import logging
import re
from pathlib import Path

import torch

from ..errors import CheckpointError
from .safetensors_reader import read_header

log = logging.getLogger("velotune")

# The first numbered segment of a tensor name: `model.layers.12.mlp...` -> ("model.layers", 12).
_INDEXED = re.compile(r"^(.*?)\.(\d+)\.")
# Size fields of config.json (under transformers' names, old and new) that must be positive integers when given.
SIZE_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
               "num_key_value_heads", "head_dim", "max_position_embeddings", "n_layer", "n_embd", "n_head",
               "n_positions", "n_ctx", "n_inner", "num_layers", "d_model", "ffn_dim")


def header_shapes(files: list[Path]) -> dict[str, tuple[tuple[int, ...], Path]]:
    """Tensor name -> (shape, file) from safetensors headers (checked as the reader checks them: offsets inside the
    file, the bytes each shape needs); no tensor data is read."""
    shapes = {}
    for file in files:
        try:
            with open(file, "rb", buffering=0) as handle:
                entries, _ = read_header(file, handle)
        except (CheckpointError, OSError) as exc:
            size = file.stat().st_size if file.exists() else 0
            detail = str(exc).removeprefix(f"{file}: ")
            raise CheckpointError(f"{file}: cannot read safetensors ({size} bytes; truncated or corrupt?): "
                                  f"{detail}") from None
        for name, (_, shape, _, _) in entries.items():
            shapes[name] = (tuple(shape), file)
    return shapes


def block_count(names) -> int:
    """Blocks in the longest numbered module list (`model.layers.N`, `transformer.h.N`) the tensor names show."""
    counts: dict[str, int] = {}
    for name in names:
        match = _INDEXED.match(name)
        if match:
            counts[match[1]] = max(counts.get(match[1], 0), int(match[2]) + 1)
    return max(counts.values(), default=0)


def check_positive_sizes(config: dict, source):
    """Every size field in config.json (and its text_config) that is given must be a positive integer."""
    sub = config.get("text_config")
    for section in (config, sub if isinstance(sub, dict) else {}):
        for key in SIZE_FIELDS:
            value = section.get(key)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value <= 0):
                raise CheckpointError(f"{source}: field '{key}' must be a positive integer, got {value!r}")


def check_layer_count(layers, shapes: dict, source):
    """The config may not ask for more blocks than the weights hold (fewer: the extra tensors are reported)."""
    held = block_count(shapes)
    if isinstance(layers, int) and layers > held:
        raise CheckpointError(f"{source}: num_hidden_layers is {layers} but {_files_text(shapes)} holds {held} "
                              "layers (does the config belong to these weights?)")


def check_native(args, shapes: dict, source, model_dir: Path):
    """Our architectures' sizes against the tensors that carry them, before the model is built: vocabulary and
    hidden size (embeddings), heads x head_dim (attention of block 0), intermediate size (MLP). The layer count
    is checked before the Args are made (check_layer_count)."""
    heads, kv, head_dim, hidden = args.num_attention_heads, args.num_key_value_heads, args.head_dim, args.hidden_size
    attn, mlp = "model.layers.0.self_attn.", "model.layers.0.mlp."
    expectations = [
        ("model.embed_tokens.weight", (args.vocab_size, hidden), ("vocab_size", "hidden_size")),
        (attn + "q_proj.weight", (heads * head_dim, hidden), ("num_attention_heads", "head_dim")),
        (attn + "k_proj.weight", (kv * head_dim, hidden), ("num_key_value_heads", "head_dim")),
        (attn + "qkv_proj.weight", ((heads + 2 * kv) * head_dim, hidden),
         ("num_attention_heads", "num_key_value_heads", "head_dim")),
        (mlp + "down_proj.weight", (hidden, args.intermediate_size), ("hidden_size", "intermediate_size")),
    ]
    for name, expected, fields in expectations:
        if name not in shapes:
            continue
        shape, file = shapes[name]
        if shape != expected:
            values = ", ".join(f"{f} {getattr(args, f)}" for f in fields)
            raise CheckpointError(f"{file}: tensor '{name}' has shape {list(shape)} but config.json implies "
                                  f"{list(expected)} ({values}; does the config belong to these weights?)")
    # A mixture-of-experts layer 0 has experts, not one MLP (its family checks those tensors itself).
    needed = ["model.embed_tokens.weight"] + ([mlp + "down_proj.weight"] if args.has_dense_mlp(0) else [])
    if attn + "qkv_proj.weight" not in shapes:
        needed.append(attn + "q_proj.weight")
    missing = [name for name in needed if name not in shapes]
    if missing:
        raise CheckpointError(f"{model_dir}: weights missing from the checkpoint: {', '.join(missing)}")


def check_generic(text_config, shapes: dict, source):
    """A transformers config against the weights, architecture-blind: no more layers than the numbered blocks
    the names show, and the vocabulary and hidden sizes must each be a dimension of some tensor."""
    check_layer_count(getattr(text_config, "num_hidden_layers", None), shapes, source)
    dims = {d for shape, _ in shapes.values() for d in shape}
    for name in ("vocab_size", "hidden_size"):
        value = getattr(text_config, name, None)
        if isinstance(value, int) and value not in dims:
            raise CheckpointError(f"{source}: {name} {value} is no dimension of any tensor in "
                                  f"{_files_text(shapes)} (does the config belong to these weights?)")


def warn_if_not_finite(name: str, tensor: torch.Tensor, where):
    """One warning for a floating-point tensor holding NaN or inf. The common case costs one sum (a NaN or inf
    makes it non-finite); only then are the bad values counted, which also rules out a mere overflow of the sum."""
    if not tensor.is_floating_point() or bool(torch.isfinite(tensor.sum())):
        return
    bad = int((~torch.isfinite(tensor)).sum())
    if bad:
        log.warning("%s: tensor '%s' holds %d non-finite values (NaN or inf) of %d", where, name, bad,
                    tensor.numel())


def _files_text(shapes: dict) -> str:
    files = sorted({str(file) for _, file in shapes.values()})
    if len(files) == 1:
        return files[0]
    return f"the {len(files)} safetensors files in {Path(files[0]).parent}" if files else "the weights"
