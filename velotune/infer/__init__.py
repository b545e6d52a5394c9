"""Inference: KV cache, sampling, generation defaults, and `generate` / `stream` / `generate_batch`.

Names are imported on first use, so that building the `velotune` command's parser (which imports the serve
command's options from this package) does not load torch."""
import sys
import types
from importlib import import_module

_API = {
    "KVCache": "cache", "SamplingParams": "sampling",
    "resolve_sampling": "defaults", "eos_token_ids": "defaults", "read_generation_config": "defaults",
    **{name: "generate" for name in ("generate", "stream", "generate_batch", "stream_batch", "generate_ids",
                                     "Decoder", "TextGeneration", "GenerationOutput", "Completion", "TextEvent")},
}

__all__ = list(_API)


def __getattr__(name):
    module = _API.get(name)
    if module is None:
        raise AttributeError(f"module 'velotune.infer' has no attribute {name!r}")
    value = getattr(import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__():
    return __all__


class _Package(types.ModuleType):
    def __setattr__(self, name, value):
        # Importing the submodule `generate` binds it on the package; the public name is the function.
        if name in _API and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
