"""Checks of a decoded checkpoint against the run that resumes it, made before anything is copied.

A checkpoint of other settings (lora.r, lora.targets, finetune.method, train.optimizer) or a tampered file gets a
CheckpointError that names the tensor or key, instead of a raw error from deep inside torch halfway through a load.
"""
from __future__ import annotations

from typing import Mapping

import torch

from ..errors import CheckpointError

SETTINGS_HINT = "was it written with other lora.r / lora.targets / finetune.method settings?"
# Optimizer state tensors holding one value per parameter element (AdamW, SGD, bitsandbytes' 8-bit states).
ELEMENTWISE = frozenset({"exp_avg", "exp_avg_sq", "max_exp_avg_sq", "momentum_buffer", "state1", "state2"})


def _shape(value) -> list[int]:
    return list(value.shape)


def check_trainable_tensors(source: str, tensors: Mapping, model) -> dict:
    """The model's trainable parameters by name, once every checkpoint tensor matches one by name and shape."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    missing, extra = sorted(set(params) - set(tensors)), sorted(set(tensors) - set(params))
    if missing or extra:
        parts = ([f"{len(missing)} missing from the checkpoint (e.g. {missing[0]})"] if missing else []) + \
                ([f"{len(extra)} not in the model (e.g. {extra[0]})"] if extra else [])
        raise CheckpointError(f"{source}: the checkpoint's tensors do not match the model's trainable parameters "
                              f"({'; '.join(parts)}); {SETTINGS_HINT}")
    for name, param in params.items():
        value = tensors[name]
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(f"{source}: {name}: expected a tensor, found {type(value).__name__}")
        if _shape(value) != _shape(param):
            raise CheckpointError(f"{source}: tensor {name} has shape {_shape(value)} in the checkpoint but "
                                  f"{_shape(param)} in the model; {SETTINGS_HINT}")
    return params


def optimizer_param_names(model, optimizer) -> list[str]:
    """The names of the optimizer's parameters, in the order its state dict numbers them."""
    names = {id(p): n for n, p in model.named_parameters()}
    return [names[id(p)] for group in optimizer.param_groups for p in group["params"]]


def check_optimizer_groups(source: str, saved, optimizer) -> tuple[list, list]:
    """(this run's param groups, the saved ones) once `saved` is shaped like an optimizer state dict with as many
    groups as `optimizer`."""
    if type(saved) is not dict or type(saved.get("state")) is not dict or type(saved.get("param_groups")) is not list:
        raise CheckpointError(f"{source}: optimizer: expected a dict with 'state' and 'param_groups'")
    groups, saved_groups = optimizer.param_groups, saved["param_groups"]
    if len(saved_groups) != len(groups):
        raise CheckpointError(f"{source}: the optimizer state has {len(saved_groups)} parameter group(s), this "
                              f"run's optimizer {len(groups)}; {SETTINGS_HINT}")
    return groups, saved_groups


def check_optimizer_state(source: str, saved, saved_class, optimizer, names: list[str]):
    """`saved` (a torch optimizer state dict) fits `optimizer`: same class, groups, parameter count and shapes."""
    current = type(optimizer).__name__
    if saved_class != current:
        raise CheckpointError(f"{source}: the checkpoint's optimizer is {saved_class}, this run's {current}; "
                              f"resume with the train.optimizer the run started with")
    groups, saved_groups = check_optimizer_groups(source, saved, optimizer)
    ids = []
    for i, (group, saved_group) in enumerate(zip(groups, saved_groups)):
        where = f"{source}: optimizer.param_groups.{i}"
        if type(saved_group) is not dict or type(saved_group.get("params")) is not list:
            raise CheckpointError(f"{where}: expected a dict with a 'params' list")
        if len(saved_group["params"]) != len(group["params"]):
            raise CheckpointError(f"{where}: holds {len(saved_group['params'])} parameters, this run trains "
                                  f"{len(group['params'])} there; {SETTINGS_HINT}")
        check_like({k: v for k, v in saved_group.items() if k != "params"},
                   {k: v for k, v in group.items() if k != "params"}, where, require_keys=False)
        ids += saved_group["params"]
    if any(type(i) is not int for i in ids) or len(set(ids)) != len(ids):
        raise CheckpointError(f"{source}: optimizer.param_groups: parameter numbers must be distinct integers")
    params = [p for group in groups for p in group["params"]]
    position = {pid: k for k, pid in enumerate(ids)}
    for pid, entry in saved["state"].items():
        if pid not in position or type(entry) is not dict:
            raise CheckpointError(f"{source}: optimizer.state.{pid}: no parameter has this number, or not a dict")
        k = position[pid]
        _check_elementwise(entry, params[k], f"{source}: the optimizer state of {names[k]}")


