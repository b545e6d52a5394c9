"""Reading `config.json` into typed architecture arguments.

Each architecture's `Args` is a dataclass whose field names are the Hugging Face config keys, verbatim.
Keys we do not use are kept in `raw` so that saving writes the config back unchanged.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from ..errors import CheckpointError, UnsupportedError


@dataclass
class BaseArgs:
    model_type: str = "llama"
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 2048
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    partial_rotary_factor: float = 1.0
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    hidden_act: str = "silu"
    sliding_window: int | None = None
    layer_types: list | None = None
    bos_token_id: Any = None
    eos_token_id: Any = None
    pad_token_id: Any = None
    raw: dict = field(default_factory=dict, repr=False)

    # Keys a config must carry: a checkpoint without them cannot be built, whatever the defaults say.
    REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")

    @classmethod
    def from_dict(cls, config: dict, source: str = "config.json"):
        if isinstance(config.get("text_config"), dict):
            # A multimodal checkpoint's config: its text model's fields (and weights, under another prefix) are
            # nested. Reading the top level only would build the model from defaults: refuse instead.
            raise UnsupportedError(f"{source}: holds a text_config (a multimodal checkpoint); velotune's "
                                   f"{config.get('model_type')} file reads text-only checkpoints")
        missing = [k for k in cls.REQUIRED if k not in config]
        if missing:
            raise CheckpointError(f"{source}: missing required field(s) {', '.join(missing)}")
        flat = _flatten_rope(dict(config))
        names = {f.name for f in dataclasses.fields(cls)} - {"raw"}
        kwargs = {k: v for k, v in flat.items() if k in names}
        args = cls(**kwargs, raw=dict(config))
        args.validate(source)
        args._check_window(source)  # after the architecture's own validation: Qwen drops a window it does not use
        return args

    def validate(self, source: str = "config.json"):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        for name in self.REQUIRED + ("num_key_value_heads", "head_dim", "max_position_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise CheckpointError(f"{source}: field '{name}' must be a positive integer, got {value!r}")
        for name in ("rms_norm_eps", "rope_theta"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 < value < float("inf"):
                raise CheckpointError(f"{source}: field '{name}' must be a positive number, got {value!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise CheckpointError(
                f"{source}: num_attention_heads ({self.num_attention_heads}) is not a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})")
        if self.layer_types is not None and len(self.layer_types) != self.num_hidden_layers:
            raise CheckpointError(f"{source}: layer_types lists {len(self.layer_types)} layers but "
                                  f"num_hidden_layers is {self.num_hidden_layers}")
        self._complete_rope_scaling()

    def _check_window(self, source: str):
        window = self.sliding_window
        if window is not None and (not isinstance(window, int) or isinstance(window, bool) or window <= 0):
            raise CheckpointError(f"{source}: field 'sliding_window' must be a positive integer or null, "
                                  f"got {window!r}")

    def _complete_rope_scaling(self):
        """As transformers: scaled RoPE types need the pretraining length; a top-level
        `original_max_position_embeddings` wins (Phi-3 writes it there), else `max_position_embeddings`."""
        scaling = self.rope_scaling
        if not scaling or scaling.get("rope_type") not in ("llama3", "yarn", "longrope"):
            return
        scaling = dict(scaling)
        # A field of the Args (Phi-3 has one, with a default) or a stray top-level key of config.json.
        top = getattr(self, "original_max_position_embeddings", self.raw.get("original_max_position_embeddings"))
        if top is not None:
            scaling["original_max_position_embeddings"] = top
        else:
            scaling.setdefault("original_max_position_embeddings", self.max_position_embeddings)
        self.rope_scaling = scaling

    def has_dense_mlp(self, layer_idx: int) -> bool:
        """Whether the layer has one MLP (a mixture-of-experts family says which of its layers do)."""
        return True

    def to_dict(self) -> dict:
        """The config as it should be written next to the weights: the original keys, untouched."""
        return dict(self.raw)

    def window_for_layer(self, layer_idx: int) -> int | None:
        """Sliding-window size for one layer, or None for full attention."""
        if self.layer_types is not None:
            kind = self.layer_types[layer_idx]
            return self.sliding_window if kind == "sliding_attention" else None
        return self.sliding_window


def _flatten_rope(config: dict) -> dict:
    """transformers 5 writes `rope_parameters` (theta inside); older configs write `rope_theta` + `rope_scaling`."""
    params = config.get("rope_parameters")
    if isinstance(params, dict):
        params = dict(params)
        if "rope_theta" in params:
            config["rope_theta"] = params.pop("rope_theta")
        if "partial_rotary_factor" in params:
            config["partial_rotary_factor"] = params.pop("partial_rotary_factor")
        kind = params.get("rope_type", params.get("type", "default"))
        config["rope_scaling"] = None if kind == "default" else params
    scaling = config.get("rope_scaling")
    if isinstance(scaling, dict):
        kind = scaling.get("rope_type", scaling.get("type", "default"))
        config["rope_scaling"] = None if kind == "default" else {**scaling, "rope_type": kind}
    return config
