"""Hugging Face checkpoint files: find the directory, read config.json and (sharded) safetensors, write them back.

Every read error names the file; every write goes to a temporary name first and is renamed into place,
so an interrupted save never leaves a half-written file under the final name. An overwrite replaces only what
velotune wrote (each directory it writes lists its entries in MANIFEST_NAME) and keeps the user's files; the
temporaries an interrupted writer leaves are removed by the next write beside them. Outputs get the modes the
umask allows, as any file a tool writes.
"""
from __future__ import annotations

import json
import logging
import os
import re
import secrets
import shutil
import tempfile
from pathlib import Path

import torch

from ..errors import CheckpointError

log = logging.getLogger("velotune")

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
DEFAULT_SHARD_BYTES = 5 * 1024 ** 3
# Written into every directory atomic_dir writes: the entries velotune wrote there, so that an overwrite can
# tell them from the user's own files.
MANIFEST_NAME = ".velotune-files.json"
# `.NAME.tmp-PID-xxxx` / `.NAME.old-PID-xxxx` (xxxx: mkdtemp's or token_hex's letters and digits): what a
# writer leaves behind if it dies mid-write.
_TEMPORARY = re.compile(r"\..+\.(?:tmp|old)-(\d+)-\w+", re.ASCII)


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
    except UnicodeDecodeError as exc:
        raise CheckpointError(f"{path}: not UTF-8 text (byte {exc.start}: {exc.reason}); is it a JSON file?") from None


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
    from .safetensors_reader import iter_file
    for file in files:
        try:
            for name, tensor in iter_file(file):
                yield name, tensor, file
        except CheckpointError:
            raise
        except Exception as exc:
            size = file.stat().st_size if file.exists() else 0
            raise CheckpointError(f"{file}: cannot read safetensors ({size} bytes; truncated or corrupt?): "
                                  f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None


def atomic_dir(final: Path, overwrite: bool = False):
    """Context manager: yields a temporary directory beside `final`, moved into place on success only.

    Without `overwrite` a non-empty `final` is refused. With it, only what velotune wrote there before (listed
    in the directory's MANIFEST_NAME) is replaced or removed: other files in `final` are kept. A directory
    without a manifest is taken as the user's, except for the names this write writes."""
    return _AtomicDir(Path(final), overwrite)


class _AtomicDir:
    def __init__(self, final: Path, overwrite: bool):
        self.final, self.overwrite = final, overwrite

    def __enter__(self) -> Path:
        final = self.final
        if final.exists() and not final.is_dir():
            raise CheckpointError(f"{final}: exists and is a file, not a directory")
        if final.exists() and not self.overwrite and any(final.iterdir()):
            raise CheckpointError(f"{final}: already exists and is not empty (pass overwrite=True to replace)")
        final.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(final.parent)
        remove_stale_temporaries(final)
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-{os.getpid()}-", dir=final.parent))
        return self.tmp

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return False
        written = sorted(p.name for p in self.tmp.iterdir() if p.name != MANIFEST_NAME)
        _write_manifest(self.tmp / MANIFEST_NAME, written)
        apply_umask_modes(self.tmp)
        previous = _read_manifest(self.final)
        if not self.final.exists():
            os.replace(self.tmp, self.final)
        elif previous is not None and set(_entries(self.final)) <= previous:
            _swap_directories(self.tmp, self.final)
        else:
            _move_entries_into(self.tmp, self.final, written, previous or set())
        return False


def _entries(directory: Path) -> list[str]:
    return [p.name for p in directory.iterdir() if p.name != MANIFEST_NAME]


def _read_manifest(directory: Path) -> set[str] | None:
    """The entries velotune wrote in `directory`; None without a readable manifest (the user's directory)."""
    try:
        entries = json.loads((directory / MANIFEST_NAME).read_text(encoding="utf-8"))["entries"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return {e for e in entries if isinstance(e, str) and e and "/" not in e and e not in (".", "..")}


def _write_manifest(path: Path, entries) -> None:
    path.write_text(json.dumps({"written_by": "velotune", "entries": sorted(entries)}, indent=1) + "\n",
                    encoding="utf-8")


def _swap_directories(new: Path, final: Path):
    old = final.with_name(f".{final.name}.old-{os.getpid()}-{secrets.token_hex(4)}")
    os.replace(final, old)
    os.replace(new, final)
    shutil.rmtree(old, ignore_errors=True)


def _move_entries_into(new: Path, final: Path, written: list[str], previous: set[str]):
    """Moves each new entry into `final`, removes our previous entries this write no longer has, keeps the
    rest. The manifest lists old and new entries while moving, so an interruption leaves nothing of ours
    unlisted (an unlisted entry would be kept forever as the user's)."""
    union = final / f"{MANIFEST_NAME}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
    _write_manifest(union, previous | set(written))
    publish_file(union, final / MANIFEST_NAME)
    for name in written:
        _replace_entry(new / name, final / name)
    for name in sorted(previous - set(written)):
        _remove_entry(final / name)
    publish_file(new / MANIFEST_NAME, final / MANIFEST_NAME)
    new.rmdir()


def _replace_entry(source: Path, target: Path):
    """os.replace, also where a directory replaces a directory (or a file) that rename cannot overwrite."""
    if os.path.lexists(target) and (source.is_dir() or (target.is_dir() and not target.is_symlink())):
        aside = target.with_name(f".{target.name}.old-{os.getpid()}-{secrets.token_hex(4)}")
        os.replace(target, aside)
        os.replace(source, target)
        _remove_entry(aside)
    else:
        os.replace(source, target)


def _remove_entry(path: Path):
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.lexists(path):
        path.unlink()


def remove_stale_temporaries(directory) -> list[Path]:
    """Removes the leftovers of interrupted writes directly inside `directory` (`.NAME.tmp-PID-xxxx`,
    `.NAME.old-PID-xxxx`) whose writer is no longer running; returns them. Never another live process's, nor
    this process's own."""
    directory = Path(directory)
    if os.name == "nt" or not directory.is_dir():  # os.kill(pid, 0) would terminate a process on Windows
        return []
    removed = []
    for path in sorted(directory.iterdir()):
        match = _TEMPORARY.fullmatch(path.name)
        if match is None or int(match.group(1)) == os.getpid() or process_alive(int(match.group(1))):
            continue
        _remove_entry(path)
        removed.append(path)
    if removed:
        log.info("removed %d leftover(s) of interrupted writes in %s: %s", len(removed), directory,
                 ", ".join(p.name for p in removed))
    return removed


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):  # another user's process, or no possible PID: keep it
        return True
    return True


def umask_default_mode(is_dir: bool = False) -> int:
    """The mode a new file (0666) or directory (0777) gets under the process umask."""
    return (0o777 if is_dir else 0o666) & ~current_umask()


def apply_umask_modes(tree: Path):
    """Gives `tree` and everything in it the modes the umask allows: mkdtemp makes 0700 and some writers
    (safetensors) 0600 files, but an output is read by other users and tools like any other file."""
    file_mode, dir_mode = umask_default_mode(is_dir=False), umask_default_mode(is_dir=True)
    os.chmod(tree, dir_mode)
    for root, dirs, files in os.walk(tree):
        for name in dirs + files:
            path = os.path.join(root, name)
            if not os.path.islink(path):
                os.chmod(path, dir_mode if name in dirs else file_mode)


def current_umask() -> int:
    """The umask, read from /proc where possible: setting it to read it would race with other threads."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def temporary_file_beside(final: Path) -> Path:
    """A new empty file `.NAME.tmp-PID-xxxx` beside `final` (mode 0600 until `publish_file`)."""
    fd, name = tempfile.mkstemp(prefix=f".{final.name}.tmp-{os.getpid()}-", dir=final.parent)
    os.close(fd)
    return Path(name)


def publish_file(tmp: Path, final: Path):
    """Gives a finished temporary file the mode the umask allows and renames it to `final`."""
    os.chmod(tmp, umask_default_mode(is_dir=False))
    os.replace(tmp, final)


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
