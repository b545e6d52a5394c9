"""Triton kernels (RMSNorm, RoPE, SwiGLU/GeGLU) against their PyTorch references, on the CPU interpreter.

TRITON_INTERPRET is set before any velotune Triton module is imported: `triton.jit` reads it when it
decorates. Shapes are small and odd (each interpreted program instance costs ~1 ms).
"""
import os

os.environ["TRITON_INTERPRET"] = "1"

import subprocess  # noqa: E402
import sys  # noqa: E402
import textwrap  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

from kernel_checks import (assert_rms_norm_within_torch_error, assert_within_torch_error, errors_vs_fp64,  # noqa: E402
                           rel_err, rms_norm_oracle, round_bf16_like_a_gpu)
from velotune.kernels import apply_rope, geglu, rms_norm, swiglu  # noqa: E402
from velotune.kernels.activations import geglu_reference, swiglu_reference  # noqa: E402
from velotune.kernels.dispatch import use_triton  # noqa: E402
from velotune.kernels.rmsnorm import rms_norm_reference  # noqa: E402
from velotune.kernels.rope import apply_rope_reference  # noqa: E402
from velotune.kernels.triton_activations import TritonGated, geglu_triton, swiglu_triton  # noqa: E402
from velotune.kernels.triton_rmsnorm import TritonRMSNorm, rms_norm_triton  # noqa: E402
from velotune.kernels.triton_rope import TritonRoPE, apply_rope_triton  # noqa: E402

LOW = [torch.float16, torch.bfloat16]


@pytest.fixture(autouse=True, scope="module")
def _gpu_bf16_rounding():
    with pytest.MonkeyPatch.context() as mp:
        round_bf16_like_a_gpu(mp)
        yield


