"""Shared checks for the kernel tests: an op in a low-precision dtype against a float64 oracle, with the bound
set by plain PyTorch's own error in that dtype on the same (rounded) inputs."""
from __future__ import annotations

import torch


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    a, ref = a.double(), ref.double()
    return ((a - ref).norm() / ref.norm().clamp(min=1e-30)).item()


def _outputs_and_grads(fn, inputs, dys):
    outs = fn(*inputs)
    outs = outs if isinstance(outs, tuple) else (outs,)
    grads = torch.autograd.grad(outs, [x for x in inputs if x.requires_grad], dys)
    return [o.detach() for o in outs], list(grads)


def errors_vs_fp64(kernel_fn, torch_fn, oracle_fn, inputs64, dtype, seed=1):
    """Errors (relative norm) of every output and every input gradient, for the kernel and for plain PyTorch
    in `dtype`, each against `oracle_fn` in float64 on the same rounded inputs and output gradients.
    Returns a list of (name, kernel_err, torch_err)."""
    rounded = [x.detach().to(dtype) if x.is_floating_point() else x for x in inputs64]
    probe = oracle_fn(*inputs64)
    probe = probe if isinstance(probe, tuple) else (probe,)
    g = torch.Generator().manual_seed(seed)
    dys = [torch.randn(o.shape, generator=g, dtype=torch.float64).to(dtype) for o in probe]

    def leaves(dt):
        return [x.to(dt).requires_grad_() if x.is_floating_point() else x for x in rounded]

    oracle = _outputs_and_grads(oracle_fn, leaves(torch.float64), [d.double() for d in dys])
    kernel = _outputs_and_grads(kernel_fn, leaves(dtype), dys)
    plain = _outputs_and_grads(torch_fn, leaves(dtype), dys)
    rows = []
    for kind, o, k, p in (("out", oracle[0], kernel[0], plain[0]), ("grad", oracle[1], kernel[1], plain[1])):
        for i, (oi, ki, pi) in enumerate(zip(o, k, p)):
            assert ki.dtype == pi.dtype and ki.shape == pi.shape, (kind, i, ki.dtype, pi.dtype, ki.shape, pi.shape)
            rows.append((f"{kind}{i}", rel_err(ki, oi), rel_err(pi, oi)))
    return rows


def assert_within_torch_error(rows, factor=2.0, tiny=1e-6):
    """Kernel error at most `factor` x PyTorch's own error in the same dtype (plus `tiny`)."""
    for name, k_err, t_err in rows:
        assert k_err <= factor * t_err + tiny, (name, k_err, t_err)


def round_bf16_like_a_gpu(monkeypatch) -> None:
    """The Triton interpreter (3.x) turns fp32 into bf16 by truncating the mantissa; compiled kernels round to
    nearest even (LLVM fptrunc). Make the interpreter round as the GPU does, so bf16 bounds test our kernels
    and not that emulation gap."""
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter

    original = interpreter.InterpreterBuilder.cast_impl

    def cast_impl(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            rounded = torch.from_numpy(np.ascontiguousarray(src.data)).to(torch.bfloat16)
            return interpreter.TensorHandle(rounded.view(torch.int16).numpy().view(np.uint16), tl.bfloat16)
        return original(self, src, dst_type)

    monkeypatch.setattr(interpreter.InterpreterBuilder, "cast_impl", cast_impl)


def rms_norm_oracle(offset: float, eps: float = 1e-6):
    """RMSNorm in float64 all through, the family's rule (weight, or 1 + weight for Gemma) without rounding."""
    def f(x, w):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * (offset + w)
    return f


def assert_rms_norm_within_torch_error(norm_fn, dtype, offset: float, eps: float = 1e-6):
    """`norm_fn(x, w, eps, offset)` in `dtype` on a small odd shape: outputs and gradients within 2x the error of
    the reference chain in the same dtype, both against the float64 oracle."""
    from velotune.kernels.rmsnorm import rms_norm_reference
    x = torch.randn(3, 37, 96, dtype=torch.float64)
    w = torch.randn(96, dtype=torch.float64) * 0.1 + (0.0 if offset else 1.0)
    rows = errors_vs_fp64(lambda a, b: norm_fn(a, b, eps, offset),
                          lambda a, b: rms_norm_reference(a, b, eps, offset), rms_norm_oracle(offset, eps), [x, w],
                          dtype)
    assert_within_torch_error(rows)
