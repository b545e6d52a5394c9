"""Attention over packed rows (several samples in one row) without building a dense [T, T] mask.

A packed row restarts its position ids at 0 for each sample; `doc_ids` [B, T] numbers the samples. A token
attends causally within its own sample only (and within the sliding window when the layer has one). Backends,
in the order `auto` tries them:

- flash: flash-attn's varlen kernel (CUDA, fp16/bf16, when the package is installed). The batch becomes one
  stream of samples described by cumulative lengths; no mask exists at all.
- flex: torch's flex_attention with a document mask_mod, compiled (CUDA). The block mask is built by a
  compiled pass too, so no [T, T] tensor is ever held; fully masked tiles are skipped.
- dense: SDPA with the boolean block-diagonal mask (attention.py), the fallback everywhere else (the CPU).

`VELOTUNE_ATTENTION=auto|flash|flex|dense` forces one (`flex` on the CPU runs flex_attention eagerly, which
materialises the scores and has no backward there: it serves to check the mask logic, and a CPU forward that
needs gradients takes the dense path). VELOTUNE_KERNELS=reference
means dense. `packed_attention` returns None when the dense path should run.
"""
from __future__ import annotations

import functools
import importlib.util
import os

import torch

from ..errors import UnsupportedError
from .dispatch import kernel_mode

BACKENDS = ("auto", "flash", "flex", "dense")


def attention_setting() -> str:
    value = os.environ.get("VELOTUNE_ATTENTION", "auto").strip().lower() or "auto"
    if value not in BACKENDS:
        raise ValueError(f"VELOTUNE_ATTENTION={value!r}: expected one of {', '.join(BACKENDS)}")
    return value


@functools.lru_cache(maxsize=1)
def flash_attn_available() -> bool:
    return importlib.util.find_spec("flash_attn") is not None


@functools.lru_cache(maxsize=1)
def flex_available() -> bool:
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention  # noqa: F401
    except ImportError:
        return False
    return True


def packed_backend(q: torch.Tensor, needs_grad: bool = False) -> str:
    """'flash', 'flex' or 'dense' for these queries [B, H, T, D] (`needs_grad`: backward will run)."""
    setting = attention_setting()
    if setting == "dense" or kernel_mode() == "reference":
        return "dense"
    flash_ok = flash_attn_available() and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)
    if setting == "flash":
        if not flash_ok:
            raise UnsupportedError("VELOTUNE_ATTENTION=flash needs the flash-attn package and fp16/bf16 CUDA "
                                   "tensors; unset it to let velotune choose")
        return "flash"
    if setting == "auto" and flash_ok:
        return "flash"
    if setting == "flex" or (setting == "auto" and q.is_cuda):
        cpu_backward = not q.is_cuda and needs_grad  # flex_attention has no backward on the CPU
        return "flex" if flex_available() and not cpu_backward else "dense"
    return "dense"


def document_bounds(doc_ids: torch.Tensor):
    """(cu_seqlens int32 [n_docs + 1], longest sample) of the batch seen as one stream of samples: a sample
    starts at each row start and wherever the document id changes."""
    B, T = doc_ids.shape
    starts = torch.ones_like(doc_ids, dtype=torch.bool)
    starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    first = starts.reshape(-1).nonzero().flatten()
    cu = torch.cat((first, torch.tensor([B * T], device=doc_ids.device))).to(torch.int32)
    return cu, int((cu[1:] - cu[:-1]).max())


def _flash(q, k, v, mask, window, scale, softcap):
    from flash_attn import flash_attn_varlen_func

    B, Hq, T, D = q.shape
    cu, longest = mask.memo("cu_seqlens", lambda: document_bounds(mask.doc_ids))

    def stream(t):  # [B, H, T, D] -> [B * T, H, D]
        return t.transpose(1, 2).reshape(B * T, t.shape[1], D)

    extra = {"softcap": softcap} if softcap else {}
    out = flash_attn_varlen_func(stream(q), stream(k), stream(v), cu, cu, longest, longest, dropout_p=0.0,
                                 softmax_scale=scale, causal=True,
                                 window_size=(window - 1, 0) if window else (-1, -1), **extra)
    return out.view(B, T, Hq, D).transpose(1, 2)


def document_mask_mod(doc_ids: torch.Tensor, window: int | None):
    """flex_attention mask_mod: causal, same sample, and within `window` positions when set."""
    def allowed(b, h, q_idx, kv_idx):
        keep = (kv_idx <= q_idx) & (doc_ids[b, q_idx] == doc_ids[b, kv_idx])
        if window is not None:
            keep = keep & (q_idx - kv_idx < window)
        return keep
    return allowed


def _block_mask(mask, window, device):
    from torch.nn.attention.flex_attention import create_block_mask

    def build():
        B, T = mask.doc_ids.shape
        mask_mod = document_mask_mod(mask.doc_ids, window)
        if device.type == "cuda":  # compiled: evaluates the mask tile by tile, never as [T, T]
            return create_block_mask(mask_mod, B, None, T, T, device=device, _compile=True)
        return create_block_mask(mask_mod, B, None, T, T, device=device)
    return mask.memo(("flex", window), build)


@functools.lru_cache(maxsize=1)
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention
    return torch.compile(flex_attention, dynamic=False)


def _flex(q, k, v, mask, window, scale, softcap):
    from torch.nn.attention.flex_attention import flex_attention

    score_mod = None
    if softcap:
        def score_mod(score, b, h, q_idx, kv_idx):  # Gemma 2: tanh soft-capping of the scaled scores
            return torch.tanh(score / softcap) * softcap
    run = _compiled_flex() if q.is_cuda else flex_attention
    return run(q, k, v, score_mod=score_mod, block_mask=_block_mask(mask, window, q.device), scale=scale,
               enable_gqa=q.shape[1] != k.shape[1])


def packed_attention(q, k, v, mask, *, window=None, scale=None, softcap=None):
    """Attention of packed rows through a varlen backend, or None when the dense-mask path should run.
    q: [B, Hq, T, D]; k, v: [B, Hk, T, D]; `mask` an AttentionMask with doc_ids and no key padding."""
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    backend = packed_backend(q, needs_grad)
    if backend == "flash":
        return _flash(q, k, v, mask, window, scale, softcap)
    if backend == "flex":
        return _flex(q, k, v, mask, window, scale, softcap)
    return None
