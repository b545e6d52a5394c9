"""Attention: masks for causal / padded / packed / sliding-window batches, and the attention module.

One `AttentionMask` is built per forward and shared by all layers; each layer asks it for the mask of
its window. Packed rows are split into documents by their `document_ids` (one id per document), so no token
attends across samples. Every query may always attend to itself, so a padded row never softmaxes over nothing
(NaN).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UnsupportedError
from ..kernels import apply_rope
from ..kernels.rope import rotate
from ..kernels.lora_ops import lora_projections
from ..kernels.varlen import packed_attention
from .norms import RMSNorm


class AttentionMask:
    def __init__(self, q_len: int, kv_len: int, device, *, doc_ids=None, key_padding=None):
        self.q_len, self.kv_len, self.device = q_len, kv_len, device
        self.doc_ids = doc_ids            # [B, kv_len] int or None: document index per key position
        self.key_padding = key_padding    # [B, kv_len] bool or None: True for real tokens
        self._cache: dict = {}

    @property
    def plain_causal(self) -> bool:
        return self.doc_ids is None and self.key_padding is None and self.q_len == self.kv_len

    def dense(self, window: int | None) -> torch.Tensor | None:
        """Boolean [B or 1, 1, q_len, kv_len] mask (True = attend), or None when `is_causal` suffices."""
        if self.plain_causal and window is None:
            return None
        if window not in self._cache:
            self._cache[window] = self._build(window)
        return self._cache[window]

    def memo(self, key, build):
        """`build()` once per forward, shared by the layers (varlen backends keep their sample bounds here)."""
        key = ("memo", key)
        if key not in self._cache:
            self._cache[key] = build()
        return self._cache[key]

    def rows(self, rows: torch.Tensor, window: int | None) -> torch.Tensor:
        """Boolean [B, 1, K, kv_len] (True = attend) for the queries at positions `rows` [B, K] of a forward
        without a cache: what `dense` gives those rows, built for them alone."""
        k_idx = torch.arange(self.kv_len, device=self.device)[None, None, :]
        q_idx = rows[:, :, None]
        allowed = k_idx <= q_idx
        if window is not None:
            allowed = allowed & (q_idx - k_idx < window)
        if self.doc_ids is not None:
            allowed = allowed & (self.doc_ids.gather(1, rows)[:, :, None] == self.doc_ids[:, None, :])
        if self.key_padding is not None:
            allowed = allowed & self.key_padding[:, None, :].bool()
        return (allowed | (k_idx == q_idx))[:, None]

    @property
    def packed_only(self) -> bool:
        """Packed rows, nothing else: a varlen backend can replace the dense mask."""
        return self.doc_ids is not None and self.key_padding is None and self.q_len == self.kv_len

    def _build(self, window):
        offset = self.kv_len - self.q_len
        q_idx = torch.arange(offset, self.kv_len, device=self.device)[:, None]
        k_idx = torch.arange(self.kv_len, device=self.device)[None, :]
        allowed = k_idx <= q_idx
        if window is not None:
            allowed = allowed & (q_idx - k_idx < window)
        allowed = allowed[None, None]
        if self.doc_ids is not None:
            q_docs = self.doc_ids[:, offset:]
            allowed = allowed & (q_docs[:, None, :, None] == self.doc_ids[:, None, None, :])
        if self.key_padding is not None:
            allowed = allowed & self.key_padding[:, None, None, :].bool()
        return allowed | (k_idx == q_idx)[None, None]


def check_document_ids(document_ids: torch.Tensor, shape, cache) -> None:
    """`document_ids` as a forward takes them: integers shaped like the input ids, and no KV cache (a cached step
    would need the documents of every past position)."""
    if cache is not None:
        raise UnsupportedError("document_ids (packed documents) with a KV cache: packing is for training and "
                               "scoring whole rows; generate one document per row instead")
    if document_ids.is_floating_point() or tuple(document_ids.shape) != tuple(shape):
        raise ValueError(f"document_ids must be integers shaped like input_ids {list(shape)}, got "
                         f"{list(document_ids.shape)} {str(document_ids.dtype).replace('torch.', '')}")


def document_starts(document_ids: torch.Tensor) -> torch.Tensor:
    """[B, T] bool: True where a document begins (each row's first token, and every change of id)."""
    starts = torch.ones_like(document_ids, dtype=torch.bool)
    starts[:, 1:] = document_ids[:, 1:] != document_ids[:, :-1]
    return starts


def document_positions(document_ids: torch.Tensor) -> torch.Tensor:
    """Positions that restart at 0 at each document: those a document has alone."""
    T = document_ids.shape[1]
    index = torch.arange(T, device=document_ids.device).expand_as(document_ids)
    start = torch.where(document_starts(document_ids), index, 0).cummax(dim=-1).values
    return index - start


def attend(q, k, v, mask: AttentionMask, *, window=None, scale=None, softcap=None):
    """q: [B, Hq, T, D]; k, v: [B, Hk, S, D] -> [B, Hq, T, D]."""
    if mask.packed_only:  # no [T, T] mask where a varlen backend runs (kernels/varlen.py)
        out = packed_attention(q, k, v, mask, window=window, scale=scale, softcap=softcap)
        if out is not None:
            return out
    dense = mask.dense(window)
    if softcap is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=dense, is_causal=dense is None, scale=scale,
                                              enable_gqa=q.shape[1] != k.shape[1])
    return _softcapped_attention(q, k, v, dense, scale, softcap)


