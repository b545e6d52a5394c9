"""ModernBERT: pre-norm blocks (the first without an attention norm), RoPE with one base for global and one for
local layers, a GeGLU feed-forward (`Wi` holds input and gate), global attention every few layers and a
bidirectional sliding window elsewhere, optional biases, a final LayerNorm.

This is the padded path of transformers' ModernBertModel: positions are 0..T-1 on every row (padding included, as
transformers counts them), padding is masked out of the keys. Names follow ModernBertModel (`embeddings.
tok_embeddings`, `layers.N.attn.Wqkv`, `final_norm`); ModernBertForMaskedLM checkpoints carry them under "model.".
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ...errors import CheckpointError, UnsupportedError
from ...kernels import apply_rope
from ..rope import RotaryEmbedding
from .base import EncoderArgs, EncoderModel, activation, attend, key_padding_mask
from .unpadded import TokenLayout, has_padding

GLOBAL, LOCAL = "full_attention", "sliding_attention"


@dataclass
class Args(EncoderArgs):
    hidden_activation: str = "gelu"
    max_position_embeddings: int = 8192
    norm_eps: float = 1e-5
    norm_bias: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    attention_dropout: float = 0.0
    embedding_dropout: float = 0.0
    mlp_dropout: float = 0.0
    local_attention: int = 128
    global_attn_every_n_layers: int = 3
    layer_types: list | None = None
    # transformers 5 writes the bases in rope_parameters; earlier configs as global_/local_rope_theta.
    rope_parameters: dict | None = None
    global_rope_theta: float = 160_000.0
    local_rope_theta: float | None = 10_000.0
    pad_token_id: int | None = 50283

    POSITIVE_INTS = EncoderArgs.POSITIVE_INTS + ("local_attention", "global_attn_every_n_layers")
    PROBABILITIES = ("attention_dropout", "embedding_dropout", "mlp_dropout")
    POSITIVE_FLOATS = ("norm_eps",)
    FLAGS = ("norm_bias", "attention_bias", "mlp_bias")

    def validate(self, source: str):
        super().validate(source)
        activation(self.hidden_activation, source, "hidden_activation")
        if self.layer_types is None:
            # As transformers: layer i is global when i is a multiple of global_attn_every_n_layers.
            every = self.global_attn_every_n_layers
            self.layer_types = [LOCAL if i % every else GLOBAL for i in range(self.num_hidden_layers)]
        if not isinstance(self.layer_types, list) or len(self.layer_types) != self.num_hidden_layers:
            raise CheckpointError(f"{source}: field 'layer_types' must list one type per layer "
                                  f"({self.num_hidden_layers}), got {self.layer_types!r}")
        unknown = sorted({str(t) for t in self.layer_types} - {GLOBAL, LOCAL})
        if unknown:
            raise CheckpointError(f"{source}: field 'layer_types' holds {', '.join(unknown)}; "
                                  f"expected '{GLOBAL}' or '{LOCAL}'")
        # Resolved once here, whichever way the config spells them: the bases the model reads.
        self.global_rope_theta, self.local_rope_theta = self._theta(GLOBAL, source), self._theta(LOCAL, source)

    def _theta(self, layer_type: str, source: str) -> float:
        params = (self.rope_parameters or {}).get(layer_type) if isinstance(self.rope_parameters, dict) else None
        if isinstance(params, dict):
            kind = params.get("rope_type", "default")
            if kind != "default":
                raise UnsupportedError(f"{source}: rope_parameters.{layer_type}.rope_type '{kind}' is not supported "
                                       "for modernbert; supported: default")
            theta, name = params.get("rope_theta"), f"rope_parameters.{layer_type}.rope_theta"
        elif layer_type == GLOBAL:
            theta, name = self.global_rope_theta, "global_rope_theta"
        else:
            # A null local base meant "the global one" in the configs that wrote it (transformers 4).
            theta = self.global_rope_theta if self.local_rope_theta is None else self.local_rope_theta
            name = "local_rope_theta"
        if isinstance(theta, bool) or not isinstance(theta, (int, float)) or not 0 < theta < float("inf"):
            raise CheckpointError(f"{source}: field '{name}' must be a positive number, got {theta!r}")
        return float(theta)

    def rope_theta(self, layer_type: str) -> float:
        return self.global_rope_theta if layer_type == GLOBAL else self.local_rope_theta

    @property
    def half_window(self) -> int:
        """A local layer's query sees keys at most local_attention // 2 positions away, on either side."""
        return self.local_attention // 2


def layer_norm(args: Args) -> nn.LayerNorm:
    return nn.LayerNorm(args.hidden_size, eps=args.norm_eps, bias=args.norm_bias)


class Embeddings(nn.Module):
    def __init__(self, args: Args):
        super().__init__()
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.hidden_size, padding_idx=args.pad_token_id)
        self.norm = layer_norm(args)
        self.drop = nn.Dropout(args.embedding_dropout)

    def forward(self, input_ids):
        return self.drop(self.norm(self.tok_embeddings(input_ids)))


