"""Whisper's pieces: attention (self and cross), the pre-norm encoder and decoder layers, the convolutional audio
encoder, the text decoder, the decoder's self-attention mask, and the cache greedy decoding keeps.

Module names are transformers' (`self_attn.k_proj`, `encoder_attn`, `fc1`, `final_layer_norm`, ...), so a
checkpoint's tensors load by name. The model itself (config, loss, loading) is whisper.py.

Training memory (the encoder's 30 s window makes every [batch, 1500, width] activation count): the encoder's
attention norm output is rebuilt in backward rather than kept twice (kernels/recompute_saved.py), a frozen MLP keeps
fc1's output only and runs its backward in row chunks (kernels/frozen_mlp.py), and cross-attention with few
queries never forms the keys and values (WhisperAttention.cross_attend). Each falls back to the plain modules where
it does not apply; tests/test_whisper_memory.py holds the gradients against the plain paths.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..infer.cache import KVCache
from ..kernels.dispatch import kernel_mode
from ..kernels.frozen_mlp import frozen_gelu_mlp
from ..kernels.lora_ops import AdaptedLinear
from ..kernels.recompute_saved import recomputed_in_backward
from .base import padding_idx
from .mlp import ACTIVATIONS


class WhisperAttention(nn.Module):
    """Multi-head attention; the keys come from the same states (self-attention) or from the encoder's output
    (cross-attention), projected by `keys_values`. k_proj has no bias: a bias on the keys shifts every score of a
    query alike, which softmax cancels."""

    def __init__(self, width: int, heads: int, dropout: float):
        super().__init__()
        self.heads, self.head_dim = heads, width // heads
        self.scaling = self.head_dim ** -0.5
        self.dropout = dropout
        self.k_proj = nn.Linear(width, width, bias=False)
        self.v_proj = nn.Linear(width, width)
        self.q_proj = nn.Linear(width, width)
        self.out_proj = nn.Linear(width, width)

    def split_heads(self, x: torch.Tensor) -> torch.Tensor:
        """[batch, seq, width] -> [batch, heads, seq, head_dim]."""
        return x.view(*x.shape[:2], self.heads, self.head_dim).transpose(1, 2)

    def keys_values(self, states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.split_heads(self.k_proj(states)), self.split_heads(self.v_proj(states))

    def forward(self, x, keys_values, mask=None, is_causal: bool = False) -> torch.Tensor:
        """x [batch, seq, width] attends to `keys_values` ([batch, heads, keys, head_dim] each); `mask` a boolean
        [batch or 1, 1, seq, keys] (True: attend) or None."""
        # The queries are scaled before the product, not the scores after it: transformers rounds in that order.
        q = self.split_heads(self.q_proj(x) * self.scaling)
        k, v = keys_values
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal and mask is None,
                                             dropout_p=self.dropout if self.training else 0.0, scale=1.0)
        return self.out_proj(out.transpose(1, 2).reshape(x.shape))

    def cross_attend(self, x: torch.Tensor, states: torch.Tensor) -> torch.Tensor:
        """x [batch, seq, width] attends to the encoder's output `states` [batch, frames, width] (no cache).

        With autograd on and few queries (heads x seq <= width) the keys and values are never formed: per head h,
        q_h k_h^T = (q_h Wk_h) states^T and softmax(.) v_h = (P_h states) Wv_h^T + bv_h, since P's rows sum to 1.
        Backward then keeps the states (kept anyway) and P [batch, heads, seq, frames] instead of keys and values
        [batch, frames, width] each, in every decoder layer (140 MB of a tiny.en batch of 8), and both passes take
        fewer FLOPs. The numbers are the plain path's to fp32 rounding (another summation order); elsewhere
        (inference, long label sequences, attention dropout, bf16, VELOTUNE_KERNELS=reference) it is the plain path."""
        terms = self._folded_keys_values(x, states)
        if terms is None:
            return self(x, self.keys_values(states))
        wk, (wv, bv) = terms
        batch, seq, width = x.shape
        q = self.split_heads(self.q_proj(x) * self.scaling)                           # [B, H, T, hd]
        qk = torch.einsum("bhtd,hdc->bhtc", q, wk.view(self.heads, self.head_dim, width))
        scores = torch.matmul(qk.reshape(batch, self.heads * seq, width), states.transpose(1, 2))
        mixed = torch.matmul(scores.softmax(dim=-1), states)                             # [B, H*T, width]
        out = torch.einsum("bhtc,hdc->bhtd", mixed.view(batch, self.heads, seq, width),
                           wv.view(self.heads, self.head_dim, width))
        if bv is not None:
            out = out + bv.view(self.heads, 1, self.head_dim)
        return self.out_proj(out.transpose(1, 2).reshape(x.shape))

    def _folded_keys_values(self, x: torch.Tensor, states: torch.Tensor):
        """(k weight, (v weight, v bias)) as differentiable tensors when cross_attend may skip the keys and values,
        else None."""
        if not torch.is_grad_enabled() or x.shape[1] * self.heads > x.shape[2] or kernel_mode() == "reference":
            return None
        if states.dtype not in (torch.float32, torch.float64) or x.dtype != states.dtype:
            return None
        if torch.is_autocast_enabled(states.device.type) or (self.training and self.dropout > 0):
            return None
        k, v = _linear_terms(self.k_proj, states.dtype), _linear_terms(self.v_proj, states.dtype)
        if k is None or v is None or k[1] is not None:
            return None
        return k[0], v


def _linear_terms(module: nn.Module, dtype: torch.dtype):
    """(weight, bias) of the map `module` computes, as tensors autograd differentiates: a plain Linear's own, or an
    adapted (LoRA) linear's frozen base plus scaling * B A; None for any other module, or another dtype."""
    if type(module) is nn.Linear:
        weight, bias = module.weight, module.bias
    elif isinstance(module, AdaptedLinear):
        view = module.adapter_view()  # None: DoRA, or dropout on the adapter's input
        if view is None or type(view.base) is not nn.Linear:
            return None
        weight, bias = view.base.weight, view.base.bias
        if view.a is not None and weight.dtype == dtype:
            weight = weight + view.scaling * (view.b.to(dtype) @ view.a.to(dtype))
    else:
        return None
    return (weight, bias) if weight.dtype == dtype and (bias is None or bias.dtype == dtype) else None


