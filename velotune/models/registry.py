"""model_type (from config.json) -> our architecture module. Types not listed take the generic path."""
from __future__ import annotations

from importlib import import_module

ARCHITECTURES = {
    "llama": "velotune.models.llama",
    "mistral": "velotune.models.mistral",
    "qwen2": "velotune.models.qwen2",
    "qwen3": "velotune.models.qwen3",
    "gemma": "velotune.models.gemma",
    "gemma2": "velotune.models.gemma2",
    "phi3": "velotune.models.phi3",
}


def supported_model_types() -> list[str]:
    return sorted(t for t in ARCHITECTURES if _importable(t))


def architecture(model_type: str):
    """The module for `model_type` (with `Args` and `Model`), or None if we have no file for it."""
    if not _importable(model_type):
        return None
    return import_module(ARCHITECTURES[model_type])


def _importable(model_type: str) -> bool:
    name = ARCHITECTURES.get(model_type)
    if name is None:
        return False
    try:
        import_module(name)
    except ModuleNotFoundError as exc:
        if exc.name == name:  # the file is not written yet
            return False
        raise
    return True
