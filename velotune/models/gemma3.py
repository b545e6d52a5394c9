"""Gemma 3 text (model_type "gemma3_text"): Gemma 2's sandwich blocks and constants, plus

- RMSNorm on each head of q and k (before RoPE), with Gemma's (1 + weight) convention;
- local (sliding-window) and global layers by `layer_types`; configs without it (older ones) name a
  `sliding_window_pattern`: every pattern-th layer global (6 by default), the others local;
- two rotary tables: local layers rotate with `rope_local_base_freq` (10k) and no scaling, global layers with
  `rope_theta` (1M) and its `rope_scaling` (linear x8 in the released checkpoints). transformers 5 writes both
  as `rope_parameters` keyed by layer type; both spellings are read;
- attention scaled by query_pre_attn_scalar**-0.5; the final logits soft-capped when final_logit_softcapping
  is set (None in the released configs); attn_logit_softcapping is read but, as in transformers, not applied;
- embeddings times sqrt(hidden_size) in the model dtype, tied head by default.

Both tables are computed once per forward (`LayerTypeRotary` returns {layer type: (cos, sin)}) and each block
takes its own. The full multimodal "gemma3" config (with a text_config) is refused by BaseArgs.from_dict.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import CheckpointError, UnsupportedError
from .args import BaseArgs
from .attention import Attention
from .base import CausalLM
from .field_checks import check_fields
from .gemma import refuse_bidirectional
from .mlp import ACTIVATIONS, GatedMLP
from .norms import RMSNorm
from .rope import SUPPORTED_ROPE_TYPES, RotaryEmbedding

log = logging.getLogger("velotune")
SLIDING, FULL = "sliding_attention", "full_attention"
LAYER_TYPES = (SLIDING, FULL)


@dataclass
class Args(BaseArgs):
    model_type: str = "gemma3_text"
    vocab_size: int = 262_208
    hidden_size: int = 2304
    intermediate_size: int = 9216
    num_hidden_layers: int = 26
    num_attention_heads: int = 8
    num_key_value_heads: int | None = 4
    head_dim: int | None = 256
    hidden_activation: str = "gelu_pytorch_tanh"
    max_position_embeddings: int = 131_072
    rope_theta: float = 1_000_000.0          # the global layers' base
    rope_local_base_freq: float = 10_000.0   # the local layers' base (never scaled)
    tie_word_embeddings: bool = True
    pad_token_id: int | None = 0
    eos_token_id: object = 1
    bos_token_id: object = 2
    query_pre_attn_scalar: float = 256
    sliding_window: int | None = 4096
    sliding_window_pattern: int = 6
    final_logit_softcapping: float | None = None
    attn_logit_softcapping: float | None = None
    use_bidirectional_attention: bool | None = False
    # Derived in validate, not a config key: the local layers' rope scaling (only transformers 5's
    # `rope_parameters` can give them one).
    local_rope_scaling: dict | None = field(default=None, repr=False)

    def validate(self, source: str = "config.json"):
        self._read_layer_ropes(source)
        super().validate(source)  # completes self.rope_scaling (the global one) as transformers does
        self.local_rope_scaling = _completed(self, self.local_rope_scaling)
        nested = "rope_parameters" in self.raw
        for name, scaling in ((f"rope_parameters.{FULL}" if nested else "rope_scaling", self.rope_scaling),
                              (f"rope_parameters.{SLIDING}", self.local_rope_scaling)):
            kind = (scaling or {}).get("rope_type", "default")
            if kind not in SUPPORTED_ROPE_TYPES:  # named here: RotaryEmbedding's own refusal cannot name the file
                raise UnsupportedError(f"{source}: field '{name}' asks for rope type '{kind}'; supported: "
                                       f"{', '.join(SUPPORTED_ROPE_TYPES)}")
        refuse_bidirectional(self, source)
        check_fields(self, source, positive_floats=("rope_local_base_freq", "query_pre_attn_scalar"))
        for name in ("final_logit_softcapping", "attn_logit_softcapping"):
            if getattr(self, name) is not None:
                check_fields(self, source, positive_floats=(name,))
        if self.hidden_activation not in ACTIVATIONS:
            raise UnsupportedError(f"{source}: field 'hidden_activation' is '{self.hidden_activation}'; "
                                   f"supported: {', '.join(ACTIVATIONS)}")
        if self.layer_types is None:  # transformers reads the pattern only then
            check_fields(self, source, positive_ints=("sliding_window_pattern",))
            pattern = self.sliding_window_pattern
            self.layer_types = [SLIDING if (i + 1) % pattern else FULL for i in range(self.num_hidden_layers)]
        unknown = sorted({str(kind) for kind in self.layer_types} - set(LAYER_TYPES))
        if unknown:
            raise CheckpointError(f"{source}: field 'layer_types' holds {', '.join(unknown)}; expected "
                                  f"{' / '.join(LAYER_TYPES)}")

    def _read_layer_ropes(self, source: str):
        """transformers 5's `rope_parameters` {layer type: {rope_type, rope_theta, ...}} into the older fields
        (rope_theta + rope_scaling for global layers, rope_local_base_freq for local ones). The older spelling
        needs nothing: BaseArgs already read rope_theta and rope_scaling, which transformers puts on the global
        layers alone."""
        params = self.raw.get("rope_parameters")
        if params is None:
            return
        if not isinstance(params, dict) or not set(params) & set(LAYER_TYPES):
            # transformers reads only the per-layer-type entries: a flat dict would be silently ignored there.
            raise CheckpointError(f"{source}: field 'rope_parameters' must be keyed by layer type "
                                  f"({' / '.join(LAYER_TYPES)}) for gemma3_text, got {params!r}")
        for kind in LAYER_TYPES:
            entry = params.get(kind)
            if entry is None:
                continue
            if not isinstance(entry, dict):
                raise CheckpointError(f"{source}: field 'rope_parameters.{kind}' must be an object, got {entry!r}")
            entry = dict(entry)
            theta = entry.pop("rope_theta", None)
            rope_type = entry.get("rope_type", entry.get("type", "default"))
            scaling = None if rope_type == "default" else {**entry, "rope_type": rope_type}
            if kind == FULL:
                self.rope_theta = theta if theta is not None else self.raw.get("rope_theta", 1_000_000.0)
                self.rope_scaling = scaling
            else:
                self.rope_local_base_freq = theta if theta is not None else self.raw.get("rope_local_base_freq",
                                                                                         10_000.0)
                self.local_rope_scaling = scaling


def _completed(args: Args, scaling: dict | None) -> dict | None:
    """BaseArgs' completion of a scaling dict (the pretraining length of llama3 / yarn / longrope), for the
    local layers' table."""
    if not scaling:
        return scaling
    global_scaling = args.rope_scaling
    args.rope_scaling = scaling
    try:
        args._complete_rope_scaling()
        return args.rope_scaling
    finally:
        args.rope_scaling = global_scaling