class Attention(nn.Module):
    def __init__(self, args: Args, layer_type: str):
        super().__init__()
        self.heads, self.head_dim, self.layer_type = args.num_attention_heads, args.head_dim, layer_type
        self.Wqkv = nn.Linear(args.hidden_size, 3 * args.hidden_size, bias=args.attention_bias)
        self.Wo = nn.Linear(args.hidden_size, args.hidden_size, bias=args.attention_bias)
        self.attention_dropout = args.attention_dropout
        # transformers builds an Identity at rate 0; neither holds parameters, so names are unaffected.
        self.out_drop = nn.Dropout(args.attention_dropout)

    def forward(self, x, rope, mask, layout: TokenLayout | None = None):
        """`x` [batch, seq, hidden], or the real tokens [tokens, hidden] with their layout: padded back around
        the rotary embedding and attention only."""
        qkv = self.Wqkv(x) if layout is None else layout.pad(self.Wqkv(x))
        B, T, _ = qkv.shape
        # Wqkv's rows are [query; key; value], each heads x head_dim.
        q, k, v = qkv.view(B, T, 3, self.heads, self.head_dim).unbind(dim=2)
        cos, sin = rope
        q, k = apply_rope(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
        out = attend(q.transpose(1, 2), k.transpose(1, 2), v, mask,
                     self.attention_dropout if self.training else 0.0, (B, T, qkv.shape[-1] // 3))
        return self.out_drop(self.Wo(out if layout is None else layout.gather(out)))


class MLP(nn.Module):
    """Wo(drop(act(input) * gate)), with input and gate the two halves of Wi's output."""

    def __init__(self, args: Args):
        super().__init__()
        self.Wi = nn.Linear(args.hidden_size, 2 * args.intermediate_size, bias=args.mlp_bias)
        self.act = activation(args.hidden_activation, "config.json", "hidden_activation")
        self.drop = nn.Dropout(args.mlp_dropout)
        self.Wo = nn.Linear(args.intermediate_size, args.hidden_size, bias=args.mlp_bias)

    def forward(self, x):
        inputs, gate = self.Wi(x).chunk(2, dim=-1)
        return self.Wo(self.drop(self.act(inputs) * gate))


class Layer(nn.Module):
    def __init__(self, args: Args, index: int):
        super().__init__()
        # The embeddings end in a norm already: block 0 has none before attention (and no weight for it).
        self.attn_norm = nn.Identity() if index == 0 else layer_norm(args)
        self.attn = Attention(args, args.layer_types[index])
        self.mlp_norm = layer_norm(args)
        self.mlp = MLP(args)

    def forward(self, x, ropes, masks, layout=None):
        kind = self.attn.layer_type
        h = x + self.attn(self.attn_norm(x), ropes[kind], masks[kind], layout)
        return h + self.mlp(self.mlp_norm(h))


class Model(EncoderModel):
    """transformers' ModernBertModel (its padded path)."""

    Args = Args
    hf_architecture = "ModernBertModel"
    checkpoint_prefixes = ("model.",)

    def __init__(self, args: Args):
        super().__init__(args)
        self.embeddings = Embeddings(args)
        self.layers = nn.ModuleList(Layer(args, i) for i in range(args.num_hidden_layers))
        self.final_norm = layer_norm(args)
        # Non-persistent tables, rebuilt from the config: no checkpoint name to match.
        self.rotary_emb = nn.ModuleDict({kind: RotaryEmbedding(args.head_dim, args.rope_theta(kind),
                                                               max_position_embeddings=args.max_position_embeddings)
                                         for kind in (GLOBAL, LOCAL)})

    def forward(self, input_ids, attention_mask=None, token_type_ids=None):
        """token_type_ids: accepted for a common call with the BERT families, and unused (ModernBERT has none)."""
        B, T = input_ids.shape
        self.check_length(T)
        h = self.embeddings(input_ids)
        positions = torch.arange(T, device=input_ids.device)[None, :]
        ropes = {kind: rope(positions, h.dtype) for kind, rope in self.rotary_emb.items()}
        padding = key_padding_mask(attention_mask, (B, T))
        masks = {GLOBAL: padding, LOCAL: self._window_mask(padding, T, h.device)}
        if not has_padding(attention_mask):
            return self.final_norm(self.run_blocks(h, ropes, masks))
        # The norms, projections and feed-forward run on the real tokens only (unpadded.py); padding gives zeros.
        layout = TokenLayout(attention_mask)
        return layout.pad(self.final_norm(self.run_blocks(layout.gather(h), ropes, masks, layout)))

    def _window_mask(self, padding, T: int, device):
        """[batch or 1, 1, T, T] boolean: |query - key| <= half window, and the key is real."""
        if T <= self.args.half_window + 1 and padding is None:
            return None  # every key is within reach of every query
        idx = torch.arange(T, device=device)
        band = ((idx[:, None] - idx[None, :]).abs() <= self.args.half_window)[None, None]
        return band if padding is None else band & padding

    @property
    def max_positions(self) -> int:
        return self.args.max_position_embeddings

    def blocks(self) -> list[nn.Module]:
        return list(self.layers)

    def get_input_embeddings(self) -> nn.Module:
        return self.embeddings.tok_embeddings
