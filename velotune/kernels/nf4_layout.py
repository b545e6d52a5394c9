"""The bitsandbytes 4-bit layout's two small pieces both dequantizers read (nf4.py's reference, triton_nf4.py's
kernel): the 16-entry code table and the packed bytes."""
from __future__ import annotations

import torch

# The NF4 data type (QLoRA, Dettmers et al. 2023): 16 quantiles of N(0, 1) normalised to [-1, 1], with an exact 0.
NF4_CODE = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)


def code_table(state, device) -> torch.Tensor:
    """The state's 16-entry table (NF4 or FP4) in fp32 on `device`."""
    code = getattr(state, "code", None)
    if code is None:
        if state.quant_type != "nf4":
            raise ValueError(f"4-bit state of type {state.quant_type!r} carries no code table")
        return torch.tensor(NF4_CODE, dtype=torch.float32, device=device)
    return code.to(device=device, dtype=torch.float32)


def packed_bytes(packed: torch.Tensor) -> torch.Tensor:
    """The packed weight as a flat uint8 tensor (bitsandbytes may store it as another dtype, e.g. for FSDP)."""
    flat = packed.reshape(-1)
    return flat if flat.dtype == torch.uint8 else flat.view(torch.uint8)
