"""Several LoRA adapters over one base model, none of them merged.

Each adapter is loaded once (`load_adapter`), and the LoRA layers it built are kept aside; they wrap the very
same base layers, so the base weights exist once however many adapters there are. Activating an adapter puts
its layers (and its `modules_to_save` copies) into the model's module tree, and puts the base layers back
where the previous adapter had its own: a few `setattr`s, no tensor copies, and adapters may differ in rank,
alpha, targets or DoRA. The model then computes with exactly one adapter (or none) at a time, so requests for
different adapters run one group after another (the server's worker owns the model; see server_queue.py).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..errors import ConfigError


@dataclass
class Adapter:
    name: str
    path: Path
    modules: dict = field(default_factory=dict)   # module name -> the module to put there when active
    settings: object = None                      # the LoraSettings the adapter was loaded with


class AdapterSet:
    """Adapters by name over `model`; `activate(name)` (None = the base alone) switches between them."""

    def __init__(self, model: nn.Module):
        from ..lora import lora_layers
        if lora_layers(model):
            raise ConfigError("the base model already carries LoRA layers: serve adapters over a plain base")
        self.model = model
        self.adapters: dict[str, Adapter] = {}
        self.base_modules: dict[str, nn.Module] = {}   # module name -> the base's own module there
        self.active: str | None = None

    def names(self) -> list[str]:
        return list(self.adapters)

    def add(self, name: str, adapter_dir) -> Adapter:
        """Loads a PEFT-format adapter directory under `name`; the model is left with the base active."""
        from ..lora import load_adapter, lora_layers, read_adapter_config, remove_lora
        from ..lora.peft_io import settings_from_config
        if name in self.adapters:
            raise ConfigError(f"adapter name {name!r} is given twice")
        path = Path(adapter_dir)
        self.activate(None)
        kwargs = settings_from_config(read_adapter_config(path), path)
        saved = self._module_names(kwargs.get("modules_to_save") or [])
        # load_adapter copies modules_to_save weights into the base's modules in place: keep the base values.
        originals = {n: [p.detach().clone() for p in self.model.get_submodule(n).parameters()] for n in saved}
        load_adapter(self.model, path, trainable=False)
        adapter = Adapter(name, path, settings=self.model.lora_settings)
        for module_name, layer in lora_layers(self.model).items():
            adapter.modules[module_name] = layer
            self.base_modules.setdefault(module_name, layer.base_layer)
        for module_name in saved:
            adapter.modules[module_name] = copy.deepcopy(self.model.get_submodule(module_name))
            self.base_modules.setdefault(module_name, self.model.get_submodule(module_name))
        remove_lora(self.model)
        with torch.no_grad():
            for module_name, values in originals.items():
                for p, value in zip(self.model.get_submodule(module_name).parameters(), values):
                    p.copy_(value)
        self.adapters[name] = adapter
        return adapter

    def activate(self, name: str | None):
        """Makes `name` the adapter the model computes with (None: the base alone)."""
        if name == self.active:
            return
        if name is not None and name not in self.adapters:
            raise KeyError(name)
        from ..lora.inject import set_submodule
        if self.active is not None:
            for module_name in self.adapters[self.active].modules:
                set_submodule(self.model, module_name, self.base_modules[module_name])
        if name is not None:
            for module_name, module in self.adapters[name].modules.items():
                set_submodule(self.model, module_name, module)
        self.active = name

    def _module_names(self, suffixes) -> list[str]:
        from ..lora.inject import name_matches
        suffixes = [suffixes] if isinstance(suffixes, str) else list(suffixes)
        return [n for n, _ in self.model.named_modules() if n and any(name_matches(n, s) for s in suffixes)]