@pytest.fixture
def triton_mode(monkeypatch):
    monkeypatch.setenv("VELOTUNE_KERNELS", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def _grads(out, inputs, dy):
    outs = out if isinstance(out, tuple) else (out,)
    dys = dy if isinstance(dy, tuple) else (dy,)
    return torch.autograd.grad(outs, inputs, dys)


# ---------------------------------------------------------------- dispatch

def test_dispatch_rule(monkeypatch):
    x = torch.zeros(2)
    monkeypatch.delenv("VELOTUNE_KERNELS", raising=False)
    assert not use_triton(x)  # auto: CPU tensors get the reference
    monkeypatch.setenv("VELOTUNE_KERNELS", "reference")
    assert not use_triton(x)
    monkeypatch.setenv("VELOTUNE_KERNELS", "triton")
    assert use_triton(x)  # TRITON_INTERPRET=1 in this module
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert not use_triton(x)  # no GPU, no interpreter: a launch would fail, so the reference runs
    monkeypatch.setenv("VELOTUNE_KERNELS", "fast")
    with pytest.raises(ValueError, match="VELOTUNE_KERNELS"):
        use_triton(x)


# ---------------------------------------------------------------- RMSNorm

@pytest.mark.parametrize("offset", [0.0, 1.0])
def test_rmsnorm_fp32_matches_reference(triton_mode, offset):
    x = torch.randn(3, 37, 96, requires_grad=True)
    w = (torch.randn(96) * 0.1 + (0.0 if offset else 1.0)).requires_grad_()
    y = rms_norm(x, w, 1e-6, offset)
    assert type(y.grad_fn).__name__ == TritonRMSNorm.__name__ + "Backward"
    yr = rms_norm_reference(x, w, 1e-6, offset)
    dy = torch.randn_like(y)
    assert y.dtype == yr.dtype and rel_err(y, yr) < 1e-6
    for g, gr in zip(_grads(y, (x, w), dy), _grads(yr, (x, w), dy)):
        assert rel_err(g, gr) < 2e-6


@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("offset", [0.0, 1.0])
def test_rmsnorm_low_precision_within_torch_error(dtype, offset):
    assert_rms_norm_within_torch_error(rms_norm_triton, dtype, offset)


def test_rmsnorm_weight_first_rule_matches_reference(triton_mode):
    """gpt-oss / OLMo 2 (offset 0, weight first): the kernel's values and gradients are the reference's."""
    x = torch.randn(3, 37, 96, requires_grad=True)
    w = (torch.randn(96) * 0.1 + 1.0).requires_grad_()
    y = rms_norm(x, w, 1e-6, 0.0, True)
    assert type(y.grad_fn).__name__ == TritonRMSNorm.__name__ + "Backward"
    yr = rms_norm_reference(x, w, 1e-6, 0.0, True)
    dy = torch.randn_like(y)
    assert y.dtype == yr.dtype and rel_err(y, yr) < 1e-6
    for g, gr in zip(_grads(y, (x, w), dy), _grads(yr, (x, w), dy)):
        assert rel_err(g, gr) < 2e-6
    xb, wb = x.detach().to(torch.bfloat16), w.detach().to(torch.bfloat16)
    with torch.no_grad():  # bf16: one cast after the weight, as the reference (the interpreter rounds like a GPU)
        assert rel_err(rms_norm(xb, wb, 1e-6, 0.0, True), rms_norm_reference(xb, wb, 1e-6, 0.0, True)) < 4e-3


def test_rmsnorm_mixed_dtypes_follow_reference():
    """llama rule with an fp32 weight on bf16 activations: output promotes to fp32, as the reference."""
    x = torch.randn(5, 40, dtype=torch.bfloat16)
    w = torch.randn(40)
    y, yr = rms_norm_triton(x, w, 1e-5), rms_norm_reference(x, w, 1e-5)
    assert y.dtype == yr.dtype == torch.float32 and rel_err(y, yr) < 1e-6
    y, yr = rms_norm_triton(x, w, 1e-5, 1.0), rms_norm_reference(x, w, 1e-5, 1.0)
    assert y.dtype == yr.dtype == torch.bfloat16 and rel_err(y, yr) < 1e-2


@pytest.mark.parametrize("offset", [0.0, 1.0])
def test_rmsnorm_float64_gradcheck(offset):
    x = torch.randn(2, 3, 7, dtype=torch.float64, requires_grad=True)
    w = torch.randn(7, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: rms_norm_triton(a, b, 1e-6, offset), (x, w), fast_mode=True)
    y = rms_norm_triton(x, w, 1e-6, offset)
    yo = rms_norm_oracle(offset)(x, w)
    assert rel_err(y, yo) < 1e-13
    dy = torch.randn_like(y)
    for g, go in zip(_grads(y, (x, w), dy), _grads(yo, (x, w), dy)):
        assert rel_err(g, go) < 1e-12


# ---------------------------------------------------------------- RoPE

def _cos_sin(B, T, R, dtype, per_row=True):
    g = torch.Generator().manual_seed(3)
    pos = torch.randint(0, 500, (B if per_row else 1, T), generator=g).double()  # packed / padded rows
    inv = 1.0 / (10000 ** (torch.arange(0, R, 2, dtype=torch.float64) / R))
    emb = torch.cat([pos[..., None] * inv] * 2, dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def _rope_inputs(dtype, B=2, T=37, Hq=4, Hk=2, D=24):
    q = torch.randn(B, T, Hq, D, dtype=dtype).transpose(1, 2)  # the models pass a transposed view
    k = torch.randn(B, Hk, T, D, dtype=dtype)
    return q, k


@pytest.mark.parametrize("rot,per_row", [(24, True), (16, True), (16, False)])
def test_rope_fp32_matches_reference(triton_mode, rot, per_row):
    q, k = _rope_inputs(torch.float32)
    q.requires_grad_(), k.requires_grad_()
    cos, sin = _cos_sin(2, 37, rot, torch.float32, per_row)
    out = apply_rope(q, k, cos, sin)
    assert type(out[0].grad_fn).__name__ == TritonRoPE.__name__ + "Backward"
    ref = apply_rope_reference(q, k, cos, sin)
    dys = (torch.randn_like(ref[0]), torch.randn_like(ref[1]))
    for o, r in zip(out, ref):
        assert o.shape == r.shape and rel_err(o, r) < 1e-6
    for g, gr in zip(_grads(out, (q, k), dys), _grads(ref, (q, k), dys)):
        assert rel_err(g, gr) < 1e-6


@pytest.mark.parametrize("dtype", LOW)
def test_rope_low_precision_within_torch_error(dtype):
    q, k = _rope_inputs(torch.float64)
    cos, sin = _cos_sin(2, 37, 16, dtype)
    rows = errors_vs_fp64(lambda a, b: apply_rope_triton(a, b, cos, sin),
                          lambda a, b: apply_rope_reference(a, b, cos, sin),
                          lambda a, b: apply_rope_reference(a, b, cos.double(), sin.double()), [q, k], dtype)
    assert_within_torch_error(rows)


def test_rope_float64_gradcheck():
    q = torch.randn(1, 2, 3, 6, dtype=torch.float64, requires_grad=True)
    k = torch.randn(1, 1, 3, 6, dtype=torch.float64, requires_grad=True)
    cos, sin = _cos_sin(1, 3, 4, torch.float64)
    assert torch.autograd.gradcheck(lambda a, b: apply_rope_triton(a, b, cos, sin), (q, k), fast_mode=True)


def test_rope_backward_is_rotation_by_minus_sin():
    """The gradient of a rotation is the inverse rotation: rotating a rotated vector back gives it again."""
    q, k = _rope_inputs(torch.float32, T=5)
    cos, sin = _cos_sin(2, 5, 24, torch.float32)
    rq, rk = apply_rope_triton(q, k, cos, sin)
    back_q, back_k = apply_rope_triton(rq, rk, cos, -sin)
    assert rel_err(back_q, q) < 1e-6 and rel_err(back_k, k) < 1e-6


# ---------------------------------------------------------------- SwiGLU / GeGLU

ACTS = {
    "swiglu": (swiglu_triton, swiglu_reference, ()),
    "geglu_erf": (geglu_triton, geglu_reference, ("none",)),
    "geglu_tanh": (geglu_triton, geglu_reference, ("tanh",)),
}


def _gate_up(dtype, shape=(3, 37, 96)):
    gate_up = torch.randn(*shape[:-1], 2 * shape[-1], dtype=dtype) * 2.5
    return gate_up.chunk(2, dim=-1)  # row-strided views, as a fused gate_up projection gives


@pytest.mark.parametrize("name", list(ACTS))
def test_activation_fp32_matches_reference(triton_mode, name):
    _, ref, extra = ACTS[name]
    public = swiglu if name == "swiglu" else geglu
    gate, up = (t.requires_grad_() for t in _gate_up(torch.float32))
    y = public(gate, up, *extra)
    assert type(y.grad_fn).__name__ == TritonGated.__name__ + "Backward"
    yr = ref(gate, up, *extra)
    dy = torch.randn_like(y)
    assert rel_err(y, yr) < 1e-6
    for g, gr in zip(_grads(y, (gate, up), dy), _grads(yr, (gate, up), dy)):
        assert rel_err(g, gr) < 1e-6


@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("name", list(ACTS))
def test_activation_low_precision_within_torch_error(dtype, name):
    kernel, ref, extra = ACTS[name]
    gate, up = (t.contiguous() for t in _gate_up(torch.float64))
    rows = errors_vs_fp64(lambda a, b: kernel(a, b, *extra), lambda a, b: ref(a, b, *extra),
                          lambda a, b: ref(a, b, *extra), [gate, up], dtype)
    assert_within_torch_error(rows)


@pytest.mark.parametrize("name", list(ACTS))
def test_activation_float64_gradcheck(name):
    kernel, ref, extra = ACTS[name]
    gate = (torch.randn(3, 5, dtype=torch.float64) * 3).requires_grad_()
    up = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: kernel(a, b, *extra), (gate, up))
    assert rel_err(kernel(gate, up, *extra), ref(gate, up, *extra)) < 1e-13


def test_activation_saves_only_gate_and_up():
    gate, up = (t.requires_grad_() for t in _gate_up(torch.float32, (4, 33)))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        swiglu_triton(gate, up)
    assert len(saved) == 2 and all(s.shape == gate.shape for s in saved)


# ---------------------------------------------------------------- the real CUDA backend

_COMPILE_ALL = textwrap.dedent("""
    import triton, triton.language as tl
    from triton.compiler import ASTSource
    from triton.backends.compiler import GPUTarget
    from velotune.kernels import triton_rmsnorm as R, triton_rope as P, triton_activations as A
    from velotune.kernels import triton_cross_entropy as C
    def build(fn, types, consts, warps=4):
        sig = dict(zip(fn.arg_names, types + ["constexpr"] * len(consts)))
        triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts),
                       target=GPUTarget("cuda", 90, 32), options={"num_warps": warps})
    f32 = tl.float32
    build(R._rms_norm_fwd, ["*bf16"] * 3 + ["*fp32"] + ["i32"] * 4 + ["fp32"] * 2,
          {"GEMMA": False, "CDT": f32, "BLOCK_M": 1, "BLOCK_N": 4096}, 8)
    build(R._rms_norm_bwd, ["*bf16"] * 3 + ["*fp32", "*bf16", "*fp32"] + ["i32"] * 5 + ["fp32"],
          {"GEMMA": True, "CDT": f32, "BLOCK_M": 4, "BLOCK_N": 128})
    build(P._rope_kernel, ["*bf16"] * 4 + ["i32"] * 18,
          {"BACKWARD": True, "HAS_PASS": True, "CDT": f32, "BLOCK_R": 64, "BLOCK_HALF": 64, "BLOCK_PASS": 32})
    build(A._gated_bwd, ["*bf16"] * 5 + ["i32"] * 7, {"KIND": 2, "CDT": f32, "BLOCK_M": 1, "BLOCK_N": 4096}, 8)
    build(A._gated_fwd, ["*bf16"] * 3 + ["i32"] * 5, {"KIND": 1, "CDT": f32, "BLOCK_M": 1, "BLOCK_N": 4096}, 8)
    build(C._ce_rows_grad, ["*bf16", "*i64", "*fp32", "*fp32", "i32", "i32", "i32", "i32", "fp32"],
          {"HAS_SOFTCAP": True, "WRITE_GRAD": True, "CDT": f32, "BLOCK_V": 4096}, 8)
    print("compiled")
""")


def test_kernels_compile_for_cuda_sm90():
    """The interpreter skips type checks and lowering: compile each kernel for an H100 target (no GPU needed)."""
    pytest.importorskip("triton.backends.nvidia.compiler")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", _COMPILE_ALL], env=env, capture_output=True, text=True,
                          timeout=300)
    if proc.returncode and "ptxas" in proc.stderr and "not found" in proc.stderr.lower():
        pytest.skip("triton's ptxas is not available here")
    assert proc.returncode == 0 and "compiled" in proc.stdout, proc.stderr[-3000:]
