"""Building a model whose weights are about to be loaded, at no memory cost: parameters registered on the meta
device, random initialisation skipped, and the non-persistent buffers (RoPE tables) rebuilt on the target device
afterwards. Every family's loader uses these."""
from __future__ import annotations

import contextlib

from torch import nn


# The torch.nn.init functions modules call from reset_parameters().
_INIT_FUNCTIONS = ("normal_", "uniform_", "trunc_normal_", "constant_", "zeros_", "ones_", "kaiming_uniform_",
                   "kaiming_normal_", "xavier_uniform_", "xavier_normal_", "orthogonal_")


@contextlib.contextmanager
def skip_weight_init():
    """Module constructors skip their random initialisation: every weight is about to be replaced."""
    saved = {name: getattr(nn.init, name) for name in _INIT_FUNCTIONS if hasattr(nn.init, name)}
    for name in saved:
        setattr(nn.init, name, _keep)
    try:
        yield
    finally:
        for name, fn in saved.items():
            setattr(nn.init, name, fn)


def _keep(tensor, *args, **kwargs):
    return tensor


@contextlib.contextmanager
def parameters_on_meta():
    """Every parameter a module registers goes to the meta device as it is registered: building the model costs
    no memory. Unlike `with torch.device("meta")`, ops in constructors (RoPE tables, small buffers) run on the
    CPU, not through PyTorch's Python meta decompositions, whose first use imports torch._dynamo: ~150 MB of RSS
    for nothing."""
    register = nn.Module.register_parameter

    def to_meta(module, name, param):
        if param is not None and param.device.type != "meta":
            param = nn.Parameter(param.detach().to("meta"), requires_grad=param.requires_grad)
        register(module, name, param)
    nn.Module.register_parameter = to_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def rebuild_buffers(model: nn.Module, device):
    """Non-persistent buffers (RoPE tables) are built again on the target device, after the weights were loaded."""
    from .rope import RotaryEmbedding
    for module in model.modules():
        if isinstance(module, RotaryEmbedding):
            module.rebuild(device)


__all__ = ["parameters_on_meta", "rebuild_buffers", "skip_weight_init"]
