"""The CPU's RMSNorm (one PyTorch autograd op, rmsnorm_torch.py): the same values and gradients as the reference
chain, float64 gradcheck, bf16/fp16 within PyTorch's own error against fp64, and less saved for backward."""
import pytest
import torch

from kernel_checks import assert_rms_norm_within_torch_error, rel_err, rms_norm_oracle
from velotune.kernels import rms_norm
from velotune.kernels.rmsnorm import rms_norm_reference
from velotune.kernels.rmsnorm_torch import TorchRMSNorm, rms_norm_torch


def _grads(y, inputs, dy):
    return torch.autograd.grad(y, [t for t in inputs if t.requires_grad], dy)


def _inputs(offset, dtype=torch.float32, weight_grad=True):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 37, 96, generator=g, dtype=dtype).requires_grad_()
    w = (torch.randn(96, generator=g) * 0.1 + (0.0 if offset else 1.0)).to(dtype).requires_grad_(weight_grad)
    return x, w


@pytest.mark.parametrize("weight_grad", [True, False])
@pytest.mark.parametrize("offset", [0.0, 1.0])
def test_fp32_matches_reference_and_is_the_cpu_default(offset, weight_grad):
    x, w = _inputs(offset, weight_grad=weight_grad)
    y = rms_norm(x, w, 1e-6, offset)
    assert type(y.grad_fn).__name__ == TorchRMSNorm.__name__ + "Backward"
    yr = rms_norm_reference(x, w, 1e-6, offset)
    dy = torch.randn_like(y)
    dy_before, x_before = dy.clone(), x.detach().clone()
    assert y.dtype == yr.dtype and rel_err(y, yr) < 1e-6
    grads, ref = _grads(y, (x, w), dy), _grads(yr, (x, w), dy)
    assert len(grads) == len(ref) == (2 if weight_grad else 1)
    for g, gr in zip(grads, ref):
        assert rel_err(g, gr) < 2e-6
    assert torch.equal(dy, dy_before) and torch.equal(x, x_before)  # nothing the caller holds changed in place


def test_reference_mode_forces_the_chain(monkeypatch):
    x, w = _inputs(0.0)
    monkeypatch.setenv("VELOTUNE_KERNELS", "reference")
    assert type(rms_norm(x, w, 1e-6).grad_fn).__name__ != TorchRMSNorm.__name__ + "Backward"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("offset", [0.0, 1.0])
def test_low_precision_within_torch_error(dtype, offset):
    assert_rms_norm_within_torch_error(rms_norm_torch, dtype, offset)


def test_mixed_dtypes_follow_reference():
    """llama rule with an fp32 weight on bf16 activations promotes to fp32; gemma's casts back to bf16."""
    x = torch.randn(5, 40, dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(40, requires_grad=True)
    for offset, dtype in ((0.0, torch.float32), (1.0, torch.bfloat16)):
        y, yr = rms_norm_torch(x, w, 1e-5, offset), rms_norm_reference(x, w, 1e-5, offset)
        assert y.dtype == yr.dtype == dtype and rel_err(y, yr) < 1e-2
        dy = torch.randn_like(y)
        for g, gr in zip(_grads(y, (x, w), dy), _grads(yr, (x, w), dy)):
            assert g.dtype == gr.dtype and rel_err(g, gr) < 2e-2


@pytest.mark.parametrize("offset", [0.0, 1.0])
def test_float64_gradcheck_andrms_norm_oracle(offset):
    x = torch.randn(2, 3, 7, dtype=torch.float64, requires_grad=True)
    w = torch.randn(7, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: rms_norm_torch(a, b, 1e-6, offset), (x, w), fast_mode=True)
    y, yo = rms_norm_torch(x, w, 1e-6, offset), rms_norm_oracle(offset)(x, w)
    assert rel_err(y, yo) < 1e-13
    dy = torch.randn_like(y)
    for g, go in zip(_grads(y, (x, w), dy), _grads(yo, (x, w), dy)):
        assert rel_err(g, go) < 1e-12


def _saved_bytes(fn, *inputs):
    seen = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(*inputs)
    return sum(seen.values())


def test_saves_only_x_and_rstd():
    """bf16 input [N, D]: the reference chain saves the fp32 copy (4 bytes/element), the bf16 normalised value (2)
    and x or rsqrt; this op saves x (2 bytes/element) + weight + one fp32 rstd per row."""
    x = torch.randn(64, 256, dtype=torch.bfloat16, requires_grad=True)
    w = torch.ones(256, dtype=torch.bfloat16, requires_grad=True)
    ours = _saved_bytes(lambda a, b: rms_norm_torch(a, b, 1e-6), x, w)
    assert ours == x.numel() * 2 + w.numel() * 2 + 64 * 4
    assert ours / _saved_bytes(lambda a, b: rms_norm_reference(a, b, 1e-6), x, w) < 0.4


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_weight_first_rule_multiplies_before_the_one_cast(dtype):
    """gpt-oss and OLMo 2 (offset 0, weight_first): the CPU op and the reference both give round(normed * w),
    bit for bit, the input's dtype out; Llama's order (round(normed) * w) differs; the gradients agree."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(4, 33, 80, generator=g).to(dtype).requires_grad_()
    w = (torch.randn(80, generator=g) * 0.3 + 1.0).to(dtype).requires_grad_()
    y = rms_norm(x, w, 1e-5, 0.0, True)
    assert type(y.grad_fn).__name__ == TorchRMSNorm.__name__ + "Backward"
    x32 = x.detach().float()
    want = (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + 1e-5) * w.detach().float()).to(dtype)
    assert y.dtype == dtype and torch.equal(y.detach(), want)
    assert torch.equal(rms_norm_reference(x, w, 1e-5, 0.0, True).detach(), want)
    assert not torch.equal(rms_norm(x, w, 1e-5).detach(), want)  # Llama's order rounds twice
    dy = torch.randn(y.shape, generator=g).to(dtype)
    ref = rms_norm_reference(x, w, 1e-5, 0.0, True)
    for got, exp in zip(_grads(y, (x, w), dy), _grads(ref, (x, w), dy)):
        assert rel_err(got, exp) < 1e-2


def test_weight_first_float64_gradcheck():
    x = torch.randn(2, 3, 7, dtype=torch.float64, requires_grad=True)
    w = torch.randn(7, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: rms_norm_torch(a, b, 1e-6, 0.0, True), (x, w), fast_mode=True)
