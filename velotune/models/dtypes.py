"""Dtype names as configs and the command line write them, and the dtype a model loads in by default."""
from __future__ import annotations

import logging
import os

import torch

log = logging.getLogger("velotune")

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def parse_dtype(dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def default_dtype(device, config: dict | None = None) -> torch.dtype:
    """bf16 on GPUs. On the CPU: a bf16 checkpoint stays bf16 where the processor multiplies bf16 natively
    (AVX512-BF16 or AMX: about 2x the fp32 matmul rate here, and half the memory); everything else runs in fp32,
    since fp16 and emulated bf16 matmuls are many times slower than fp32 on CPUs."""
    if torch.device(device).type == "cuda":
        return torch.bfloat16
    stored = (config or {}).get("dtype") or (config or {}).get("torch_dtype")
    if stored == "bfloat16" and cpu_has_native_bf16():
        return torch.bfloat16
    return torch.float32


def cpu_has_native_bf16() -> bool:
    """Whether this CPU has bf16 dot-product instructions (AVX512-BF16 or AMX); VELOTUNE_CPU_BF16=0/1 overrides."""
    forced = os.environ.get("VELOTUNE_CPU_BF16")
    if forced in ("0", "1"):
        return forced == "1"
    return _cpu_has("_is_avx512_bf16_supported", "_is_amx_tile_supported")


def _cpu_has(*probes: str) -> bool:
    """Whether any of torch.cpu's private feature probes answers yes."""
    cpu = getattr(torch, "cpu", None)
    for probe in probes:
        check = getattr(cpu, probe, None)
        try:
            if check is not None and check():
                return True
        except Exception:  # private probes: absent or failing means "not known to be native"
            continue
    return False


_warned_slow: set = set()


def warn_if_emulated(dtype: torch.dtype, device) -> None:
    """Warns once when bf16 or fp16 is asked for on a CPU that has no instructions for it: there every matmul runs
    through torch's scalar fallback, 40-100x slower than fp32 (measured on an AVX2-only EPYC: bf16 mm 1.1 GFLOP/s
    against 49 in fp32), which looks like a hang rather than a choice."""
    if torch.device(device).type != "cpu" or dtype not in (torch.bfloat16, torch.float16):
        return
    if (dtype == torch.bfloat16 and cpu_has_native_bf16()) or dtype in _warned_slow:
        return
    if dtype == torch.float16 and _cpu_has("_is_amx_fp16_supported"):
        return
    _warned_slow.add(dtype)
    name = str(dtype).replace("torch.", "")
    log.warning(
        "%s on this CPU (%s, no %s instructions): its matmuls are emulated, tens of times slower than float32; "
        "load with dtype='float32' (what 'auto' picks here) unless memory forces %s", name,
        torch.backends.cpu.get_cpu_capability(), "AVX512-BF16/AMX" if dtype == torch.bfloat16 else "AMX-FP16", name)
