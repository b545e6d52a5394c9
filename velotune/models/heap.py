"""Gives the memory a load freed back to the operating system.

Loading reads each tensor into its own buffer and, for a cast or a quantized base, frees that buffer once the
converted copy exists. glibc keeps such freed blocks in its heap for reuse instead of unmapping them, so the process's
resident memory stays at the load's high-water mark for the rest of the run (measured: the MoE benchmark's
Qwen3-MoE loaded with an NF4 base, 794 MB resident after `vt.load`, 650 MB after `malloc_trim(0)`, with 151 MB of
parameters). Training does not reuse those blocks for its own, differently sized, activations, so they only add to
its peak. One trim after a load costs milliseconds; elsewhere than glibc it does nothing.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
import sys


@functools.cache
def _malloc_trim():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim   # glibc only (musl has none)
    except (OSError, AttributeError):
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


def release_freed_memory() -> bool:
    """Returns the heap's free pages to the system; True where that could be asked (glibc)."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True
