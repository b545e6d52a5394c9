"""Fused LoRA: linears (with or without an adapter) over a frozen base, with a hand-written backward.

    y_i = x W_i^T + b_i + s_i (x A_i^T) B_i^T        for every projection i reading the same x

What backward keeps: x, A, B. x A^T ([tokens, r]) is recomputed; the base weight is never saved (a 4-bit base
is dequantized again in backward, and a dequantized copy never outlives the matmul that needs it). The MLP
block keeps x, gate and up; act(gate) and act(gate) * up are recomputed in backward.

`lora_projections` (q/k/v, or one linear) and `lora_mlp` (gate/up -> act -> down) return None when the modules
cannot take the fused path (LoRA dropout in training, DoRA, an int8 or trainable base, dtype mismatch,
VELOTUNE_KERNELS=reference, no autograd): the caller then runs its plain modules, which give the same numbers.
An adapted linear describes itself to the kernels through `AdaptedLinear.adapter_view()` (lora/ implements it;
kernels/ does not import lora/); a module carrying adapter parameters without that description is refused
loudly, never run on the plain path unnoticed.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UnsupportedError
from .dispatch import kernel_mode, use_triton
from .nf4 import dequantize_4bit, is_4bit_linear


@dataclass(frozen=True, eq=False)
class AdapterView:
    """What the fused kernels need of an adapted linear: y = base(x) + scaling * (x A^T) B^T. `a`/`b` are None
    when the adapter is merged into the base (the base alone is then the whole linear)."""
    base: nn.Module
    scaling: float
    a: torch.Tensor | None
    b: torch.Tensor | None


class AdaptedLinear(nn.Module):
    """Base class of linears carrying an adapter (LoRA and its variants): the one interface the kernels read."""

    def adapter_view(self) -> AdapterView | None:
        """The layer as the fused kernels compute it, or None when only its own forward is right (e.g. dropout
        on the adapter's input while training, DoRA's weight normalisation)."""
        raise NotImplementedError(f"{type(self).__name__}.adapter_view")


@dataclass(frozen=True, eq=False)
class Projection:
    """One linear of a fused group: a frozen base (plain or 4-bit) and, when `lora`, its adapter (scaling, A, B)."""
    base: nn.Module
    lora: bool
    scaling: float = 0.0
    a: torch.Tensor | None = None
    b: torch.Tensor | None = None

    def weight(self, dtype: torch.dtype) -> torch.Tensor:
        """The base weight [out, in] in `dtype`: the parameter itself, or a fresh dequantized copy."""
        w = self.base.weight
        if is_4bit_linear(self.base):
            return dequantize_4bit(w.data, w.quant_state, dtype)
        return w if w.dtype == dtype else w.to(dtype)

    def bias(self, dtype: torch.dtype):
        b = self.base.bias
        return None if b is None else b.to(dtype)


def projection_of(module: nn.Module, dtype: torch.dtype, autocast: bool) -> Projection | None:
    """The fused view of an adapted linear or a plain / 4-bit linear, or None when it needs the plain path."""
    view = None
    if isinstance(module, AdaptedLinear):
        view = module.adapter_view()
        if view is None:
            return None
        base = view.base
    else:
        base = module
    quantized = is_4bit_linear(base)
    if not (quantized or type(base) is nn.Linear):  # an int8 base, or a module of another kind
        if view is None:
            _refuse_undescribed_adapter(module)
        return None
    if base.weight.requires_grad or (base.bias is not None and base.bias.requires_grad):
        return None
    if not autocast:  # the plain path computes in the base's dtype: the fused one must see the same
        base_dtype = getattr(base, "compute_dtype", None) if quantized else base.weight.dtype
        if base_dtype != dtype:
            return None
    if view is not None and view.a is not None:
        return Projection(base, True, view.scaling, view.a, view.b)
    return Projection(base, False)


def _refuse_undescribed_adapter(module: nn.Module):
    """A linear-like module with adapter parameters that the kernels know nothing about: a new adapter kind must
    describe itself (AdaptedLinear.adapter_view), or its adapter would silently be treated as absent."""
    adapter = next((name for name, _ in module.named_parameters() if "lora_" in name), None)
    if adapter is not None:
        raise UnsupportedError(f"{type(module).__name__} carries adapter parameters ({adapter}) but is not an "
                               f"AdaptedLinear: the fused kernels cannot tell how to compute it")


def _adapters(projections):
    return [t for p in projections if p.lora for t in (p.a, p.b)]


def _fused_group(modules, x):
    """(projections, compute dtype, adapter tensors), or None when any module needs the plain path."""
    if not torch.is_grad_enabled() or kernel_mode() == "reference" or not x.is_floating_point():
        return None
    autocast = torch.is_autocast_enabled(x.device.type)
    dtype = torch.get_autocast_dtype(x.device.type) if autocast else x.dtype
    projections = [projection_of(m, dtype, autocast) for m in modules]
    if any(p is None for p in projections):
        return None
    return projections, dtype, _adapters(projections)


@contextlib.contextmanager
def _no_autocast(device_type: str):
    """Everything inside runs in the dtype chosen at the call (autocast would re-cast the matmuls)."""
    if torch.is_autocast_enabled(device_type):
        with torch.autocast(device_type, enabled=False):
            yield
    else:
        yield


# ---- shared-input projections: forward and backward -------------------------------------------------------
def _project(x2, projections, adapters, dtype):
    """[tokens, in] -> one [tokens, out_i] per projection: what LoraLinear computes, with the adapter's product
    accumulated into the base output in place (no [tokens, out] temporaries)."""
    outs, i = [], 0
    for p in projections:
        y = F.linear(x2, p.weight(dtype), p.bias(dtype))
        if p.lora:
            a, b = adapters[i].to(dtype), adapters[i + 1].to(dtype)
            i += 2
            y.addmm_(F.linear(x2, a), b.t(), alpha=p.scaling)
        outs.append(y)
    return outs


def _project_backward(x2, projections, adapters, grads, dtype, need_x, need_adapters):
    """d x and d A, d B for each adapter (None where not needed), from the output gradients [tokens, out_i]."""
    dx, d_adapters, i = None, [], 0
    for p, dy in zip(projections, grads):
        d_a = d_b = None
        if need_x and dy is not None:  # dx accumulates in place: one [tokens, in] buffer for the whole group
            weight = p.weight(dtype)
            dx = torch.mm(dy, weight) if dx is None else dx.addmm_(dy, weight)
        if p.lora:
            a, b = adapters[i].to(dtype), adapters[i + 1].to(dtype)
            if dy is not None:
                # The adapter's output sees scaling * dy: the scaling goes on the rank-r products, never on a
                # [tokens, out] copy of dy.
                if need_adapters[i + 1]:
                    d_b = torch.mm(dy.t(), F.linear(x2, a)).mul_(p.scaling).to(adapters[i + 1].dtype)
                g_b = torch.mm(dy, b).mul_(p.scaling)
                if need_adapters[i]:
                    d_a = torch.mm(g_b.t(), x2).to(adapters[i].dtype)
                if need_x:
                    dx.addmm_(g_b, a)
            d_adapters += [d_a, d_b]
            i += 2
    return dx, d_adapters


def _rows(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, t.shape[-1])


class SharedInputLora(torch.autograd.Function):
    """Several projections of one input (q/k/v, or a single linear). Saves x and the adapters only."""

    @staticmethod
    def forward(ctx, x, projections, dtype, *adapters):
        with _no_autocast(x.device.type):
            outs = _project(_rows(x), projections, adapters, dtype)
        ctx.projections, ctx.dtype = projections, dtype
        ctx.save_for_backward(x, *adapters)
        return tuple(y.view(*x.shape[:-1], y.shape[-1]) for y in outs)

    @staticmethod
    def backward(ctx, *grads):
        x, *adapters = ctx.saved_tensors
        with _no_autocast(x.device.type):
            dx, d_adapters = _project_backward(
                _rows(x), ctx.projections, adapters, [None if g is None else _rows(g) for g in grads], ctx.dtype,
                ctx.needs_input_grad[0], ctx.needs_input_grad[3:])
        return (None if dx is None else dx.view(x.shape), None, None, *d_adapters)


def lora_projections(modules, x: torch.Tensor):
    """[module(x) for module in modules] through one fused op, or None (the caller runs the modules)."""
    group = _fused_group(modules, x)
    if group is None or not any(p.lora for p in group[0]):
        return None  # without an adapter a frozen linear saves nothing of its own: nothing to gain
    projections, dtype, adapters = group
    return list(SharedInputLora.apply(x.to(dtype), projections, dtype, *adapters))


def fused_lora_linear(module: nn.Module, x: torch.Tensor):
    outs = lora_projections([module], x)
    return None if outs is None else outs[0]


# ---- the gated MLP block -------------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class MLPSpec:
    gate_up: list          # [gate, up] projections, or [gate_up] (one fused linear, split in halves)
    down: Projection
    act: object            # the block's activation function act(gate, up) (dispatching to Triton on CUDA)
    kind: tuple            # ("swiglu", None) or ("geglu", "none" | "tanh")
    dtype: torch.dtype

    @property
    def n_in_adapters(self) -> int:
        return 2 * sum(p.lora for p in self.gate_up)


def _gate_and_up(spec, parts):
    return parts if len(spec.gate_up) == 2 else parts[0].chunk(2, dim=-1)


def _plain_activation(spec, gate):
    """act(gate) by PyTorch's own op, where the Triton kernels do not run (else None)."""
    kind, approx = spec.kind
    if use_triton(gate) and (kind == "swiglu" or approx in ("none", "tanh")):
        return None
    return F.silu(gate) if kind == "swiglu" else F.gelu(gate, approximate=approx)


