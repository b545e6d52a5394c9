"""Inference: KV cache, sampling, generation defaults, and `generate` / `stream` / `generate_batch`."""
from .cache import KVCache
from .defaults import eos_token_ids, read_generation_config, resolve_sampling
from .generate import (Completion, Decoder, GenerationOutput, TextEvent, TextGeneration, generate,
                       generate_batch, generate_ids, stream, stream_batch)
from .sampling import SamplingParams

__all__ = ["KVCache", "SamplingParams", "resolve_sampling", "eos_token_ids", "read_generation_config",
           "generate", "stream", "generate_batch", "stream_batch", "generate_ids", "Decoder", "TextGeneration",
           "GenerationOutput", "Completion", "TextEvent"]
