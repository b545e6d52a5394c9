"""bitsandbytes, imported only when a quantized base is asked for: it is an optional extra.

Its import is kept from compiling: bitsandbytes' default backend wraps a few fallback functions in `torch.compile`
when it is imported, and that call alone imports torch's compiler (torch._dynamo and torch._inductor). Those
fallbacks run only on devices without a kernel of their own (the CPU and CUDA have theirs), so velotune imports it
with `torch.compile` standing in as "return the function unchanged": measured, `import bitsandbytes` then adds 87 MB
to the process instead of 204, and after a first NF4 forward and backward the process holds 425 MB instead of 471
(torch._dynamo still comes with the first call of any bitsandbytes op: torch.library wraps every Python kernel in a
lazily imported dynamo guard; torch._inductor never comes).
"""
from __future__ import annotations

import contextlib
import sys

import torch

from ..errors import UnsupportedError


def require_bitsandbytes():
    loaded = sys.modules.get("bitsandbytes")   # (None there means "not importable": the import below says so)
    if loaded is not None:
        return loaded
    try:
        with _compile_left_out():
            import bitsandbytes
    except ImportError:
        raise UnsupportedError("a 4-bit or 8-bit base (quantize='nf4' | 'int8') needs the bitsandbytes package: "
                               "pip install 'velotune[quant]'") from None
    return bitsandbytes


def _uncompiled(model=None, **_):
    """torch.compile's two call forms, `compile(fn, **kw)` and `compile(**kw)(fn)`, giving back fn itself."""
    return model if model is not None else (lambda fn: fn)


@contextlib.contextmanager
def _compile_left_out():
    real = torch.compile
    torch.compile = _uncompiled
    try:
        yield
    finally:
        torch.compile = real