def _gated_grads(spec, gate, up, dh, act_gate=None):
    """d gate, d up of act(gate) * up: the Triton backward kernel where it runs, else the formulas autograd applies,
    called directly. `act_gate` (act(gate), from _plain_activation) and `dh` are consumed: both are overwritten."""
    kind, approx = spec.kind
    if act_gate is None:
        act_gate = _plain_activation(spec, gate)
    if act_gate is None:
        from .triton_activations import gated_grads
        return gated_grads(gate, up, dh, kind, approx)
    # Bit for bit autograd's formulas (torch.autograd.grad with an output gradient would import PyTorch's
    # symbolic-shape module, sympy, ~35 MB resident, on its first call), in the two buffers already at hand: one
    # elementwise pass and two [tokens, intermediate] allocations fewer than out-of-place ops.
    d_up = act_gate.mul_(dh)
    d_act = dh.mul_(up)
    if kind == "swiglu":
        return torch.ops.aten.silu_backward.grad_input(d_act, gate, grad_input=d_act), d_up
    return torch.ops.aten.gelu_backward.grad_input(d_act, gate, approximate=approx, grad_input=d_act), d_up


class LoraMLP(torch.autograd.Function):
    """down(act(gate(x)) * up(x)) with LoRA on any of the three. Saves gate, up and the adapters, and x when gate or
    up has an adapter (its gradient reads x; frozen gate and up need only their outputs: a mixture-of-experts block
    with LoRA elsewhere keeps no copy of its experts' inputs)."""

    @staticmethod
    def forward(ctx, x, spec, *adapters):
        k = spec.n_in_adapters
        with _no_autocast(x.device.type):
            parts = _project(_rows(x), spec.gate_up, adapters[:k], spec.dtype)
            gate, up = _gate_and_up(spec, parts)
            h = _plain_activation(spec, gate)
            h = spec.act(gate, up) if h is None else h.mul_(up)  # act(gate) * up in act(gate)'s own buffer
            del gate, up
            (out,) = _project(h, [spec.down], adapters[k:], spec.dtype)
        ctx.spec, ctx.x_shape = spec, x.shape
        ctx.save_for_backward(x if k else None, *parts, *adapters)
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, dout):
        spec, k = ctx.spec, ctx.spec.n_in_adapters
        n_parts = len(spec.gate_up)
        x, *rest = ctx.saved_tensors
        parts, adapters = rest[:n_parts], rest[n_parts:]
        needs = ctx.needs_input_grad[2:]
        with _no_autocast(dout.device.type):
            gate, up = _gate_and_up(spec, parts)
            act_gate = _plain_activation(spec, gate)  # once, for h and for d up
            h = None  # recomputed only for the down LoRA's own gradients, the one reader of it
            if spec.down.lora and any(needs[k:]):
                h = spec.act(gate, up) if act_gate is None else act_gate * up
            dh, d_down = _project_backward(h, [spec.down], adapters[k:], [_rows(dout)], spec.dtype, True, needs[k:])
            del h
            d_gate, d_up = _gated_grads(spec, gate, up, dh, act_gate)
            del dh, act_gate
            grads = [d_gate, d_up] if n_parts == 2 else [torch.cat((d_gate, d_up), dim=-1)]
            dx, d_in = _project_backward(None if x is None else _rows(x), spec.gate_up, adapters[:k], grads,
                                         spec.dtype, ctx.needs_input_grad[0], needs[:k])
        return (None if dx is None else dx.view(ctx.x_shape), None, *d_in, *d_down)


def lora_mlp(gate_up_modules, down_module, act, kind, x: torch.Tensor):
    """The fused MLP block's output, or None (the caller runs its modules). `gate_up_modules` is [gate, up] or
    [gate_up]; `act(gate, up)` is the block's activation and `kind` its ("swiglu" | "geglu", approximation)."""
    modules = [*gate_up_modules, down_module]
    group = _fused_group(modules, x)
    if group is None:
        return None
    projections, dtype, adapters = group
    spec = MLPSpec(projections[:-1], projections[-1], act, kind, dtype)
    return LoraMLP.apply(x.to(dtype), spec, *adapters)