def attend_rows(q, k, v, dense, *, scale=None, softcap=None):
    """Queries at some positions only: q [B, Hq, K, D] against every key, `dense` from AttentionMask.rows."""
    if softcap is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=dense, scale=scale, enable_gqa=q.shape[1] != k.shape[1])
    return _softcapped_attention(q, k, v, dense, scale, softcap)


def _softcapped_attention(q, k, v, dense, scale, softcap):
    """Gemma 2: scores pass through tanh soft-capping before the mask; SDPA cannot do that, so it is explicit."""
    groups = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(groups, dim=1)
    v = v.repeat_interleave(groups, dim=1)
    scale = scale if scale is not None else q.shape[-1] ** -0.5
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    scores = torch.tanh(scores / softcap) * softcap
    if dense is None:
        T, S = q.shape[-2], k.shape[-2]
        dense = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T)
    scores = scores.masked_fill(~dense, torch.finfo(scores.dtype).min)
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.matmul(probs, v)


class Attention(nn.Module):
    """Multi-head attention with GQA, RoPE, optional q/k norms, fused qkv, soft-capping and sliding window.

    Submodule names follow the Hugging Face checkpoints (q_proj/k_proj/v_proj/o_proj, or qkv_proj).
    """

    def __init__(self, args, layer_idx: int, *, qkv_bias=None, o_bias=None, qk_norm=False, fused_qkv=False,
                 scale=None, softcap=None, norm_offset=0.0):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv, self.head_dim = args.num_attention_heads, args.num_key_value_heads, args.head_dim
        self.window = args.window_for_layer(layer_idx)
        self.scale, self.softcap, self.norm_offset = scale, softcap, norm_offset
        self.eps = args.rms_norm_eps
        bias = args.attention_bias if qkv_bias is None else qkv_bias
        q_out, kv_out = self.n_heads * self.head_dim, self.n_kv * self.head_dim
        self.fused_qkv = fused_qkv
        if fused_qkv:
            self.qkv_proj = nn.Linear(args.hidden_size, q_out + 2 * kv_out, bias=bias)
        else:
            self.q_proj = nn.Linear(args.hidden_size, q_out, bias=bias)
            self.k_proj = nn.Linear(args.hidden_size, kv_out, bias=bias)
            self.v_proj = nn.Linear(args.hidden_size, kv_out, bias=bias)
        self.o_proj = nn.Linear(q_out, args.hidden_size, bias=args.attention_bias if o_bias is None else o_bias)
        if qk_norm:
            self.q_norm = RMSNorm(self.head_dim, args.rms_norm_eps, offset=norm_offset)
            self.k_norm = RMSNorm(self.head_dim, args.rms_norm_eps, offset=norm_offset)
        self.qk_norm = qk_norm

    def project(self, x):
        if self.fused_qkv:
            q_out, kv_out = self.n_heads * self.head_dim, self.n_kv * self.head_dim
            return self.qkv_proj(x).split([q_out, kv_out, kv_out], dim=-1)
        fused = lora_projections([self.q_proj, self.k_proj, self.v_proj], x)  # one op saving x once, no x A^T
        if fused is not None:
            return fused
        return self.q_proj(x), self.k_proj(x), self.v_proj(x)

    def forward(self, x, rope, mask: AttentionMask, cache=None):
        B, T, _ = x.shape
        q, k, v = self.project(x)
        q = q.view(B, T, self.n_heads, self.head_dim)
        k = k.view(B, T, self.n_kv, self.head_dim)
        v = v.view(B, T, self.n_kv, self.head_dim).transpose(1, 2)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q.transpose(1, 2), k.transpose(1, 2), *rope)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)
        out = attend(q, k, v, mask, window=self.window, scale=self.scale, softcap=self.softcap)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))

    def forward_rows(self, x, rows, rope, mask: AttentionMask):
        """The output at positions `rows` [B, K] only (keys and values from every position; no cache): what
        forward gives there, for a last layer whose other positions nothing reads."""
        B, T, _ = x.shape
        K = rows.shape[1]
        if self.fused_qkv:
            q, k, v = self.project(x)
            q = q.gather(1, rows[..., None].expand(B, K, q.shape[-1]))
        else:
            q = self.q_proj(x.gather(1, rows[..., None].expand(B, K, x.shape[-1])))
            k, v = self.k_proj(x), self.v_proj(x)
        q = q.view(B, K, self.n_heads, self.head_dim)
        k = k.view(B, T, self.n_kv, self.head_dim)
        v = v.view(B, T, self.n_kv, self.head_dim).transpose(1, 2)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        cos, sin = (t.expand(B, *t.shape[1:]) for t in rope)
        picked = rows[..., None].expand(B, K, cos.shape[-1])
        q = rotate(q.transpose(1, 2), cos.gather(1, picked), sin.gather(1, picked))
        k = rotate(k.transpose(1, 2), cos, sin)
        out = attend_rows(q, k, v, mask.rows(rows, self.window), scale=self.scale, softcap=self.softcap)
        return self.o_proj(out.transpose(1, 2).reshape(B, K, self.n_heads * self.head_dim))