def layer_norm(norm: nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
    """What `norm(x)` computes, bit for bit, without the module's hooks: the recipe that rebuilds a norm's output."""
    return F.layer_norm(x, norm.normalized_shape, norm.weight, norm.bias, norm.eps)


# activation_function -> F.gelu's `approximate`, the GELU names of the gated MLPs' table (velotune computes every
# GELU variant with F.gelu); other activations: None.
GELU_APPROXIMATE = {name: approx for name, (kind, approx) in ACTIVATIONS.items() if kind == "geglu"}


def feed_forward(layer: nn.Module, h: torch.Tensor) -> torch.Tensor:
    """h + fc2(act(fc1(norm(h)))): the second half of both layer kinds, whose checkpoint names put fc1, fc2 and
    final_layer_norm on the layer itself. With fc1 and fc2 frozen (LoRA elsewhere) one op whose backward runs in
    row chunks (kernels/frozen_mlp.py), else the modules."""
    x = layer.final_layer_norm(h)
    out = frozen_gelu_mlp(layer.fc1, layer.fc2, layer.gelu_approximate, x,
                          layer.activation_dropout if layer.training else 0.0)
    if out is None:
        x = F.dropout(layer.activation(layer.fc1(x)), layer.activation_dropout, layer.training)
        out = layer.fc2(x)
    return h + F.dropout(out, layer.dropout, layer.training)


class EncoderLayer(nn.Module):
    """x + attn(norm(x)), then h + mlp(norm(h)); bidirectional."""

    def __init__(self, args, activation):
        super().__init__()
        width = args.d_model
        self.self_attn = WhisperAttention(width, args.encoder_attention_heads, args.attention_dropout)
        self.self_attn_layer_norm = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, args.encoder_ffn_dim)
        self.fc2 = nn.Linear(args.encoder_ffn_dim, width)
        self.final_layer_norm = nn.LayerNorm(width)
        self.activation, self.dropout, self.activation_dropout = activation, args.dropout, args.activation_dropout
        self.gelu_approximate = GELU_APPROXIMATE.get(args.activation_function)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.self_attn_layer_norm(x)
        # The norm keeps x for its backward; the adapted projections would keep h too (a [batch, frames, width]
        # tensor per layer): they keep a recipe instead, and h is rebuilt from x when backward reaches them.
        with recomputed_in_backward(h, lambda: layer_norm(self.self_attn_layer_norm, x)):
            attended = self.self_attn(h, self.self_attn.keys_values(h))
        h = x + F.dropout(attended, self.dropout, self.training)
        h = feed_forward(self, h)
        if h.dtype == torch.float16:  # as transformers: fp16 activations of long audio can overflow to inf
            limit = torch.finfo(torch.float16).max - 1000
            h = h.clamp(min=-limit, max=limit)
        return h


