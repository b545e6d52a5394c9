"""Inference: KV cache, sampling, generation defaults, and `generate` / `stream` / `generate_batch`.

Names are imported on first use, so that building the `velotune` command's parser (which imports the serve
command's options from this package) does not load torch. (The functions `generate` and `stream` live in
generation.py: no submodule shares a name with a function.)"""
from importlib import import_module

_API = {
    "KVCache": "cache", "SamplingParams": "sampling",
    "resolve_sampling": "defaults", "eos_token_ids": "defaults", "read_generation_config": "defaults",
    **{name: "generation" for name in ("generate", "stream", "generate_batch", "stream_batch", "generate_ids",
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
