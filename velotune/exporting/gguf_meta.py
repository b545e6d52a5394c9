"""The `general.*` keys of a GGUF file: name, file type, quantization version, and the recommended sampling
settings (`general.sampling.*`) taken from the checkpoint's generation_config.json."""
from __future__ import annotations

from ..infer.defaults import from_generation_config, read_generation_config

# our sampling field -> GGUFWriter method that writes the matching general.sampling.* key
SAMPLING_KEYS = {"temperature": "add_sampling_temp", "top_k": "add_sampling_top_k", "top_p": "add_sampling_top_p",
                 "min_p": "add_sampling_min_p", "repetition_penalty": "add_sampling_penalty_repeat"}


def write_general(writer, model, file_type):
    import gguf
    writer.add_type(gguf.GGUFType.MODEL)
    name = model_name(model)
    if name:
        writer.add_name(name)
    writer.add_file_type(int(file_type))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    for key, value in sampling_settings(model).items():
        getattr(writer, SAMPLING_KEYS[key])(int(value) if key == "top_k" else float(value))


def sampling_settings(model) -> dict:
    """The generation_config.json settings that have a general.sampling.* key (do_sample=false: temperature 0)."""
    settings = from_generation_config(read_generation_config(model))
    return {k: v for k, v in settings.items() if k in SAMPLING_KEYS and v is not None}


def model_name(model) -> str | None:
    return model.source_dir.name if model.source_dir is not None else None
