"""Neural audio codecs for text-to-speech: waveform <-> levels of discrete codes <-> a language model's tokens.

    spec = read_codec_spec("codecs/snac_24khz")        # the layout only (config.json): 7 codes per frame
    tokens = spec.codes_to_tokens(codes, base_id)       # per-level codes -> token ids (disjoint range per slot)
    codec = load_codec("codecs/snac_24khz")             # config.json + model.safetensors
    codec.decode(spec.tokens_to_codes(tokens, base_id))  # -> float32 samples at codec.sample_rate
"""
from .base import AudioCodec, CodecSpec, frames_for
from .loading import load_codec, read_codec_spec
from .snac import SNAC_24KHZ_CONFIG, SnacCodec

__all__ = ["AudioCodec", "CodecSpec", "SNAC_24KHZ_CONFIG", "SnacCodec", "frames_for", "load_codec",
           "read_codec_spec"]
