"""Hugging Face checkpoint files: find the directory, read config.json and (sharded) safetensors, write them back.

Every read error names the file; every write goes to a temporary name first and is renamed into place,
so an interrupted save never leaves a half-written file under the final name.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from ..errors import CheckpointError

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
DEFAULT_SHARD_BYTES = 5 * 1024 ** 3


def resolve_model_dir(name_or_path: str | os.PathLike) -> Path:
    """A local directory as is; otherwise a hub id, downloaded (or found in the local hub cache)."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise CheckpointError(f"{path}: expected a model directory (config.json + safetensors), found a file")
    name = str(name_or_path)
    if name.count("/") != 1 or name.startswith((".", "/", "~")):
        raise CheckpointError(f"model '{name}': no such local directory, and not a hub id of the form org/name")
    try:
        from huggingface_hub import snapshot_download
        return Path(snapshot_download(name, allow_patterns=["*.json", "*.safetensors", "*.model", "*.jinja",
                                                            "*.txt", "tokenizer*"]))
    except Exception as exc:  # offline, unknown repo, gated: all end here with the reason
        raise CheckpointError(
            f"model '{name}': not a local directory and could not be fetched from the Hugging Face hub "
            f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else 'no detail'}). "
            f"Offline, pass a local directory holding config.json and *.safetensors.") from None


def read_json(path: Path):
    """A JSON file's content; invalid JSON is a CheckpointError naming the file, line and column."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path}: invalid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}") from None


def read_config(model_dir: Path) -> dict:
    path = model_dir / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{model_dir}: no config.json")
    config = read_json(path)
    if not isinstance(config, dict) or "model_type" not in config:
        raise CheckpointError(f"{path}: missing field 'model_type'")
    return config


def weight_files(model_dir: Path) -> list[Path]:
    """The safetensors files of a checkpoint, single or sharded (the index lists the shards)."""
    index = model_dir / INDEX_NAME
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (json.JSONDecodeError, KeyError) as exc:
            raise CheckpointError(f"{index}: not a valid safetensors index ({exc})") from None
        files = [model_dir / f for f in sorted(set(weight_map.values()))]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise CheckpointError(f"{index}: lists shard(s) that are missing: {', '.join(missing)}")
        return files
    single = model_dir / WEIGHTS_NAME
    if single.is_file():
        return [single]
    others = sorted(model_dir.glob("*.safetensors"))
    if others:
        return others
    raise CheckpointError(f"{model_dir}: no {WEIGHTS_NAME} or {INDEX_NAME} (only safetensors weights are read)")


def iter_tensors(files: list[Path]):
    """Yields (name, tensor, file) from safetensors files, turning corrupt or truncated files into clear errors."""
    from safetensors import safe_open
    for file in files:
        try:
            with safe_open(str(file), framework="pt") as f:
                for name in f.keys():
                    yield name, f.get_tensor(name), file
        except CheckpointError:
            raise
        except Exception as exc:
            size = file.stat().st_size if file.exists() else 0
            raise CheckpointError(f"{file}: cannot read safetensors ({size} bytes; truncated or corrupt?): "
                                  f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None


def atomic_dir(final: Path, overwrite: bool = False):
    """Context manager: yields a temporary directory beside `final`, renamed to `final` on success only."""
    return _AtomicDir(Path(final), overwrite)


class _AtomicDir:
    def __init__(self, final: Path, overwrite: bool):
        self.final, self.overwrite = final, overwrite

    def __enter__(self) -> Path:
        if self.final.exists() and not self.overwrite and any(self.final.iterdir()):
            raise CheckpointError(f"{self.final}: already exists and is not empty (pass overwrite=True to replace)")
        self.final.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.final.name}.tmp-", dir=self.final.parent))
        return self.tmp

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return False
        if self.final.exists():
            old = self.final.with_name(f".{self.final.name}.old-{os.getpid()}")
            os.replace(self.final, old)
            os.replace(self.tmp, self.final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(self.tmp, self.final)
        return False


def save_safetensors(state: dict[str, torch.Tensor], out_dir: Path, max_shard_bytes: int = DEFAULT_SHARD_BYTES,
                     metadata: dict | None = None):
    """Writes `model.safetensors`, or shards plus `model.safetensors.index.json` above `max_shard_bytes`."""
    from safetensors.torch import save_file
    state = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    shards, current, size = [], {}, 0
    for name, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if current and size + nbytes > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[name] = tensor
        size += nbytes
    shards.append(current)
    meta = {"format": "pt", **(metadata or {})}
    if len(shards) == 1:
        save_file(shards[0], str(out_dir / WEIGHTS_NAME), metadata=meta)
        return
    weight_map, total = {}, 0
    for i, shard in enumerate(shards, 1):
        fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(out_dir / fname), metadata=meta)
        for name, t in shard.items():
            weight_map[name] = fname
            total += t.numel() * t.element_size()
    (out_dir / INDEX_NAME).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                                 indent=2), encoding="utf-8")
