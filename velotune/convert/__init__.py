"""Converting models from other formats into Hugging Face directories velotune (and transformers) load.

`convert_ct2_whisper(src_dir, out_dir, *, dtype="float32")` turns a CTranslate2 / faster-whisper Whisper model
into a `WhisperForConditionalGeneration` directory with its tokenizer, generation and feature-extractor configs.
"""


def __getattr__(name: str):
    # Imported on first use, so `python -m velotune.convert.ctranslate2_whisper` runs that module only once.
    if name == "convert_ct2_whisper":
        from .ctranslate2_whisper import convert_ct2_whisper
        return convert_ct2_whisper
    raise AttributeError(f"module 'velotune.convert' has no attribute '{name}'")


__all__ = ["convert_ct2_whisper"]
