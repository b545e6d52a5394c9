"""Exporting a (LoRA-tuned) model to the formats people deploy.

    vt.export(model, tokenizer, "out_dir", format="merged", dtype="bfloat16")  # transformers-loadable safetensors
    vt.export(model, tokenizer, "adapter_dir", format="adapter")             # the PEFT adapter + tokenizer
    vt.export(model, tokenizer, "out_dir", format="gguf", quant="q8_0")      # model.gguf + Ollama Modelfile

Every format refuses an existing output unless `overwrite=True`, checks what it can before writing, and writes
under a temporary name renamed into place; an overwrite replaces only the files velotune wrote there and keeps
the others. The tokenizer's chat template is written with every format. The model passed in is never changed.
"""
from __future__ import annotations

from pathlib import Path

from ..errors import UnsupportedError

FORMATS = ("merged", "adapter", "gguf")


def export(model, tokenizer, out, format: str = "merged", dtype=None, quant=None, overwrite: bool = False,
           max_shard_bytes: int | None = None, adapter_dir=None) -> Path:
    """Writes `model` (adapters merged where the format needs it) to `out`; returns the path written.

    format="merged": a Hugging Face checkpoint directory in `dtype` (float32 | bfloat16 | float16; default the
    model's), sharded above `max_shard_bytes` (default 5 GiB). format="adapter": the PEFT adapter directory
    (with the tokenizer's files when `tokenizer` is given). format="gguf": a GGUF file (`out` ending in .gguf,
    else `out`/model.gguf) in `quant` (f32 | f16 | bf16 | q8_0 | q4_0 | q4_1 | q5_0 | q5_1; default from
    `dtype`, else f16) plus an Ollama Modelfile beside it (`NAME.Modelfile` for `NAME.gguf`, else `Modelfile`).
    `adapter_dir`: the directory the merged adapter came from (its generation config, e.g. a speech adapter's
    language and task, is the export's).
    """
    if format not in FORMATS:
        raise UnsupportedError(f"export format {format!r} is not supported; supported: {', '.join(FORMATS)}")
    if format == "gguf" and getattr(model, "task", None) == "speech-seq2seq":
        raise UnsupportedError("GGUF export is for language models; a Whisper model exports merged (transformers, "
                               "CTranslate2 converters) or as an adapter")
    from ..models.interface import LanguageModel, VelotuneModel, require_model
    # merged and adapter files suit every family (a Whisper too); GGUF is written for language models
    model = require_model(model, "vt.export", kind=LanguageModel if format == "gguf" else VelotuneModel)
    if format == "merged":
        if quant is not None:
            raise UnsupportedError("quant applies to format='gguf'; a merged export takes dtype= instead")
        from .merged import export_merged
        kwargs = {"max_shard_bytes": max_shard_bytes} if max_shard_bytes is not None else {}
        return export_merged(model, tokenizer, out, dtype=dtype, overwrite=overwrite, adapter_dir=adapter_dir,
                             **kwargs)
    if format == "adapter":
        from .merged import export_adapter
        return export_adapter(model, out, overwrite=overwrite, tokenizer=tokenizer)
    from .gguf_writer import export_gguf
    return export_gguf(model, tokenizer, out, quant=quant, dtype=dtype, overwrite=overwrite)


__all__ = ["export", "FORMATS"]