class LayerTypeRotary(nn.Module):
    """One RotaryEmbedding per layer type; forward gives {layer type: (cos, sin)} for the blocks to pick from.
    Its tables are non-persistent buffers, rebuilt by the loader like any RotaryEmbedding's."""

    def __init__(self, args: Args):
        super().__init__()
        self.full_attention = RotaryEmbedding(args.head_dim, args.rope_theta, args.rope_scaling,
                                              args.partial_rotary_factor, args.max_position_embeddings)
        self.sliding_attention = RotaryEmbedding(args.head_dim, args.rope_local_base_freq, args.local_rope_scaling,
                                                 args.partial_rotary_factor, args.max_position_embeddings)
        self.used = sorted(set(args.layer_types))  # a table no layer reads is not computed

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype) -> dict:
        return {kind: getattr(self, kind)(position_ids, dtype) for kind in self.used}


class Block(nn.Module):
    """h = x + post_attn_norm(attn(norm(x))); out = h + post_ff_norm(mlp(pre_ff_norm(h))), with the rotary
    table of this layer's type."""

    def __init__(self, args: Args, layer_idx: int):
        super().__init__()
        eps = args.rms_norm_eps
        self.layer_type = args.layer_types[layer_idx]
        # No attention soft-cap, whatever attn_logit_softcapping says: transformers' Gemma 3 reads the field but
        # never applies it (q/k norms took its place), and checkpoints are trained and evaluated that way.
        self.self_attn = Attention(args, layer_idx, qk_norm=True, scale=args.query_pre_attn_scalar ** -0.5,
                                   norm_offset=1.0)
        self.mlp = GatedMLP(args.hidden_size, args.intermediate_size, args.hidden_activation, bias=False)
        self.input_layernorm = RMSNorm(args.hidden_size, eps, offset=1.0)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, eps, offset=1.0)
        self.pre_feedforward_layernorm = RMSNorm(args.hidden_size, eps, offset=1.0)
        self.post_feedforward_layernorm = RMSNorm(args.hidden_size, eps, offset=1.0)

    def forward(self, x, ropes: dict, mask, cache=None):
        rope = ropes[self.layer_type]
        h = x + self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), rope, mask, cache))
        return h + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(h)))


class Model(CausalLM):
    Args = Args
    norm_offset = 1.0
    scale_embeddings = True

    def __init__(self, args: Args):
        super().__init__(args)
        # The Backbone's single table would be the global one on every layer: two, picked per layer, instead.
        self.model.rotary_emb = LayerTypeRotary(args)
        self.final_logit_softcap = args.final_logit_softcapping
        if args.attn_logit_softcapping is not None:
            log.warning("gemma3_text: attn_logit_softcapping=%s is ignored, as transformers ignores it",
                        args.attn_logit_softcapping)

    @staticmethod
    def make_block(args, layer_idx):
        return Block(args, layer_idx)
