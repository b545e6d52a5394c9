"""Training state (optimizer, scheduler, loss scaler, RNG) as JSON plus safetensors: nothing to unpickle.

`encode` turns a nested state of dicts, lists, tuples, ints, floats (inf / nan too), str, bool, None and torch
tensors into a JSON-able tree and a {key: tensor} dict; `decode` turns them back and refuses anything else.
JSON has no tuples, no int keys and no inf / nan, yet `random.setstate` needs its tuples back and torch optimizers
number their parameters with int keys. So every JSON object of the tree is one tagged node, and plain JSON arrays
are lists:
    {"dict": {"lr": 0.1}}   {"int_dict": {"0": ...}}   {"tuple": [...]}   {"float": "nan"}   {"tensor": "key"}
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Callable, Mapping

import torch

from ..errors import CheckpointError

FORMAT = "velotune-state-1"
NON_FINITE = ("inf", "-inf", "nan")


def _join(path: str, part) -> str:
    return f"{path}.{part}" if path else str(part)


def plain_tensor(key: str, tensor: torch.Tensor) -> torch.Tensor:
    """The default way a tensor is stored: a plain CPU tensor (a sharded DTensor needs its own layout)."""
    if type(tensor) not in (torch.Tensor, torch.nn.Parameter):
        raise CheckpointError(f"cannot save {key}: a {type(tensor).__name__} is not a plain tensor")
    return tensor.detach().cpu().contiguous()


def encode(state, *, store_tensor: Callable[[str, torch.Tensor], torch.Tensor] = plain_tensor):
    """(JSON-able tree, {key: tensor}) of `state`; a tensor's key is its path ("optimizer.state.0.exp_avg").
    `store_tensor(key, tensor)` gives the tensor to write. Any other type is refused, naming its path."""
    tensors: dict[str, torch.Tensor] = {}
    storages: set[int] = set()

    def walk(value, path: str):
        if value is None or isinstance(value, (bool, str, int)):
            return value
        if isinstance(value, float):
            return value if math.isfinite(value) else {"float": repr(value)}
        if isinstance(value, torch.Tensor):
            key, n = path, 1
            while key in tensors:  # two paths that read alike ("a.b" + "c", "a" + "b.c") keep their own tensors
                key, n = f"{path}~{n}", n + 1
            stored = store_tensor(key, value)
            if stored.numel() and stored.untyped_storage().data_ptr() in storages:
                stored = stored.clone()  # safetensors writes no two tensors from one storage (e.g. a shared RNG state)
            storages.add(stored.untyped_storage().data_ptr())
            tensors[key] = stored
            return {"tensor": key}
        if isinstance(value, tuple):
            return {"tuple": [walk(v, _join(path, i)) for i, v in enumerate(value)]}
        if isinstance(value, list):
            return [walk(v, _join(path, i)) for i, v in enumerate(value)]
        if isinstance(value, dict):
            return walk_dict(value, path)
        raise CheckpointError(f"cannot save {path or 'the state'}: {type(value).__name__} values cannot be stored "
                              f"(only dict, list, tuple, int, float, str, bool, None and tensors)")

    def walk_dict(value: dict, path: str):
        if all(type(k) is str for k in value):
            return {"dict": {k: walk(v, _join(path, k)) for k, v in value.items()}}
        if all(type(k) is int for k in value):
            return {"int_dict": {str(k): walk(v, _join(path, k)) for k, v in value.items()}}
        kinds = sorted({type(k).__name__ for k in value})
        raise CheckpointError(f"cannot save {path or 'the state'}: its keys must be all str or all int, "
                              f"not {' and '.join(kinds)}")

    return walk(state, ""), tensors


def decode(tree, tensors: Mapping[str, torch.Tensor], *, source: str, tensor_source: str):
    """The state `encode` stored; anything malformed is a CheckpointError naming `source` and the path."""

    def bad(path: str, what: str):
        return CheckpointError(f"{source}: {path or 'the state'}: {what}")

    def walk(node, path: str):
        if node is None or type(node) in (bool, str, int, float):
            return node
        if type(node) is list:
            return [walk(v, _join(path, i)) for i, v in enumerate(node)]
        if type(node) is not dict or len(node) != 1:
            raise bad(path, f"not a stored value ({_preview(node)})")
        (tag, body), = node.items()
        if tag == "dict" and type(body) is dict:
            return {k: walk(v, _join(path, k)) for k, v in body.items()}
        if tag == "int_dict" and type(body) is dict:
            return {int_key(k, path): walk(v, _join(path, k)) for k, v in body.items()}
        if tag == "tuple" and type(body) is list:
            return tuple(walk(v, _join(path, i)) for i, v in enumerate(body))
        if tag == "float" and body in NON_FINITE:
            return float(body)
        if tag == "tensor" and type(body) is str:
            if body not in tensors:
                raise bad(path, f"tensor {body!r} is missing from {tensor_source}")
            return tensors[body]
        raise bad(path, f"not a stored value ({_preview(node)})")

    def int_key(key: str, path: str) -> int:
        if key.lstrip("-").isdigit() and str(int(key)) == key:
            return int(key)
        raise bad(_join(path, key), "expected a whole-number key")

    return walk(tree, "")


def _preview(node) -> str:
    text = json.dumps(node)
    return text if len(text) <= 60 else text[:57] + "..."


def read_json(path: Path):
    """A JSON file, or a CheckpointError naming the file (and line) when it cannot be read."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path}: line {exc.lineno}: not valid JSON ({exc.msg})") from None
    except (OSError, ValueError, RecursionError) as exc:  # unreadable, not UTF-8, nested too deep
        raise CheckpointError(f"{path}: cannot read ({type(exc).__name__}: {exc})") from None


def write_state(directory: Path, stem: str, state) -> None:
    """Writes `stem.json` (structure and numbers) and `stem.safetensors` (tensors) into `directory`."""
    from safetensors.torch import save_file
    tree, tensors = encode(state)
    save_file(tensors, str(Path(directory) / f"{stem}.safetensors"))
    text = json.dumps({"format": FORMAT, "state": tree}, allow_nan=False)
    (Path(directory) / f"{stem}.json").write_text(text, encoding="utf-8")


def read_state(directory: Path, stem: str):
    """The state `write_state` wrote; a malformed or foreign file is a CheckpointError naming it."""
    json_path, tensor_path = Path(directory) / f"{stem}.json", Path(directory) / f"{stem}.safetensors"
    doc = read_json(json_path)
    if type(doc) is not dict or doc.get("format") != FORMAT or "state" not in doc:
        raise CheckpointError(f"{json_path}: not a velotune training state (expected format {FORMAT!r})")
    tensors = read_safetensors(tensor_path)
    return decode(doc["state"], tensors, source=str(json_path), tensor_source=tensor_path.name)


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from ..models.safetensors_reader import load_file
    try:
        return load_file(path)
    except CheckpointError:
        raise
    except Exception as exc:  # a missing, truncated or foreign file: safetensors' own error says which
        raise CheckpointError(f"{path}: cannot read tensors ({type(exc).__name__}: {exc})") from None
