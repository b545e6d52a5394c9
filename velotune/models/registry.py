"""(model_type from config.json, task) -> our architecture module. A model_type with no module for the task takes
the generic path (causal LMs only). Tasks: "causal-lm", "encoder"; encoder-decoders will register under their own."""
from __future__ import annotations

from importlib import import_module

CAUSAL_LM = "causal-lm"
ENCODER = "encoder"   # bidirectional encoders (BERT, RoBERTa, ModernBERT): hidden states, pooled by velotune.embeddings
SPEECH_SEQ2SEQ = "speech-seq2seq"   # speech-to-text encoder-decoders (Whisper)
IMAGE_TEXT = "image-text-to-text"   # decoders that read images (LLaVA, Qwen2-VL, Idefics3 / SmolVLM)

ARCHITECTURES = {
    ("llama", CAUSAL_LM): "velotune.models.llama",
    ("mistral", CAUSAL_LM): "velotune.models.mistral",
    ("qwen2", CAUSAL_LM): "velotune.models.qwen2",
    ("qwen3", CAUSAL_LM): "velotune.models.qwen3",
    ("gemma", CAUSAL_LM): "velotune.models.gemma",
    ("gemma2", CAUSAL_LM): "velotune.models.gemma2",
    ("phi3", CAUSAL_LM): "velotune.models.phi3",
    ("gemma3_text", CAUSAL_LM): "velotune.models.gemma3",
    ("olmo2", CAUSAL_LM): "velotune.models.olmo2",
    ("granite", CAUSAL_LM): "velotune.models.granite",
    ("mixtral", CAUSAL_LM): "velotune.models.mixtral",
    ("qwen3_moe", CAUSAL_LM): "velotune.models.qwen3_moe",
    ("gpt_oss", CAUSAL_LM): "velotune.models.gpt_oss",
    ("bert", ENCODER): "velotune.models.encoders.bert",
    ("roberta", ENCODER): "velotune.models.encoders.roberta",
    ("xlm-roberta", ENCODER): "velotune.models.encoders.roberta",
    ("modernbert", ENCODER): "velotune.models.encoders.modernbert",
    ("whisper", SPEECH_SEQ2SEQ): "velotune.models.whisper",
    ("llava", IMAGE_TEXT): "velotune.models.vision.llava",
    ("qwen2_vl", IMAGE_TEXT): "velotune.models.vision.qwen2_vl",
    ("qwen2_5_vl", IMAGE_TEXT): "velotune.models.vision.qwen2_vl",
    ("idefics3", IMAGE_TEXT): "velotune.models.vision.idefics3",
    ("gemma3", IMAGE_TEXT): "velotune.models.vision.gemma3",
    ("smolvlm", IMAGE_TEXT): "velotune.models.vision.idefics3",
}


def supported_model_types(task: str = CAUSAL_LM) -> list[str]:
    return sorted(model_type for model_type, kind in ARCHITECTURES if kind == task and _importable(model_type, task))


def architecture(model_type: str, task: str = CAUSAL_LM):
    """The module for (`model_type`, `task`) (with `Args` and `Model`), or None if we have no file for it."""
    if not _importable(model_type, task):
        return None
    return import_module(ARCHITECTURES[model_type, task])


def _importable(model_type: str, task: str) -> bool:
    name = ARCHITECTURES.get((model_type, task))
    if name is None:
        return False
    try:
        import_module(name)
    except ModuleNotFoundError as exc:
        if exc.name == name:  # the file is not written yet
            return False
        raise
    return True
