"""Fused LoRA (kernels/lora_ops.py): one linear, q/k/v sharing x, the gated MLP block, over fp and NF4 bases,
against the plain path (VELOTUNE_KERNELS=reference runs the LoRA modules as they are): fp32 to ~1e-6, float64
gradcheck, half precision within plain PyTorch's own error against a float64 oracle; and the fallbacks."""
import os

os.environ["TRITON_INTERPRET"] = "1"  # before any Triton kernel module is imported (triton.jit reads it then)

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from kernel_checks import assert_within_torch_error, errors_vs_fp64, rel_err  # noqa: E402
from velotune.kernels import lora_ops  # noqa: E402
from velotune.kernels.dispatch import forced_kernels as kernels  # noqa: E402
from velotune.kernels.lora_ops import LoraMLP, MLPSpec, SharedInputLora, projection_of  # noqa: E402
from velotune.lora import LoraLinear, add_lora  # noqa: E402
from velotune.models.attention import Attention  # noqa: E402
from velotune.models.llama import Args  # noqa: E402
from velotune.models.mlp import GatedMLP  # noqa: E402

ACTS = ["silu", "gelu", "gelu_pytorch_tanh"]  # SwiGLU, GeGLU exact, GeGLU tanh


def randomize_b(module, seed=3, scale=0.2):
    """LoRA B starts at zero, which hides most mistakes: make every B non-zero."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, LoraLinear):
                m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=g) * scale)
    return module


def lora_mlp_module(act="silu", hidden=64, inter=128, dtype=torch.float32, fused=False, r=4, **lora):
    torch.manual_seed(0)
    mlp = GatedMLP(hidden, inter, act, fused=fused).to(dtype)
    add_lora(mlp, r=r, alpha=2 * r, seed=1, dtype=dtype, **lora)
    return randomize_b(mlp)


def outputs_and_grads(module, x, mode, run=None):
    """(outputs, d x, {param name: grad}) of module(x) under VELOTUNE_KERNELS=mode, for a fixed output grad."""
    module.zero_grad(set_to_none=True)
    x = x.detach().requires_grad_()
    with kernels(mode):
        outs = (run or module)(x)
        outs = outs if isinstance(outs, (tuple, list)) else (outs,)
        g = torch.Generator().manual_seed(11)
        dys = [torch.randn(o.shape, generator=g, dtype=torch.float64).to(o.dtype) for o in outs]
        torch.autograd.backward(outs, dys)
    grads = {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}
    return [o.detach() for o in outs], x.grad.clone(), grads, outs


def assert_fused_matches_plain(module, x, run=None, node=None, tol=1e-6):
    fused, dx, grads, raw = outputs_and_grads(module, x, "auto", run)
    if node is not None:
        assert all(type(o.grad_fn).__name__ == node + "Backward" for o in raw), [o.grad_fn for o in raw]
    plain, dx_ref, grads_ref, _ = outputs_and_grads(module, x, "reference", run)
    assert grads.keys() == grads_ref.keys() and grads
    for y, y_ref in zip(fused, plain):
        assert y.dtype == y_ref.dtype and rel_err(y, y_ref) < tol
    assert rel_err(dx, dx_ref) < tol
    for name in grads:
        assert rel_err(grads[name], grads_ref[name]) < tol, name


# ---------------------------------------------------------------- fp bases, fp32 against the plain path

@pytest.mark.parametrize("bias", [False, True])
def test_lora_linear_fp32_matches_plain(bias):
    torch.manual_seed(0)
    layer = randomize_b(add_lora(nn.Sequential(nn.Linear(40, 24, bias=bias)), r=4, alpha=8, seed=1))
    assert_fused_matches_plain(layer, torch.randn(3, 7, 40), node="SharedInputLora")


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("fused_gate_up", [False, True])
def test_lora_mlp_fp32_matches_plain(act, fused_gate_up):
    mlp = lora_mlp_module(act, hidden=40, inter=56, fused=fused_gate_up)
    assert_fused_matches_plain(mlp, torch.randn(2, 9, 40), node="LoraMLP")


def test_lora_qkv_fp32_matches_plain():
    args = Args(hidden_size=48, num_attention_heads=4, num_key_value_heads=2, head_dim=8, intermediate_size=64,
                num_hidden_layers=1, vocab_size=11)
    args.validate()
    attn = randomize_b(add_lora(Attention(args, 0), r=4, alpha=8, seed=1))
    assert_fused_matches_plain(attn, torch.randn(2, 5, 48), run=attn.project, node="SharedInputLora")


def test_partial_targets_fuse_frozen_linears_too():
    """LoRA on gate only: up and down are frozen plain linears inside the same fused block."""
    mlp = lora_mlp_module("silu", hidden=40, inter=56, targets=["gate_proj"])
    assert_fused_matches_plain(mlp, torch.randn(2, 9, 40), node="LoraMLP")


@pytest.mark.parametrize("targets, keeps_x", [(["down_proj"], False), (["up_proj"], True)])
def test_mlp_keeps_its_input_only_for_gate_or_up_adapters(targets, keeps_x):
    """Frozen gate and up need only their outputs in backward: with LoRA on down alone (or on nothing, as in a
    mixture-of-experts block adapted elsewhere) the block keeps no copy of x; the gradients stay the plain path's."""
    mlp = lora_mlp_module("silu", hidden=40, inter=56, targets=targets)
    x = torch.randn(2, 9, 40, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        mlp(x)
    assert any(t.untyped_storage().data_ptr() == x.untyped_storage().data_ptr() for t in saved) is keeps_x
    assert_fused_matches_plain(mlp, torch.randn(2, 9, 40), node="LoraMLP")


# ---------------------------------------------------------------- float64 gradcheck of the autograd ops

def _projections(modules, dtype):
    return [projection_of(m, dtype, autocast=False) for m in modules]


def test_shared_input_float64_gradcheck():
    torch.manual_seed(0)
    holder = nn.ModuleDict({n: nn.Linear(6, o, bias=n != "k") for n, o in (("q", 5), ("k", 3), ("v", 3))})
    add_lora(holder.double(), r=2, alpha=3, targets=["q", "v"], dtype=torch.float64)
    projections = _projections([holder.q, holder.k, holder.v], torch.float64)
    g = torch.Generator().manual_seed(2)
    tensors = [torch.randn(s, generator=g, dtype=torch.float64, requires_grad=True)
               for s in [(2, 3, 6), (2, 6), (5, 2), (2, 6), (3, 2)]]

    def fused(x, *adapters):
        return SharedInputLora.apply(x, projections, torch.float64, *adapters)
    assert torch.autograd.gradcheck(fused, tensors)


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("fused_gate_up", [False, True])
def test_lora_mlp_float64_gradcheck(act, fused_gate_up):
    mlp = lora_mlp_module(act, hidden=6, inter=5, dtype=torch.float64, fused=fused_gate_up, r=2)
    mods = [mlp.gate_up_proj] if fused_gate_up else [mlp.gate_proj, mlp.up_proj]
    projections = _projections([*mods, mlp.down_proj], torch.float64)
    spec = MLPSpec(projections[:-1], projections[-1], mlp.act, mlp.act_kind, torch.float64)
    adapters = [p.detach().clone().requires_grad_() for n, p in mlp.named_parameters() if "lora_" in n]
    x = torch.randn(2, 3, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *t: LoraMLP.apply(t[0], spec, *t[1:]), (x, *adapters))


# ---------------------------------------------------------------- half precision: within plain PyTorch's error

def _mlp_math(x, wg, wu, wd, ag, bg, au, bu, ad, bd, s=2.0):
    def lin(t, w, a, b):
        return F.linear(t, w) + F.linear(F.linear(t, a), b) * s
    return lin(F.silu(lin(x, wg, ag, bg)) * lin(x, wu, au, bu), wd, ad, bd)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_lora_mlp_half_precision_within_torch_error(dtype):
    """Inputs, bases and adapters rounded to `dtype`; the fused op's error against float64 at most 2x that of
    the same math in plain PyTorch ops in `dtype` (outputs and every gradient)."""
    mlp = lora_mlp_module("silu", hidden=40, inter=56, dtype=dtype)
    projections = _projections([mlp.gate_proj, mlp.up_proj, mlp.down_proj], dtype)
    spec = MLPSpec(projections[:-1], projections[-1], mlp.act, mlp.act_kind, dtype)
    bases = [m.base_layer.weight.detach() for m in (mlp.gate_proj, mlp.up_proj, mlp.down_proj)]
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 9, 40, generator=g, dtype=torch.float64)
    adapters = [p.detach().double() for n, p in mlp.named_parameters() if "lora_" in n]

    def fused(x, *ab):
        return LoraMLP.apply(x, spec, *ab)

    def plain(x, *ab):
        return _mlp_math(x, *bases, *ab)

    def oracle(x, *ab):
        return _mlp_math(x, *(w.double() for w in bases), *ab)
    rows = errors_vs_fp64(fused, plain, oracle, [x, *adapters], dtype)
    assert len(rows) == 8
    assert_within_torch_error(rows)


