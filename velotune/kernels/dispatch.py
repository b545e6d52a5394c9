"""One rule picks an op's implementation: Triton on CUDA tensors when triton imports, else the reference.

`VELOTUNE_KERNELS=reference|triton` forces a choice (triton on the CPU needs TRITON_INTERPRET=1; without it
a CPU tensor still gets the reference, since a Triton launch with no GPU and no interpreter fails).
The fused linear cross-entropy has a third, pure-PyTorch chunked implementation: the default on the CPU.
Triton kernel modules (`triton_*.py`) are imported only once chosen: `triton.jit` reads TRITON_INTERPRET
when it decorates, and importing triton costs seconds that `import velotune` should not pay.
"""
from __future__ import annotations

import contextlib
import functools
import os

import torch

_CHOICES = ("auto", "reference", "triton")


def kernel_mode() -> str:
    mode = os.environ.get("VELOTUNE_KERNELS", "auto").strip().lower() or "auto"
    if mode not in _CHOICES:
        raise ValueError(f"VELOTUNE_KERNELS={mode!r}: expected one of {', '.join(_CHOICES)}")
    return mode


@functools.lru_cache(maxsize=1)
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return True


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def use_triton(x: torch.Tensor) -> bool:
    """True when the Triton implementation should run for tensor `x`."""
    mode = kernel_mode()
    # A CPU tensor in auto mode never runs Triton: decide before importing triton (~75 MB resident, seconds).
    if mode == "reference" or (mode == "auto" and not x.is_cuda) or not triton_available():
        return False
    if mode == "triton":
        return x.is_cuda or interpreting()
    return x.is_cuda


def linear_ce_impl(x: torch.Tensor) -> str:
    """'triton' (chunked, Triton softmax/grad per chunk), 'chunked' (chunked, pure PyTorch) or 'reference'."""
    if use_triton(x):
        return "triton"
    return "reference" if kernel_mode() == "reference" else "chunked"


@contextlib.contextmanager
def forced_kernels(mode: str):
    """VELOTUNE_KERNELS=mode inside the block (tests and benchmarks compare the paths): 'reference' is the plain
    PyTorch path everywhere, 'auto' the default choice, 'triton' the kernels."""
    old = os.environ.get("VELOTUNE_KERNELS")
    os.environ["VELOTUNE_KERNELS"] = mode
    try:
        yield
    finally:
        if old is None:
            del os.environ["VELOTUNE_KERNELS"]
        else:
            os.environ["VELOTUNE_KERNELS"] = old
