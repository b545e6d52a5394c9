"""Lengths rounded up to a few buckets, so that a run meets few distinct tensor shapes.

Why: on the CPU, bf16 and fp16 matmuls and attention run through oneDNN, which builds (JIT-compiles) kernels for
each distinct shape and keeps them in two caches of 1024 entries each (PyTorch's ideep LRU cache and oneDNN's
primitive cache). Training data brings a new batch width, sample length or target count at nearly every step,
and each new width cost ~20 MB for a 0.8M-parameter model (benchmarks/memory_growth.py): memory grew for
hundreds of steps. With bucketed lengths it stops growing after warm-up, and the cached kernels are reused.
Shrinking the caches instead (LRU_CACHE_CAPACITY, ONEDNN_PRIMITIVE_CACHE_CAPACITY) made steps 4x slower.
"""
from __future__ import annotations

import torch

LARGEST_STEP = 64  # past 256, lengths are multiples of 64: the waste stays under 64 tokens


def bucket_length(n: int, cap: int | None = None) -> int:
    """`n` rounded up to three significant bits (a step of a quarter of the power of two below it, at most 64):
    four buckets per octave, under 25% added. With `cap`, never above max(n, cap)."""
    if n <= 0:
        return n
    step = min(LARGEST_STEP, 1 << max(0, n.bit_length() - 3))
    rounded = -(-n // step) * step
    return rounded if cap is None else min(rounded, max(n, cap))


def shape_keyed_kernels(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether matmuls of this dtype on this device build a kernel per shape (oneDNN on the CPU, half types).
    fp32 on the CPU goes through MKL/OpenBLAS GEMM, which keeps nothing per shape (measured flat)."""
    return device.type == "cpu" and dtype in (torch.bfloat16, torch.float16)
