"""Putting LoRA layers into a model (ours or a plain transformers one: the module names are the same), choosing
the targets, freezing the rest, and counting parameters."""
from __future__ import annotations

import re
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import ConfigError
from ..models.interface import VelotuneModel
from ..models.quantize import output_head_names, router_names
from . import param_lora
from . import conv, embedding
from .conv import LoraConv
from .embedding import LoraEmbedding
from .layers import LoraLinear
from .param_lora import LoraExperts

ALL_LINEAR = "all-linear"


@dataclass
class LoraSettings:
    """What `add_lora` was asked for, with the targets resolved to module names; kept on a velotune model as
    `model.lora_settings` (models/interface.py) and written to adapter_config.json."""
    r: int
    alpha: float
    dropout: float = 0.0
    rslora: bool = False
    dora: bool = False
    targets: list[str] = field(default_factory=list)          # full module names that carry a LoRA layer, and
    #                                                           full names of adapted fused expert parameters
    modules_to_save: list[str] = field(default_factory=list)  # full module names trained as a whole
    dtype: torch.dtype = torch.float32


def lora_layers(model: nn.Module) -> dict[str, LoraLinear | LoraExperts]:
    """The LoRA layers by module name: wrapped linears, and wrapped fused-experts modules (param_lora.py)."""
    return {name: m for name, m in model.named_modules() if isinstance(m, (LoraLinear, LoraExperts))}


def add_lora(model: nn.Module, r: int = 16, alpha: float = 16, dropout: float = 0.0, targets=ALL_LINEAR,
             rslora: bool = False, dora: bool = False, modules_to_save=None, seed: int | None = None,
             dtype: torch.dtype = torch.float32) -> nn.Module:
    """Wraps the target linears (plain, NF4 or int8) in LoRA layers, in place, and freezes everything else.

    targets: "all-linear" (every linear but the output head, as PEFT) or module-name suffixes such as
    ["q_proj", "v_proj"] (a string with regex characters is matched against whole names, as PEFT does). Fused
    expert parameters (gpt-oss's `gate_up_proj` / `down_proj`) count as linears here: "all-linear" adapts them,
    and their names select them (PEFT's target_parameters; param_lora.py). Convolutions (a patch embedding,
    Whisper's front end) and the token embedding table (`embed_tokens`) are adapted when a name or regex selects
    them, as PEFT does (lora/conv.py, lora/embedding.py).
    modules_to_save: suffixes of modules trained in full (e.g. ["lm_head"]); saved in the adapter file.
    dtype: the adapters' parameter dtype (fp32 by default, as PEFT); they compute in the activation dtype.
    """
    root = _adapter_root(model)
    if root is not model:  # a wrapper (a sentence embedder) adapts its backbone, under the backbone's names
        add_lora(root, r, alpha, dropout, targets, rslora, dora, modules_to_save, seed, dtype)
        return model
    check_hyperparameters(r, alpha, dropout)
    if lora_layers(model):
        raise ConfigError("this model already carries LoRA adapters; velotune.load_adapter(model, dir) replaces "
                          "their weights, or velotune.lora.merge_and_unload(model) folds them in before adding new ones")
    names = resolve_targets(model, targets)
    fused = [n for n in names if n in set(param_lora.fused_param_names(model))]
    param_lora.check_settings(fused, dropout, dora)
    keep = _resolve_modules_to_save(model, modules_to_save or [], names)
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    model.requires_grad_(False)
    convs, tables = set(conv_names(model)), set(embedding_names(model))
    for name in names:
        if name in convs:
            conv.check_adaptable(name, model.get_submodule(name), dora)
        elif name in tables:
            embedding.check_adaptable(name, model.get_submodule(name), dora)
    for name in names:
        if name in convs or name in tables:
            base = model.get_submodule(name)
            layer = (LoraConv(base, r, alpha, dropout, rslora, dtype) if name in convs
                     else LoraEmbedding(base, r, alpha, rslora, dtype))
            layer.reset_parameters(generator)
            set_submodule(model, name, layer)
        elif name not in fused:
            layer = LoraLinear(model.get_submodule(name), r, alpha, dropout, rslora, dora, dtype)
            layer.reset_parameters(generator)
            set_submodule(model, name, layer)
    for name, params in param_lora.group_targets(fused).items():
        layer = LoraExperts(model.get_submodule(name), params, r, alpha, rslora, dtype)
        layer.reset_parameters(generator)
        set_submodule(model, name, layer)
    for name in keep:
        model.get_submodule(name).requires_grad_(True)
    if isinstance(model, VelotuneModel):  # a plain transformers model or a bare layer gets the layers alone
        model.lora_settings = LoraSettings(r, alpha, dropout, rslora, dora, names, keep, dtype)
    return model