class DecoderLayer(nn.Module):
    """Causal self-attention, cross-attention to the encoder's output, feed-forward; each pre-norm and residual."""

    def __init__(self, args, activation, layer_idx: int):
        super().__init__()
        width = args.d_model
        self.layer_idx = layer_idx
        self.self_attn = WhisperAttention(width, args.decoder_attention_heads, args.attention_dropout)
        self.self_attn_layer_norm = nn.LayerNorm(width)
        self.encoder_attn = WhisperAttention(width, args.decoder_attention_heads, args.attention_dropout)
        self.encoder_attn_layer_norm = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, args.decoder_ffn_dim)
        self.fc2 = nn.Linear(args.decoder_ffn_dim, width)
        self.final_layer_norm = nn.LayerNorm(width)
        self.activation, self.dropout, self.activation_dropout = activation, args.dropout, args.activation_dropout
        self.gelu_approximate = GELU_APPROXIMATE.get(args.activation_function)

    def forward(self, x, encoder_states, mask, cache: "DecodingCache | None" = None) -> torch.Tensor:
        """`mask` a boolean self-attention mask, or None for plain causal attention (a single query with a cache:
        every cached key)."""
        h = self.self_attn_layer_norm(x)
        kv = self.self_attn.keys_values(h)
        if cache is not None:
            kv = cache.self_attention.update(self.layer_idx, *kv)
        attended = self.self_attn(h, kv, mask, is_causal=h.shape[1] > 1)
        h = x + F.dropout(attended, self.dropout, self.training)
        q = self.encoder_attn_layer_norm(h)
        if cache is None:
            attended = self.encoder_attn.cross_attend(q, encoder_states)
        else:
            kv = cache.cross_keys_values(self.layer_idx, lambda: self.encoder_attn.keys_values(encoder_states))
            attended = self.encoder_attn(q, kv)
        h = h + F.dropout(attended, self.dropout, self.training)
        return feed_forward(self, h)


class WhisperEncoder(nn.Module):
    """log-mel frames [batch, mels, 2 * max_source_positions] -> two convolutions (the second halves the frame
    rate) -> + fixed sinusoidal positions -> layers -> LayerNorm: [batch, max_source_positions, d_model]."""

    def __init__(self, args, activation):
        super().__init__()
        self.conv1 = nn.Conv1d(args.num_mel_bins, args.d_model, kernel_size=3, padding=1)
        self.conv2 = nn.Conv1d(args.d_model, args.d_model, kernel_size=3, stride=2, padding=1)
        # Sinusoids stored in the checkpoint and frozen, as transformers and the original training keep them.
        self.embed_positions = nn.Embedding(args.max_source_positions, args.d_model)
        self.embed_positions.requires_grad_(False)
        self.layers = nn.ModuleList(EncoderLayer(args, activation) for _ in range(args.encoder_layers))
        self.layer_norm = nn.LayerNorm(args.d_model)
        self.frames = 2 * args.max_source_positions
        self.num_mel_bins, self.dropout = args.num_mel_bins, args.dropout

    def embed(self, input_features: torch.Tensor) -> torch.Tensor:
        if input_features.dim() != 3 or tuple(input_features.shape[1:]) != (self.num_mel_bins, self.frames):
            raise ValueError(f"input_features must be [batch, {self.num_mel_bins} mel bins, {self.frames} frames] "
                             f"(num_mel_bins and 2 x max_source_positions in config.json; pad or trim the audio "
                             f"to that length), got {list(input_features.shape)}")
        x = F.gelu(self.conv1(input_features))  # plain GELU whatever activation_function says, as transformers
        # [batch, frames, width] in its own memory, once: the transposed view would make the sum below and the whole
        # residual stream after it transposed in memory too, and every LayerNorm and matmul then copies it
        # (forward and backward: ~1 s of a 13 s profiled step). Values unchanged.
        x = F.gelu(self.conv2(x)).transpose(1, 2).contiguous()
        return F.dropout(x + self.embed_positions.weight, self.dropout, self.training)


