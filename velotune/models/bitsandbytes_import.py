"""bitsandbytes, imported only when a quantized base is asked for: it is an optional extra."""
from __future__ import annotations

from ..errors import UnsupportedError


def require_bitsandbytes():
    try:
        import bitsandbytes
    except ImportError:
        raise UnsupportedError("a 4-bit or 8-bit base (quantize='nf4' | 'int8') needs the bitsandbytes package: "
                               "pip install 'velotune[quant]'") from None
    return bitsandbytes
