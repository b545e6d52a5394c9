"""Grouped matmul in Triton: rows of x grouped contiguously by expert, each group times its own expert's weight.

    out[rows of group e] = x[rows of group e] @ B_e          B_e = W_e^T (forward) or W_e (d x in backward)

What is special:
- The experts' weights are NOT stacked into one [E, N, K] tensor (that would copy every expert's weight at every
  step): the kernel reads them through a table of their addresses, an int64 tensor of `w.data_ptr()` that the
  kernel loads and casts to a typed pointer (`tl.pointer_type`). All weights must share one shape, dtype and
  strides; the table is cached per set of addresses, so a layer's table is built and copied to the GPU once.
- The launch grid is (row tiles, column blocks), and a row tile is one entry of a small int32 schedule
  [tiles, 3] = (group, first row, group's end row) built with torch ops from the group sizes on their own
  device: no host sync when the sizes are a GPU tensor (the grid then has the upper bound cdiv(T, BLOCK_M) + E
  tiles; the unused ones hold an empty row range and exit at once). A tile never straddles two groups.
- fp32 accumulation. fp32 inputs use the precision torch's own fp32 matmul would use
  (`torch.get_float32_matmul_precision()`: "highest" -> IEEE fp32, otherwise TF32), so results match F.linear.
- Under the CPU interpreter (TRITON_INTERPRET=1, tests only) the pointer table holds host addresses, which the
  interpreter reads directly; its `tl.dot` on bf16 operands is wrong (upstream), so there the tiles are upcast
  to fp32 before the dot (UPCAST); a GPU multiplies bf16 / fp16 tiles on the tensor cores.
"""
from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from .dispatch import interpreting

# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages). One config (no autotune: the interpreter cannot time
# configs, and MoE group sizes change every step, which would re-tune on every new shape key).
_GPU_16BIT = (64, 128, 64, 4, 3)
_GPU_FP32 = (64, 64, 32, 4, 3)      # IEEE fp32 tiles take twice the shared memory of 16-bit ones
_INTERPRETED = (32, 32, 32, 4, 1)   # a numpy tile costs about the same at any size: few, larger programs

KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@triton.jit
def _grouped_mm(X, W_TABLE, OUT, TILES, N, K, stride_xm, stride_om, stride_bk, stride_bn,
                PRECISION: tl.constexpr, UPCAST: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """One [BLOCK_M, BLOCK_N] tile of OUT: rows [first, min(first + BLOCK_M, end)) of one group times that
    group's B (element (k, n) at W_e + k * stride_bk + n * stride_bn)."""
    tile = tl.program_id(0)
    group = tl.load(TILES + tile * 3)
    first = tl.load(TILES + tile * 3 + 1)
    end = tl.load(TILES + tile * 3 + 2)
    if first >= end:  # a spare entry of an upper-bound schedule
        return
    # The expert's weight, through its address: same element type as X (checked on the host).
    w = tl.load(W_TABLE + group).to(tl.pointer_type(X.dtype.element_ty))
    rows = first + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    row_ok = rows < end  # rows past the group's end belong to the next expert
    col_ok = cols < N
    rows64 = rows.to(tl.int64)
    a_ptrs = X + rows64[:, None] * stride_xm + ks[None, :]
    b_ptrs = w + ks.to(tl.int64)[:, None] * stride_bk + cols.to(tl.int64)[None, :] * stride_bn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = (k0 + ks) < K
        a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K * stride_bk
    out_ptrs = OUT + rows64[:, None] * stride_om + cols[None, :]
    tl.store(out_ptrs, acc.to(OUT.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


def launch_config(dtype: torch.dtype, on_gpu: bool) -> tuple[int, int, int, int, int]:
    if not on_gpu:
        return _INTERPRETED
    return _GPU_FP32 if dtype == torch.float32 else _GPU_16BIT


def tile_schedule(counts: torch.Tensor, block_m: int, max_tiles: int) -> torch.Tensor:
    """int32 [max_tiles, 3]: (group, first row, group end row) of each row tile, groups in order, every group of
    c rows cut into cdiv(c, block_m) tiles; entries past the last tile are (last group, 0, 0): empty. Torch ops
    on counts' device only (no host sync)."""
    counts = counts.to(torch.int64)
    n_groups = counts.numel()
    tiles = (counts + block_m - 1) // block_m
    tile_end = torch.cumsum(tiles, 0)
    row_end = torch.cumsum(counts, 0)
    index = torch.arange(max_tiles, device=counts.device)
    group = torch.searchsorted(tile_end, index, right=True)  # first group whose tiles reach past `index`
    valid = group < n_groups
    group = group.clamp(max=n_groups - 1)
    first = row_end[group] - counts[group] + (index - (tile_end[group] - tiles[group])) * block_m
    first = torch.where(valid, first, 0)
    end = torch.where(valid, row_end[group], 0)
    return torch.stack([group, first, end], 1).to(torch.int32).contiguous()


@functools.lru_cache(maxsize=512)
def _pointer_table(addresses: tuple[int, ...], device: torch.device) -> torch.Tensor:
    # Keyed by the addresses themselves: the table is right for whatever tensors live there now.
    return torch.tensor(addresses, dtype=torch.int64, device=device)


def pointer_table(weights: Sequence[torch.Tensor]) -> torch.Tensor:
    return _pointer_table(tuple(w.data_ptr() for w in weights), weights[0].device)


def _fp32_precision() -> str:
    return "ieee" if torch.get_float32_matmul_precision() == "highest" else "tf32"


def grouped_mm(x: torch.Tensor, weights: Sequence[torch.Tensor], counts: Sequence[int] | torch.Tensor, *,
               transpose: bool = True, blocks: tuple[int, int, int] | None = None) -> torch.Tensor:
    """x [T, K_in] (rows grouped by expert, `counts[e]` rows for expert e) -> [T, out]: group e times W_e^T
    (`transpose`, W_e [out, K_in]) or times W_e (W_e [K_in, out]). Inputs checked by the caller (grouped_mm.py):
    one dtype, one device, weights of one shape and strides. `blocks` (BLOCK_M, BLOCK_N, BLOCK_K) overrides
    the tile sizes (tests); each must be a power of two >= 16."""
    T, k_in = x.shape
    w0 = weights[0]
    if transpose:   # B = W^T: B[k, n] = W[n, k]
        n_out, stride_bk, stride_bn = w0.shape[0], w0.stride(1), w0.stride(0)
    else:           # B = W:   B[k, n] = W[k, n]
        n_out, stride_bk, stride_bn = w0.shape[1], w0.stride(0), w0.stride(1)
    out = torch.empty((T, n_out), dtype=x.dtype, device=x.device)
    if T == 0 or n_out == 0:
        return out
    if k_in == 0:
        return out.zero_()
    if x.stride(1) != 1:
        x = x.contiguous()
    on_gpu = x.is_cuda and not interpreting()
    block_m, block_n, block_k, warps, stages = launch_config(x.dtype, on_gpu)
    if blocks is not None:
        block_m, block_n, block_k = blocks
    if isinstance(counts, torch.Tensor):
        # Sizes on the device: an upper bound on the tiles, so the grid is known without reading them.
        counts_t = counts.to(x.device)
        max_tiles = triton.cdiv(T, block_m) + len(weights)
    else:
        counts_t = torch.tensor(list(counts), dtype=torch.int64).to(x.device, non_blocking=True)
        max_tiles = max(1, sum(triton.cdiv(c, block_m) for c in counts))
    schedule = tile_schedule(counts_t, block_m, max_tiles)
    table = pointer_table(weights)
    grid = (max_tiles, triton.cdiv(n_out, block_n))
    _grouped_mm[grid](x, table, out, schedule, n_out, k_in, x.stride(0), out.stride(0), stride_bk, stride_bn,
                      PRECISION=_fp32_precision() if x.dtype == torch.float32 else "tf32",
                      UPCAST=interpreting() and x.dtype != torch.float32,
                      BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=warps, num_stages=stages)
    return out