def _adapter_root(model: nn.Module) -> nn.Module:
    return model.adapter_root() if isinstance(model, VelotuneModel) else model


def check_hyperparameters(r, alpha, dropout):
    """Rank, alpha and dropout as add_lora needs them; ConfigError naming the one at fault."""
    if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
        raise ConfigError(f"lora r (rank) must be a positive integer, got {r!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or alpha <= 0:
        raise ConfigError(f"lora alpha must be a positive number, got {alpha!r}")
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
        raise ConfigError(f"lora dropout must be in [0, 1), got {dropout!r}")


def name_matches(name: str, pattern: str) -> bool:
    return name == pattern or name.endswith("." + pattern)


def linear_names(model: nn.Module) -> list[str]:
    """Names of the model's linear layers, a LoRA-wrapped one under its own name (not its inner pieces)."""
    inside = tuple(f"{n}." for n in lora_layers(model))
    return [n for n, m in model.named_modules() if isinstance(m, LoraLinear)
            or (isinstance(m, nn.Linear) and not n.startswith(inside))]


def conv_names(model: nn.Module) -> list[str]:
    """Names of the model's 1-, 2- and 3-D convolutions (LoRA targets only when named: lora/conv.py)."""
    inside = tuple(f"{n}." for n in lora_layers(model))
    return [n for n, m in model.named_modules() if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d))
            and not n.startswith(inside)]


def embedding_names(model: nn.Module) -> list[str]:
    """The input token embedding table's name, when it is a plain nn.Embedding (lora/embedding.py)."""
    getter = getattr(model, "get_input_embeddings", None)  # a velotune or transformers model; a bare module: none
    table = getter() if callable(getter) else None
    if not isinstance(table, nn.Embedding):
        return []
    return [n for n, m in model.named_modules() if m is table][:1]


def adaptable_names(model: nn.Module) -> list[str]:
    """Linears, convolutions and the token embedding table, in model order: what a name or regex target may
    select."""
    layers = set(linear_names(model)) | set(conv_names(model)) | set(embedding_names(model))
    return [n for n, _ in model.named_modules() if n in layers]


def resolve_targets(model: nn.Module, targets) -> list[str]:
    """Module names to wrap, in model order, then the fused expert parameters chosen (their full names). Every name
    asked for must match at least one linear layer or fused expert parameter. Convolutions are adapted when a
    name or regex selects them, never by "all-linear" (as PEFT)."""
    if targets == ALL_LINEAR:
        linears = linear_names(model) + param_lora.fused_param_names(model)
        kept = output_head_names(model) | router_names(model)  # as PEFT: every linear but the head (and routers)
        names = [n for n in linears if n not in kept]
        if not names:
            raise ConfigError("targets='all-linear': the model has no linear layers besides its output head")
        return names
    linears = adaptable_names(model) + param_lora.fused_param_names(model)
    if isinstance(targets, str) and not re.fullmatch(r"[\w.]+", targets):
        names = [n for n in linears if re.fullmatch(targets, n)]
        if not names:
            raise ConfigError(f"LoRA targets regex {targets!r} matches no linear layer, convolution or token "
                              f"embedding table; this model's: {_available(linears)}")
        return names
    wanted = [targets] if isinstance(targets, str) else list(targets or [])
    if not wanted or not all(isinstance(t, str) and t for t in wanted):
        raise ConfigError(f"LoRA targets must be 'all-linear' or a list of module names, got {targets!r}")
    unmatched = [t for t in wanted if not any(name_matches(n, t) for n in linears)]
    if unmatched:
        raise ConfigError(f"LoRA targets {unmatched} match no linear layer, convolution or token embedding "
                          f"table of this model; its: {_available(linears)}")
    return [n for n in linears if any(name_matches(n, t) for t in wanted)]


