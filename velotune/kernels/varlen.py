"""Attention over packed rows (several samples in one row) without building a dense [T, T] mask.

A packed row holds several samples; `doc_ids` [B, T] (the forward's `document_ids`) numbers them. A token
attends causally within its own sample only (and within the sliding window when the layer has one). Backends,
in the order `auto` tries them:

- flash: flash-attn's varlen kernel (CUDA, fp16/bf16, when the package is installed). The batch becomes one
  stream of samples described by cumulative lengths; no mask exists at all.
- flex: torch's flex_attention with a document mask_mod, compiled (CUDA). The block mask is built by a
  compiled pass too, so no [T, T] tensor is ever held; fully masked tiles are skipped.
- segments: the CPU. SDPA on slices of each row, so no [T, T] mask (nor its float copy saved per layer) exists
  and almost no tile of another sample is computed: a sample of WINDOW_TOKENS or more runs alone with
  `is_causal`; shorter neighbours run together, as many as fit in WINDOW_TOKENS, with a small block-diagonal
  causal mask (an SDPA call has a fixed cost, ~0.3 ms forward and backward on the CPU, which a slice of a few
  tokens does not repay). Each row is split into its slices, never indexed slice by slice: the backward of an
  index is a zero-filled gradient of the whole [B, H, T, D] per slice (and their sum), which made every slice cost
  ~1-2 ms; a split's backward is one concatenation. In bf16/fp16 each slice runs at a bucket length
  (shape_buckets.py: oneDNN keeps compiled kernels per shape). Gemma 2's soft-capping, and a sliding window
  shorter than a sample, take the dense path instead.
- dense: SDPA with the boolean block-diagonal mask (attention.py), the fallback everywhere else.

`VELOTUNE_ATTENTION=auto|flash|flex|segments|dense` forces one (`flex` on the CPU runs flex_attention eagerly, which
materialises the scores and has no backward there: it serves to check the mask logic, and a CPU forward that
needs gradients takes the dense path). VELOTUNE_KERNELS=reference
means dense. `packed_attention` returns None when the dense path should run.
"""
from __future__ import annotations

import functools
import importlib.util
import os

import torch
import torch.nn.functional as F

from ..errors import UnsupportedError
from .dispatch import kernel_mode
from .shape_buckets import bucket_length, shape_keyed_kernels

BACKENDS = ("auto", "flash", "flex", "segments", "dense")


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
    """'flash', 'flex', 'segments' or 'dense' for these queries [B, H, T, D] (`needs_grad`: backward will run)."""
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
    if setting == "segments" or (setting == "auto" and not q.is_cuda):
        return "segments"
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


def row_segments(doc_ids: torch.Tensor) -> list[list[tuple[int, int]]]:
    """Per row, the (start, end) of each sample in it: one host sync per forward (kept in `mask.memo`)."""
    T = doc_ids.shape[1]
    cu = document_bounds(doc_ids)[0].tolist()
    rows: list[list[tuple[int, int]]] = [[] for _ in range(doc_ids.shape[0])]
    for start, end in zip(cu[:-1], cu[1:]):
        row = start // T
        rows[row].append((start - row * T, end - row * T))
    return rows


# Neighbouring samples shorter than this run as one slice with a block-diagonal mask (the module docstring says
# why). Measured on the AVX2 CPU (fp32, 2 rows of 2048, 6 query / 2 key-value heads of 64, forward + backward, 1
# thread; limits 0 / 32 / 64 / 128 / 256): samples of 2-8 tokens 72 / 47 / 57 / 92 / 130 ms, 4-16 tokens
# 48 / 45 / 45 / 61 / 100, 8-64 tokens 40 / 42 / 45 / 58 / 100, 40-400 tokens 117 / 116 / 114 / 122 / 124 (emulated
# bf16 the same order: 0 and 32 best). A window costs the scores of all its pairs, so it pays only for tiny samples.
WINDOW_TOKENS = 32


def slice_plan(doc_ids: torch.Tensor, limit: int) -> list[tuple[int, int, int, int]]:
    """The slices the segments path runs: (row, start, end, samples in it). Consecutive samples of a row go in
    one slice while its length stays within `limit` (WINDOW_TOKENS); a longer sample is a slice of its own."""
    plan = []
    for b, row in enumerate(row_segments(doc_ids)):
        i = 0
        while i < len(row):
            start, j = row[i][0], i + 1
            while j < len(row) and row[j][1] - start <= limit:
                j += 1
            plan.append((b, start, row[j - 1][1], j - i))
            i = j
    return plan


def _window_mask(doc_ids: torch.Tensor, b: int, start: int, length: int, n: int) -> torch.Tensor:
    """[n, n] bool: causal within each sample of row b's slice of `length` tokens; the padding up to n forms a
    sample of its own (its outputs are dropped)."""
    docs = F.pad(doc_ids[b, start:start + length], (0, n - length), value=-1)
    same = docs[:, None] == docs[None, :]
    return same.tril_()


def _segments(q, k, v, mask, window, scale):
    """SDPA per slice of samples (slice_plan); None (dense path) when a window is shorter than a sample."""
    rows = mask.memo("row_segments", lambda: row_segments(mask.doc_ids))
    if window is not None and max(end - start for row in rows for start, end in row) > window:
        return None
    gqa = q.shape[1] != k.shape[1]
    if all(len(row) == 1 for row in rows):  # one sample per row: plain causal attention of the whole batch
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=gqa)
    bucketed = shape_keyed_kernels(q.device, q.dtype)
    limit = WINDOW_TOKENS
    # Per row, its slices as (start, length, samples): they tile the row, which is split into them (views).
    by_row = mask.memo(("row_slices", limit), lambda: _slices_by_row(slice_plan(mask.doc_ids, limit), len(rows)))
    masks = mask.memo(("slice_masks", limit, bucketed), lambda: {})  # built once, used by every layer
    out_rows = []
    for b, row_qkv in enumerate(zip(q.split(1), k.split(1), v.split(1))):
        lengths = [length for _, length, _ in by_row[b]]
        pieces = []
        for (start, length, samples), *qkv in zip(by_row[b], *(t.split(lengths, dim=2) for t in row_qkv)):
            # Where kernels are cached per shape, a slice runs at a bucket length: zero positions pad it, which
            # its causal queries never see; their outputs are dropped.
            n = bucket_length(length) if bucketed else length
            qs, ks, vs = (F.pad(t, (0, 0, 0, n - length)) for t in qkv) if n > length else qkv
            if samples == 1:
                out = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scale, enable_gqa=gqa)
            else:
                key = (b, start, n)
                if key not in masks:
                    masks[key] = _window_mask(mask.doc_ids, b, start, length, n)
                out = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=masks[key], scale=scale, enable_gqa=gqa)
            pieces.append(out if n == length else out[:, :, :length])
        out_rows.append(pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=2))
    return out_rows[0] if len(out_rows) == 1 else torch.cat(out_rows, dim=0)


def _slices_by_row(plan, n_rows: int) -> list[list[tuple[int, int, int]]]:
    """slice_plan's (row, start, end, samples) as one list per row of (start, length, samples)."""
    by_row: list[list[tuple[int, int, int]]] = [[] for _ in range(n_rows)]
    for b, start, end, samples in plan:
        by_row[b].append((start, end - start, samples))
    return by_row


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
    if backend == "segments" and not softcap:  # soft-capping: the explicit dense path (attention.py)
        return _segments(q, k, v, mask, window, scale)
    return None