def test_autocast_bf16_close_to_plain_autocast():
    """fp32 weights under bf16 autocast (the trainer's mixed precision): the fused block computes in bf16 like
    the plain one; measured difference ~4e-3 (two bf16 computations in different orders), bound 2e-2."""
    mlp = lora_mlp_module("silu", hidden=40, inter=56)
    x = torch.randn(2, 9, 40)
    results = {}
    for mode in ("auto", "reference"):
        with kernels(mode), torch.autocast("cpu", dtype=torch.bfloat16):
            y = mlp(x.requires_grad_())
        y.float().square().sum().backward()
        results[mode] = (y.detach().float(), mlp.gate_proj.lora_A.weight.grad.clone())
        mlp.zero_grad(set_to_none=True)
        x = x.detach()
    assert results["auto"][0].dtype == torch.float32 and mlp.gate_proj.lora_A.weight.dtype == torch.float32
    for a, b in zip(results["auto"], results["reference"]):
        assert rel_err(a, b) < 2e-2


# ---------------------------------------------------------------- the Triton pieces (CPU interpreter)

@pytest.mark.parametrize("act", ["silu", "gelu"])
def test_mlp_with_triton_activation_kernels_matches_plain(monkeypatch, act):
    """VELOTUNE_KERNELS=triton: the fused block runs the Triton activation forward and its backward kernel."""
    from velotune.kernels import triton_activations
    calls = []
    original = triton_activations.gated_grads
    monkeypatch.setattr(triton_activations, "gated_grads", lambda *a: calls.append(a[3]) or original(*a))
    mlp = lora_mlp_module(act, hidden=40, inter=56)
    x = torch.randn(2, 5, 40)
    fused, dx, grads, raw = outputs_and_grads(mlp, x, "triton")
    plain, dx_ref, grads_ref, _ = outputs_and_grads(mlp, x, "reference")
    assert calls == [mlp.act_kind[0]] and type(raw[0].grad_fn).__name__ == "LoraMLPBackward"
    assert rel_err(fused[0], plain[0]) < 1e-6 and rel_err(dx, dx_ref) < 1e-6
    for name in grads_ref:
        assert rel_err(grads[name], grads_ref[name]) < 1e-6, name


