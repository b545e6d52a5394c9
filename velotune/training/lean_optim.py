"""Optimizers that never import torch's compiler stack.

PyTorch's `Optimizer` wraps `add_param_group`, `zero_grad`, `state_dict`, `load_state_dict` and every `step` in
decorators whose first call imports `torch._dynamo` (and with it torch._inductor, torch.fx, torch.distributed's
tensor code, torch.onnx...): about 150 MB of resident memory and a second or two of start-up in every training
process, bought only so that `torch.compile` can trace around them. velotune's loop never compiles the optimizer,
so these classes call the same methods undecorated: the update is torch's own code (the fused AdamW kernel, the
same state and `state_dict` layout and class names, so checkpoints read and write as before); only the import is
skipped.

The undecorated function is the `__wrapped__` that `functools.wraps` leaves on each decorator. Where a PyTorch
release drops it, the decorated method is called instead: the same result, with the import.
"""
from __future__ import annotations

import functools

import torch


def _undecorated(method):
    return getattr(method, "__wrapped__", method)


_ADD_PARAM_GROUP = _undecorated(torch.optim.Optimizer.add_param_group)
_ZERO_GRAD = _undecorated(torch.optim.Optimizer.zero_grad)
_STATE_DICT = _undecorated(torch.optim.Optimizer.state_dict)
_LOAD_STATE_DICT = _undecorated(torch.optim.Optimizer.load_state_dict)


class NoCompilerImports:
    """Mixin for a torch.optim.Optimizer subclass: the bookkeeping methods without their compiler wrappers.
    `step` is left to the concrete class (torch's decorate theirs; see AdamW)."""

    def add_param_group(self, param_group: dict) -> None:
        _ADD_PARAM_GROUP(self, param_group)

    def zero_grad(self, set_to_none: bool = True) -> None:
        _ZERO_GRAD(self, set_to_none)

    def state_dict(self) -> dict:
        return _STATE_DICT(self)

    def load_state_dict(self, state_dict: dict) -> None:
        _LOAD_STATE_DICT(self, state_dict)


_ADAMW_STEP = torch.optim.AdamW.step
_ADAMW_STEP_UNDECORATED = getattr(_ADAMW_STEP, "__wrapped__", None)


class AdamW(NoCompilerImports, torch.optim.AdamW):
    """torch.optim.AdamW (every argument, every implementation: fused, foreach, per tensor) without the compiler
    import. Its name stays "AdamW": checkpoints record the optimizer's class name and check it on resume."""

    def step(self, closure=None):
        if _ADAMW_STEP_UNDECORATED is None or self.defaults.get("differentiable"):
            return _ADAMW_STEP(self, closure)
        # What torch's decorator does besides the compiler's graph breaks: the update runs without autograd.
        with torch.no_grad():
            return _ADAMW_STEP_UNDECORATED(self, closure)


@functools.cache  # one subclass per optimizer class, however many runs build it
def lean(optimizer_class: type) -> type:
    """A subclass of `optimizer_class` (a torch.optim.Optimizer, such as bitsandbytes' AdamW8bit, whose `step`
    carries no compiler decorator) with the same name and the bookkeeping methods undecorated."""
    return type(optimizer_class.__name__, (NoCompilerImports, optimizer_class),
                {"__module__": __name__, "__doc__": optimizer_class.__doc__,
                 "__qualname__": optimizer_class.__qualname__})
