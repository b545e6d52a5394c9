"""Folding adapters into the base weights: reversibly in place (`merge_lora` / `unmerge_lora`), for good
(`merge_and_unload`), or into a fresh plain state dict for export (`merged_state_dict`).

Merging computes W + scaling*B@A (DoRA: times m/||W + scaling*B@A||_row) in fp32 and casts once. A quantized
(NF4 / int8) base is dequantized into a plain Linear in its compute dtype and never re-quantized: re-quantizing
would round the merged weight a second time, and the merged model would no longer match the adapter's outputs.
LoRA on fused expert parameters (param_lora.py) adds each expert's delta into its slice of the fused tensor.
"""
from __future__ import annotations

import torch
from torch import nn

from ..models.quantize import compute_dtype_of, dequantize_weight, is_quantized_linear
from ..models.quantized_experts import QuantizedExperts, is_quantized_experts
from .inject import lora_layers, remove_lora
from ..errors import UnsupportedError
from .embedding import LoraEmbedding
from .layers import LoraLinear
from .param_lora import LoraExperts


def check_mergeable(model: nn.Module) -> None:
    """UnsupportedError when an adapter cannot fold into its weight without changing another layer: LoRA on a token
    embedding table that the output head shares (the merged table would also be the head)."""
    for name, layer in lora_layers(model).items():
        if isinstance(layer, LoraEmbedding):
            table = layer.base_layer.weight
            sharing = [n for n, m in model.named_modules()
                       if m is not layer.base_layer and m is not layer and getattr(m, "weight", None) is table]
            if sharing:
                raise UnsupportedError(f"LoRA on {name} cannot be merged: {sharing[0]} shares its weight (tied "
                                       "embeddings), so the merged table would change the output head too. Use the "
                                       "adapter unmerged, or train without embed_tokens among the LoRA targets")


def merge_lora(model: nn.Module) -> nn.Module:
    """Folds every adapter into its base weight, in place; forward then costs what the base model costs.
    `unmerge_lora` takes them out again (see `LoraLinear.merge` for what happens to quantized bases)."""
    check_mergeable(model)
    for layer in lora_layers(model).values():
        layer.merge()
    return model


def unmerge_lora(model: nn.Module) -> nn.Module:
    for layer in lora_layers(model).values():
        layer.unmerge()
    return model


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Replaces each LoRA layer by a plain Linear holding its merged weight: a model without LoRA, in place.
    Quantized layers that carry no adapter stay quantized."""
    check_mergeable(model)
    return remove_lora(model, merge=True)


@torch.no_grad()
def merged_state_dict(model: nn.Module, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The state dict of the equivalent plain model under the base checkpoint's names (`...q_proj.weight`):
    adapters merged, quantized weights dequantized (to `dtype`, else their compute dtype), LoRA and
    quantization-state entries gone. Floating tensors are cast to `dtype` when given. The model is not changed."""
    check_mergeable(model)
    replaced = {}  # module name -> {"weight": ..., "bias": ...}, or a fused-experts module's parameters
    for name, module in model.named_modules():
        if name.endswith(".base_layer") and name[: -len(".base_layer")] in replaced:
            continue
        if isinstance(module, LoraExperts):
            replaced[name] = module.merged_params(dtype)
        elif isinstance(module, LoraLinear):  # linears, convolutions, the embedding table (which has no bias)
            replaced[name] = {"weight": module.merged_weight(dtype), "bias": getattr(module.base_layer, "bias", None)}
        elif is_quantized_linear(module):
            replaced[name] = {"weight": dequantize_weight(module, dtype or compute_dtype_of(module)),
                              "bias": module.bias}
        elif is_quantized_experts(module):   # NF4 fused experts without LoRA: the four plain parameters
            replaced[name] = {k: v.to(dtype or module.compute_dtype) for k, v in module.plain_parameters().items()}
    out = {}
    for key, tensor in model.state_dict().items():
        owner = _owner(key, replaced)
        if owner is None:
            out[key] = tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor
        elif isinstance(model.get_submodule(owner), (LoraExperts, QuantizedExperts)):
            out.update({f"{owner}.{k}": v for k, v in replaced[owner].items()})
        elif f"{owner}.weight" not in out:
            parts = replaced[owner]
            out[f"{owner}.weight"] = parts["weight"]
            if parts["bias"] is not None:
                out[f"{owner}.bias"] = parts["bias"].detach().to(dtype or parts["weight"].dtype)
    return out


def _owner(key: str, replaced: dict) -> str | None:
    """The replaced module a state-dict key belongs to (quantization state hangs several levels below it)."""
    parts = key.split(".")
    for i in range(len(parts) - 1, 0, -1):
        prefix = ".".join(parts[:i])
        if prefix in replaced:
            return prefix
    return None