# ---------------------------------------------------------------- fallbacks to the plain path

def _node(module, x):
    with kernels("auto"):
        y = module(x.requires_grad_())
    return type(y.grad_fn).__name__


def test_falls_back_where_the_fused_path_does_not_apply():
    x = torch.randn(2, 3, 40)
    assert _node(lora_mlp_module(hidden=40, inter=56), x) == "LoraMLPBackward"
    dropped = lora_mlp_module(hidden=40, inter=56, dropout=0.1)
    assert _node(dropped, x) != "LoraMLPBackward"        # dropout in training: plain
    assert _node(dropped.eval(), x) == "LoraMLPBackward"  # dropout is the identity in eval
    assert _node(lora_mlp_module(hidden=40, inter=56, dora=True), x) != "LoraMLPBackward"
    full = GatedMLP(40, 56, "silu")  # trainable bases (full fine-tuning): plain
    assert _node(full, x) != "LoraMLPBackward"
    with kernels("reference"):
        assert type(lora_mlp_module(hidden=40, inter=56)(x).grad_fn).__name__ != "LoraMLPBackward"
    with torch.no_grad():
        assert lora_mlp_module(hidden=40, inter=56)(x).grad_fn is None
    mlp = lora_mlp_module(hidden=40, inter=56)
    mlp.down_proj.merge()  # a merged adapter is a frozen plain linear: still fused
    assert _node(mlp, x) == "LoraMLPBackward"


# ---------------------------------------------------------------- NF4 bases (bitsandbytes Linear4bit, CPU)

def qlora_mlp(act="silu", hidden=64, inter=128, double_quant=True):
    """Widths are multiples of 64 (the NF4 block): bitsandbytes' CPU kernels are right there (quantize.py)."""
    from velotune.models.quantize import quantize_model
    torch.manual_seed(0)
    mlp = GatedMLP(hidden, inter, act)
    quantize_model(mlp, "nf4", compute_dtype=torch.float32, double_quant=double_quant)
    add_lora(mlp, r=4, alpha=8, seed=1)
    return randomize_b(mlp)


@pytest.mark.parametrize("double_quant", [False, True])
def test_nf4_base_mlp_matches_plain_and_dequantizes_again_in_backward(monkeypatch, double_quant):
    pytest.importorskip("bitsandbytes")
    mlp = qlora_mlp("gelu_pytorch_tanh", double_quant=double_quant)
    assert type(mlp.gate_proj.base_layer).__name__ == "Linear4bit"
    calls = []
    original = lora_ops.dequantize_4bit
    monkeypatch.setattr(lora_ops, "dequantize_4bit", lambda *a: calls.append(a[0].shape) or original(*a))
    # our dequantizer is bit-exact with bitsandbytes' (test_kernels_nf4.py): the fused and plain paths agree
    assert_fused_matches_plain(mlp, torch.randn(2, 7, 64), node="LoraMLP")
    # forward: gate, up, down; backward: down (for d h), then gate and up (for d x): never a saved weight
    assert len(calls) == 6


