"""Helpers shared by the Triton kernels: launch sizes for a GPU and for the CPU interpreter, compute dtype."""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .dispatch import interpreting


def compute_dtype(dtype: torch.dtype):
    """Kernels compute in fp32, except float64 inputs (used by the gradient checks) stay float64."""
    return tl.float64 if dtype == torch.float64 else tl.float32


@functools.lru_cache(maxsize=8)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def max_programs(x: torch.Tensor) -> int:
    """How many persistent programs a grid-stride kernel launches: a few per SM, few under the interpreter
    (where each program instance costs ~1 ms of Python)."""
    if x.is_cuda and not interpreting():
        return 4 * _sm_count(x.device.index if x.device.index is not None else torch.cuda.current_device())
    return 4


def tile_rows(block_n: int, tile_elems: int | None = None) -> int:
    """Rows per program so one tile holds about `tile_elems` elements (more under the interpreter, where a big
    numpy tile costs about the same as a small one)."""
    if tile_elems is None:
        tile_elems = 16384 if interpreting() else 4096
    return max(1, min(64, tile_elems // block_n))


def num_warps_for(block: int) -> int:
    return 4 if block <= 2048 else 8 if block <= 8192 else 16


def as_rows(x: torch.Tensor) -> torch.Tensor:
    """[..., N] -> [M, N] with unit stride along N (a view when possible, a copy otherwise)."""
    x2 = x.reshape(-1, x.shape[-1])
    if x2.shape[-1] > 1 and x2.stride(-1) != 1:
        x2 = x2.contiguous()
    return x2


next_power_of_2 = triton.next_power_of_2


@triton.jit
def tanh(x):
    # tl has no portable tanh (libdevice is CUDA-only): 2 * sigmoid(2x) - 1, written without overflow.
    e = tl.exp(-2.0 * tl.abs(x))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x >= 0, t, -t)