def _check_elementwise(entry: dict, param, where: str):
    for key, value in entry.items():
        if type(value) is dict:  # bitsandbytes nests its quantized states
            _check_elementwise(value, param, where)
        elif key in ELEMENTWISE and not (isinstance(value, torch.Tensor) and _shape(value) == _shape(param)):
            found = _shape(value) if isinstance(value, torch.Tensor) else type(value).__name__
            raise CheckpointError(f"{where}: {key} is {found}, the parameter has shape {_shape(param)}; "
                                  f"{SETTINGS_HINT}")
        elif key == "step" and not (isinstance(value, torch.Tensor) and value.numel() == 1
                                    or type(value) in (int, float)):
            raise CheckpointError(f"{where}: step must be a number, found {type(value).__name__}")


def _kind(value) -> str:
    if isinstance(value, torch.Tensor):
        return "tensor"
    if type(value) in (int, float):
        return "number"
    return type(value).__name__


def check_like(value, template, where: str, require_keys: bool = True):
    """`value` has the structure and kinds of `template` (a state dict this run produces): the same keys (or a
    subset, when torch fills in defaults), list lengths, and kinds of values; None matches any plain value."""
    kind, expected = _kind(value), _kind(template)
    containers = ("dict", "list", "tuple", "tensor")
    if (kind == "NoneType" or expected == "NoneType") and kind not in containers and expected not in containers:
        return
    if kind != expected:
        shown = repr(value) if len(repr(value)) <= 40 else repr(value)[:37] + "..."
        raise CheckpointError(f"{where}: expected a {expected}, found a {kind} ({shown})")
    if kind == "dict":
        missing = sorted(set(template) - set(value))
        if require_keys and missing:
            raise CheckpointError(f"{where}: key {missing[0]!r} is missing")
        for key in template.keys() & value.keys():
            check_like(value[key], template[key], f"{where}.{key}", require_keys)
    elif kind in ("list", "tuple"):
        if len(value) != len(template):
            raise CheckpointError(f"{where}: holds {len(value)} items, this run's {len(template)}")
        for i, (v, t) in enumerate(zip(value, template)):
            check_like(v, t, f"{where}.{i}", require_keys)


def check_rng_state(state, where: str):
    """Torch, Python (and CUDA) RNG states as `state.rng_state` makes them, with `per_rank` ones of a multi-process
    run; checked so that `torch.set_rng_state` / `random.setstate` cannot fail halfway through a resume."""
    _check_one_rng(state, where)
    per_rank = state.get("per_rank")
    if per_rank is not None:
        if type(per_rank) is not list:
            raise CheckpointError(f"{where}.per_rank: expected a list")
        for i, rank_state in enumerate(per_rank):
            _check_one_rng(rank_state, f"{where}.per_rank.{i}")


def _check_one_rng(state, where: str):
    if type(state) is not dict:
        raise CheckpointError(f"{where}: expected a dict of RNG states")
    for key in ("torch", "python"):
        if key not in state:
            raise CheckpointError(f"{where}: key {key!r} is missing")
    expected = torch.get_rng_state()
    _check_byte_state(state["torch"], _shape(expected), f"{where}.torch")
    python = state["python"]
    if not (type(python) is tuple and len(python) == 3 and type(python[0]) is int and type(python[1]) is tuple
            and len(python[1]) == 625 and all(type(x) is int and 0 <= x < 2 ** 32 for x in python[1])
            and (python[2] is None or type(python[2]) is float)):
        raise CheckpointError(f"{where}.python: not a state of Python's random module")
    cuda = state.get("cuda")
    if cuda is not None:
        if type(cuda) is not list:
            raise CheckpointError(f"{where}.cuda: expected a list of tensors")
        for i, device_state in enumerate(cuda):
            _check_byte_state(device_state, None, f"{where}.cuda.{i}")


def _check_byte_state(value, shape, where: str):
    if not (isinstance(value, torch.Tensor) and value.dtype == torch.uint8 and value.dim() == 1
            and (shape is None or _shape(value) == shape)):
        found = f"{value.dtype} {_shape(value)}" if isinstance(value, torch.Tensor) else type(value).__name__
        raise CheckpointError(f"{where}: expected a uint8 RNG state{f' of shape {shape}' if shape else ''}, "
                              f"found {found}")
