"""Training objectives: each owns records -> examples -> batches -> loss, the loop stays one loop (base.py).

    objective: sft        # in the config (default); or vt.train(cfg, objective=MyObjective())
    register_objective("mine", MyObjective)   # then objective: mine
"""
from __future__ import annotations

from ...errors import ConfigError
from .base import Objective, RunContext, loss_terms, unit_counts
from .embedding import CoSENT, Contrastive, EmbeddingObjective, Triplet
from .grpo import GRPO
from .kto import KTO
from .preference import DPO, ORPO, Preference, SimPO
from .sft import SFT, Pretrain
from .speech import SpeechRecognition
from .tts import TextToSpeech
from .vision import VisionSFT

_REGISTRY: dict[str, type] = {"sft": SFT, "pretrain": Pretrain, "dpo": DPO, "orpo": ORPO, "simpo": SimPO, "kto": KTO,
                               "grpo": GRPO, "contrastive": Contrastive, "mnrl": Contrastive, "triplet": Triplet,
                               "cosent": CoSENT, "asr": SpeechRecognition, "speech-recognition": SpeechRecognition}


_REGISTRY["tts"] = TextToSpeech
_REGISTRY["vision"] = VisionSFT


def register_objective(name: str, factory) -> None:
    """Makes `objective: name` in a config build `factory()` (an Objective subclass or a function)."""
    if not name or not isinstance(name, str):
        raise ValueError("an objective's name must be a non-empty string")
    _REGISTRY[name] = factory


def for_model_dir(objective: Objective, model_dir) -> Objective:
    """The objective that trains the model in `model_dir`: plain SFT of a vision-language checkpoint is the vision
    objective (images in the conversations); anything else as given."""
    if type(objective) is not SFT or model_dir is None:
        return objective
    from pathlib import Path

    from ...models.checkpoint import read_config
    from ...models.vision.files import is_vision_config
    if (Path(model_dir) / "config.json").is_file() and is_vision_config(read_config(Path(model_dir))):
        return VisionSFT()
    return objective


def objective_names() -> list[str]:
    return sorted(_REGISTRY)


def make_objective(spec) -> Objective:
    """The objective a config names (or the Objective instance given)."""
    if isinstance(spec, Objective):
        return spec
    factory = _REGISTRY.get(spec)
    if factory is None:
        import difflib
        close = difflib.get_close_matches(str(spec), list(_REGISTRY), n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise ConfigError(f"objective: unknown objective {spec!r}{hint}; known: {', '.join(objective_names())}")
    objective = factory()
    if not isinstance(objective, Objective):
        raise ConfigError(f"objective {spec!r}: its factory made a {type(objective).__name__}, not an Objective")
    return objective


__all__ = ["CoSENT", "Contrastive", "DPO", "EmbeddingObjective", "GRPO", "Triplet", "KTO", "ORPO", "Objective", "Preference", "Pretrain", "SimPO", "RunContext", "SFT", "loss_terms", "make_objective", "objective_names",
           "register_objective", "unit_counts"]