class WhisperDecoder(nn.Module):
    """token ids -> embeddings + learned positions -> layers -> LayerNorm: [batch, seq, d_model]. (scale_embedding
    is not applied: transformers reads it and never uses it, and Whisper checkpoints set it false.)"""

    def __init__(self, args, activation):
        super().__init__()
        # As transformers: the pad token's embedding row gets no gradient.
        self.embed_tokens = nn.Embedding(args.vocab_size, args.d_model, padding_idx=padding_idx(args))
        self.embed_positions = nn.Embedding(args.max_target_positions, args.d_model)
        self.layers = nn.ModuleList(DecoderLayer(args, activation, i) for i in range(args.decoder_layers))
        self.layer_norm = nn.LayerNorm(args.d_model)
        self.dropout = args.dropout

    def embed(self, input_ids: torch.Tensor, past: int) -> torch.Tensor:
        end = past + input_ids.shape[1]
        if end > self.embed_positions.num_embeddings:
            raise ValueError(f"decoder input reaches position {end}, past the {self.embed_positions.num_embeddings} "
                             "positions of this model (max_target_positions in config.json): shorten the labels "
                             "or prompt, or generate fewer tokens")
        h = self.embed_tokens(input_ids) + self.embed_positions.weight[past:end]
        return F.dropout(h, self.dropout, self.training)


class WhisperBackbone(nn.Module):
    """`model.*` in the checkpoints: the audio encoder and the text decoder."""

    def __init__(self, args, activation):
        super().__init__()
        self.encoder = WhisperEncoder(args, activation)
        self.decoder = WhisperDecoder(args, activation)


def decoder_self_mask(attention_mask: torch.Tensor | None, q_len: int, past: int, device) -> torch.Tensor | None:
    """The decoder's self-attention mask: boolean [batch or 1, 1, q_len, past + q_len] (True: attend), or None
    where plain causal attention gives every real position what transformers gives it.

    `attention_mask` [batch, past + q_len] (1 real, 0 padding). Right padding without a cache (training batches)
    needs no mask: causality already keeps every real token from the padding after it, and padded positions carry
    no label; dropping it lets attention take its plain causal kernel. Otherwise keys at padding are masked, as
    transformers does; a query left with no key at all (the leading padding of a left-padded row) attends to
    itself rather than softmaxing over nothing. Either way only padding's own (unused) outputs differ from
    transformers'."""
    kv_len = past + q_len
    if attention_mask is not None and tuple(attention_mask.shape[1:]) != (kv_len,):
        raise ValueError(f"decoder_attention_mask must be [batch, {kv_len}] (cached plus new positions), got "
                         f"{list(attention_mask.shape)}")
    padded = attention_mask is not None and not bool(attention_mask.all())
    if padded and past == 0 and bool((attention_mask[:, 1:] <= attention_mask[:, :-1]).all()):
        padded = False  # right padding only
    if not padded and (past == 0 or q_len == 1):
        return None
    q_pos = torch.arange(past, kv_len, device=device)[:, None]
    k_pos = torch.arange(kv_len, device=device)[None, :]
    allowed = (k_pos <= q_pos)[None, None]
    if padded:
        allowed = allowed & attention_mask.to(device=device, dtype=torch.bool)[:, None, None, :]
        nothing = ~allowed.any(dim=-1, keepdim=True)
        allowed = allowed | (nothing & (k_pos == q_pos))
    return allowed


class DecodingCache:
    """What greedy decoding keeps between steps: the decoder's self-attention keys and values, which grow by one
    position a step (a velotune KVCache), and the cross-attention keys and values of each layer, projected from the
    encoder's output once per utterance and read at every step."""

    def __init__(self, capacity: int, num_layers: int):
        self.self_attention = KVCache(capacity, num_layers=num_layers)
        self.cross: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    @property
    def past_length(self) -> int:
        return self.self_attention.past_length

    def cross_keys_values(self, layer_idx: int, project):
        if layer_idx not in self.cross:
            self.cross[layer_idx] = project()
        return self.cross[layer_idx]


__all__ = ["DecoderLayer", "DecodingCache", "EncoderLayer", "WhisperAttention", "WhisperBackbone", "WhisperDecoder",
           "WhisperEncoder", "decoder_self_mask", "feed_forward", "GELU_APPROXIMATE", "layer_norm"]
