"""LoRA, rsLoRA and DoRA adapters over plain, NF4 and int8 bases: inject, merge / unmerge, PEFT-format files.

    vt.add_lora(model, r=16, alpha=16, targets="all-linear")   # wraps linears in place, freezes the rest
    vt.save_adapter(model, "dir"); vt.load_adapter(model, "dir")   # PEFT's adapter_config.json + safetensors
    vt.merge_lora(model); vt.unmerge_lora(model)                     # fold in / take out, in place
    with adapters_disabled(model): ...                               # the base alone (a reference model)
    merged_state_dict(model, dtype)                                  # plain checkpoint tensors, for export
"""
from .inject import (ALL_LINEAR, LoraSettings, adapters_disabled, add_lora, linear_names, lora_layers, lora_parameter_count,
                     parameter_summary, remove_lora, resolve_targets, trainable_parameters)
from .conv import LoraConv
from .embedding import LoraEmbedding
from .layers import LoraLinear
from .merge import merge_and_unload, merge_lora, merged_state_dict, unmerge_lora
from .peft_io import adapter_config, adapter_state_dict, load_adapter, read_adapter_config, save_adapter

__all__ = ["ALL_LINEAR", "LoraConv", "LoraEmbedding", "LoraLinear", "LoraSettings", "adapters_disabled", "add_lora", "adapter_config", "adapter_state_dict",
           "linear_names", "load_adapter", "lora_layers", "lora_parameter_count", "merge_and_unload", "merge_lora",
           "merged_state_dict", "parameter_summary", "read_adapter_config", "remove_lora", "resolve_targets",
           "save_adapter", "trainable_parameters", "unmerge_lora"]
