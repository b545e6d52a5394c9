"""velotune: fine-tune and run open LLMs fast and lean.

The public API is imported lazily so that `import velotune` (and `velotune --help`) stay cheap:
torch and transformers load only when a function that needs them is first used.
"""
from importlib import import_module

__version__ = "0.1.0"

# public name -> "module:attribute"
_API = {
    "load": "velotune.models.loader:load",
    "save": "velotune.models.loader:save",
    "add_lora": "velotune.lora:add_lora",
    "merge_lora": "velotune.lora:merge_lora",
    "unmerge_lora": "velotune.lora:unmerge_lora",
    "save_adapter": "velotune.lora:save_adapter",
    "load_adapter": "velotune.lora:load_adapter",
    "train": "velotune.training.trainer:train",
    "plan_run": "velotune.training.plan:plan_run",
    "Objective": "velotune.training.objectives:Objective",
    "LanguageModel": "velotune.models.interface:LanguageModel",
    "register_objective": "velotune.training.objectives:register_objective",
    "TrainEvent": "velotune.training.callbacks:TrainEvent",
    "TrainConfig": "velotune.config:TrainConfig",
    "load_config": "velotune.config:load_config",
    "generate": "velotune.infer.generation:generate",
    "stream": "velotune.infer.generation:stream",
    "export": "velotune.exporting:export",
    "load_embedder": "velotune.embeddings.st_format:load_sentence_model",
    "save_embedder": "velotune.embeddings.st_format:save_sentence_model",
    "embed": "velotune.embeddings:embed",
    "SentenceEncoder": "velotune.embeddings.model:SentenceEncoder",
    "VelotuneError": "velotune.errors:VelotuneError",
    "ConfigError": "velotune.errors:ConfigError",
}

__all__ = sorted(_API) + ["__version__"]


def __getattr__(name):
    target = _API.get(name)
    if target is None:
        raise AttributeError(f"module 'velotune' has no attribute {name!r}")
    module_name, attr = target.split(":")
    value = getattr(import_module(module_name), attr)
    globals()[name] = value
    return value


def __dir__():
    return __all__