def _available(linears: list[str]) -> str:
    return ", ".join(sorted({n.rsplit(".", 1)[-1] for n in linears}))


def _resolve_modules_to_save(model, wanted, targets) -> list[str]:
    if isinstance(wanted, str):
        wanted = [wanted]
    names = [n for n, _ in model.named_modules() if n and any(name_matches(n, w) for w in wanted)]
    unmatched = [w for w in wanted if not any(name_matches(n, w) for n in names)]
    if unmatched:
        raise ConfigError(f"modules_to_save {unmatched} match no module of this model")
    clash = [n for n in names if any(n == t or n.startswith(t + ".") or t.startswith(n + ".") for t in targets)]
    if clash:
        raise ConfigError(f"modules {clash} are both LoRA targets and modules_to_save: choose one")
    return names


def set_submodule(model: nn.Module, name: str, module: nn.Module):
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)


def remove_lora(model: nn.Module, merge: bool = False) -> nn.Module:
    """Takes the LoRA layers out of the model, in place: folded into their bases (merge=True), or dropped, the
    bases returning as they were."""
    root = _adapter_root(model)
    for name, layer in lora_layers(root).items():
        if merge:
            layer.merge()
        else:
            layer.unmerge()
        set_submodule(root, name, layer.base_layer)
    if isinstance(root, VelotuneModel):
        root.lora_settings = None
    return model


# ---- counting ----------------------------------------------------------------------------------
def _numel(param: torch.Tensor) -> int:
    """Logical element count: a packed 4-bit weight holds two values per byte of storage (as PEFT counts)."""
    if type(param).__name__ == "Params4bit":
        return param.numel() * 2 * param.element_size()
    return param.numel()


def lora_parameter_count(model: nn.Module) -> int:
    """Parameters in the LoRA layers' adapters (A, B, DoRA magnitudes), base weights excluded."""
    return sum(p.numel() for layer in lora_layers(model).values()
               for n, p in layer.named_parameters() if not n.startswith("base_layer."))


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts, counted as PEFT's `get_nb_trainable_parameters` counts them. NF4 experts
    held as packed buffers (models/quantized_experts.py) count their weights' logical elements, as a 4-bit linear's
    weight counts."""
    from ..models.quantized_experts import PackedExperts
    trainable = total = 0
    for p in model.parameters():
        n = _numel(p)
        total += n
        trainable += n if p.requires_grad else 0
    for m in model.modules():
        if isinstance(m, PackedExperts):
            total += m.shape.numel()
    return trainable, total


def parameter_summary(model: nn.Module) -> str:
    trainable, total = trainable_parameters(model)
    return f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {100 * trainable / total:.4f}"


@contextmanager
def adapters_disabled(model: nn.Module):
    """Within the block the model computes as its base alone (every LoRA layer skips its adapter): the frozen
    reference of preference and RL training, with no second copy of the model in memory."""
    layers = list(lora_layers(model).values())
    if any(layer.merged for layer in layers):
        raise RuntimeError("the adapters are merged into the base weights: unmerge them to compute the base alone")
    before = [layer.disabled for layer in layers]
    for layer in layers:
        layer.disabled = True
    try:
        yield model
    finally:
        for layer, was in zip(layers, before):
            layer.disabled = was