def test_nf4_base_linear_without_input_grad_skips_the_dequantization(monkeypatch):
    pytest.importorskip("bitsandbytes")
    mlp = qlora_mlp()
    calls = []
    original = lora_ops.dequantize_4bit
    monkeypatch.setattr(lora_ops, "dequantize_4bit", lambda *a: calls.append(1) or original(*a))
    with kernels("auto"):
        y = mlp.gate_proj(torch.randn(3, 64))  # an input without grad: d x is not needed
        assert type(y.grad_fn).__name__ == "SharedInputLoraBackward"
        y.sum().backward()
    assert len(calls) == 1 and mlp.gate_proj.lora_A.weight.grad.abs().sum() > 0


def test_nf4_base_float64_gradcheck():
    """The fused op over a 4-bit base, run in float64 (the dequantized values are exact in any float dtype)."""
    pytest.importorskip("bitsandbytes")
    mlp = qlora_mlp()
    layers = [mlp.gate_proj, mlp.up_proj]
    for layer in layers:
        layer.base_layer.compute_dtype = torch.float64
    projections = _projections(layers, torch.float64)
    assert all(p is not None for p in projections)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 64, generator=g, dtype=torch.float64, requires_grad=True)
    adapters = [p.detach().double().requires_grad_() for m in layers for p in (m.lora_A.weight, m.lora_B.weight)]
    assert torch.autograd.gradcheck(lambda *t: SharedInputLora.apply(t[0], projections, torch.float64, *t[1:]),
                                    (x, *adapters), fast_mode=True)


def test_nf4_base_mlp_with_triton_kernels_matches_plain(monkeypatch):
    """VELOTUNE_KERNELS=triton: the NF4 dequantization and the activation run as Triton kernels (interpreted)."""
    pytest.importorskip("bitsandbytes")
    from velotune.kernels import triton_nf4
    calls = []
    original = triton_nf4.dequantize_4bit_triton
    monkeypatch.setattr(triton_nf4, "dequantize_4bit_triton", lambda *a: calls.append(1) or original(*a))
    mlp = qlora_mlp()
    x = torch.randn(2, 3, 64)
    fused, dx, grads, _ = outputs_and_grads(mlp, x, "triton")
    plain, dx_ref, grads_ref, _ = outputs_and_grads(mlp, x, "reference")
    assert len(calls) == 6
    assert rel_err(fused[0], plain[0]) < 1e-6 and rel_err(dx, dx_ref) < 1e-6
    for name in grads_ref:
        assert rel_err(grads[name], grads_ref[name]) < 1e-6, name


def test_whole_model_on_the_triton_path_matches_the_reference():
    """Every op of a LoRA model's training step on its Triton path (interpreted): RMSNorm, RoPE, fused LoRA
    blocks with Triton activations, chunked cross-entropy with the Triton kernel. Measured: loss 1e-7,
    adapter gradients 6e-7."""
    from test_memory import tiny_model
    ids = torch.randint(0, 101, (2, 9), generator=torch.Generator().manual_seed(3))
    results = {}
    for mode in ("triton", "reference"):
        model = tiny_model(layers=2)
        with kernels(mode):
            loss = model(ids, labels=ids, return_logits=False).loss
            loss.backward()
        results[mode] = loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    (loss, grads), (loss_ref, grads_ref) = results["triton"], results["reference"]
    assert rel_err(loss, loss_ref) < 1e-6 and len(grads) == 2 * 7 * 2
    for name in grads_ref:
        assert rel_err(grads[name], grads_ref[name]) < 2e-6, name


def test_an_adapter_kind_the_kernels_do_not_know_is_refused_loudly():
    """A linear carrying adapter parameters without describing itself (AdaptedLinear.adapter_view) would be
    taken for a module without adapter: the fused path refuses it instead."""
    from velotune.errors import UnsupportedError
    from velotune.kernels.lora_ops import lora_projections

    class HomeMadeLora(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.base = torch.nn.Linear(8, 8)
            self.lora_A = torch.nn.Linear(8, 2, bias=False)

        def forward(self, x):
            return self.base(x) + self.lora_A(x).sum()

    x = torch.randn(3, 8, requires_grad=True)
    with pytest.raises(UnsupportedError, match="HomeMadeLora carries adapter parameters"):
        lora_projections([HomeMadeLora()], x)
