"""Keep a cheap activation out of the saved-for-backward set: autograd stores a recipe in its place and runs the
recipe again, once, when backward first needs the tensor.

    y = norm(x)
    with recomputed_in_backward(y, lambda: norm(x)):
        out = projections(y)       # every op here that saves y (or a view of y) saves the recipe instead

The typical use is a LayerNorm output read by adapted (LoRA) linears: their backward needs the norm's output,
while the norm itself already keeps its input; keeping both doubles the memory of the pair. The recipe must give
bit for bit the tensor it replaces (the same op on the same inputs; nothing changes in between), so gradients do not
change at all; it holds its inputs, which must be tensors autograd keeps anyway (else nothing is gained).

What is special: this is `torch.autograd.graph.saved_tensors_hooks`, of which only the innermost pair is active. So
the context does nothing (the plain path) when another pair is already active: activation checkpointing, CPU
offloading of activations and any user hooks keep their own behaviour. It also does nothing without autograd, under
autocast (a recomputed op could run in another dtype) and for a tensor that needs no gradient path.
The recomputed tensor is cached until the last graph node that saved it has run its backward.
"""
from __future__ import annotations

import contextlib
from typing import Callable

import torch


class _Recipe:
    """The function that rebuilds the replaced tensor, and the tensor once rebuilt."""

    def __init__(self, fn: Callable[[], torch.Tensor], size, stride, offset, dtype):
        self.fn, self.geometry, self.dtype = fn, (size, stride, offset), dtype
        self.value: torch.Tensor | None = None

    def rebuilt(self) -> torch.Tensor:
        if self.value is None:
            with torch.no_grad():
                value = self.fn()
            if (value.size(), value.stride(), value.storage_offset()) != self.geometry or value.dtype != self.dtype:
                raise RuntimeError(f"recomputed_in_backward: the recipe gave {value.dtype} {list(value.shape)} "
                                   f"strides {value.stride()}, not the {self.dtype} {list(self.geometry[0])} "
                                   f"strides {self.geometry[1]} it replaces")
            self.value = value
        return self.value


class _Packed:
    """A saved tensor that is the recipe's tensor or a view of it: the view's geometry on the same storage."""
    __slots__ = ("recipe", "size", "stride", "offset")

    def __init__(self, recipe: _Recipe, t: torch.Tensor):
        self.recipe, self.size, self.stride, self.offset = recipe, t.size(), t.stride(), t.storage_offset()


def _storage_key(t: torch.Tensor):
    try:
        return t.device, t.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):  # no plain storage (sparse, nested, tensor subclasses)
        return None


def hooks_available(y: torch.Tensor) -> bool:
    """Whether the context can act on y: autograd on, y in the graph, no autocast, no other saved-tensor hooks."""
    if not (torch.is_grad_enabled() and y.requires_grad) or torch.is_autocast_enabled(y.device.type):
        return False
    if y.numel() == 0 or y.storage_offset() != 0 or not y.is_contiguous() or _storage_key(y) is None:
        return False
    top = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
    if top is None:  # cannot tell whether another pair is active: take the plain path
        return False
    return top(False) is None


@contextlib.contextmanager
def recomputed_in_backward(y: torch.Tensor, recipe: Callable[[], torch.Tensor]):
    """Inside, every tensor autograd saves that shares y's storage is kept as `recipe` and rebuilt in backward
    (see the module docstring). y itself is not held: the caller's reference is the only one."""
    if not hooks_available(y):
        yield
        return
    key = _storage_key(y)
    shared = _Recipe(recipe, y.size(), y.stride(), 0, y.dtype)

    def pack(t: torch.Tensor):
        if t.dtype == shared.dtype and _storage_key(t) == key:
            return _Packed(shared, t)
        return t

    def unpack(saved):
        if isinstance(saved, _Packed):
            return saved.recipe.rebuilt().as_strided(saved.size, saved.stride, saved.offset)
        return saved

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        yield


__all__ = ["hooks_available", "recomputed_in_backward"]
