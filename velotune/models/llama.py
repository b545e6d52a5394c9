"""Llama 2 / 3 / 3.1 / 3.2 (model_type "llama"): pre-norm blocks, SwiGLU, GQA, RoPE with llama3 scaling,
tied or untied embeddings. Everything else is the shared decoder in `base.py`."""
from dataclasses import dataclass

from .args import BaseArgs
from .base import CausalLM


@dataclass
class Args(BaseArgs):
    model_type: str = "llama"
    pretraining_tp: int = 1


class Model(CausalLM):
    Args = Args
