"""Reads safetensors files with plain reads instead of a memory map, so loading a model does not add the file's
size to the process's resident memory.

The `safetensors` package maps the whole file and copies each tensor out of the map: every page it touched stays
mapped, and counted in the process's RSS, until the file is closed, so loading a checkpoint peaks at the weights
plus the whole file (measured: iterating a 329 MB file and casting each tensor to bf16 peaked 336 MB above torch's
own RSS, against 97 MB - the largest tensor and its cast - with reads). Here each tensor is read straight into its
own buffer; the page cache still holds the file, outside the process.

Format: 8 bytes (little-endian u64) of header length, a JSON header {name: {dtype, shape, data_offsets}} with an
optional "__metadata__" entry, then the data; offsets are relative to the data's start. The header is checked
before any tensor is read (sizes, offsets inside the file, the bytes each shape needs), and a file this module
cannot read as it is (a dtype it does not know, a big-endian machine) is read by the `safetensors` package
instead: its results are the same tensors.
"""
from __future__ import annotations

import json
import struct
import sys
from pathlib import Path

import torch

from ..errors import CheckpointError

# The header is JSON text; the safetensors package refuses headers above 100 MB too.
MAX_HEADER_BYTES = 100 * 1024 * 1024
# One read() returns at most ~2 GiB on Linux; larger tensors are read in pieces.
_READ_PIECE = 1 << 30

_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
for _name, _attr in (("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2"), ("U16", "uint16"),
                     ("U32", "uint32"), ("U64", "uint64")):
    if hasattr(torch, _attr):  # dtypes a torch release may lack
        _DTYPES[_name] = getattr(torch, _attr)


def read_header(path: Path, handle) -> tuple[dict, int]:
    """The checked header {name: (dtype, shape, begin, end)} and the data's start offset in the file."""
    size = Path(path).stat().st_size
    head = handle.read(8)
    if len(head) < 8:
        raise CheckpointError(f"{path}: cannot read as safetensors ({size} bytes; truncated?)")
    length = struct.unpack("<Q", head)[0]
    if length > min(MAX_HEADER_BYTES, size - 8):
        raise CheckpointError(f"{path}: cannot read as safetensors (its header claims {length} bytes of {size}; "
                              "truncated or corrupt?)")
    try:
        header = json.loads(handle.read(length))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: cannot read as safetensors (its header is not JSON: {exc})") from None
    if type(header) is not dict:
        raise CheckpointError(f"{path}: cannot read as safetensors (its header is not a JSON object)")
    data_bytes = size - 8 - length
    entries = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        entries[name] = _checked_entry(path, name, entry, data_bytes)
    return entries, 8 + length


def _checked_entry(path, name: str, entry, data_bytes: int) -> tuple:
    where = f"{path}: tensor {name!r}"
    if type(entry) is not dict:
        raise CheckpointError(f"{where}: its header entry is not an object")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if type(dtype) is not str:
        raise CheckpointError(f"{where}: 'dtype' is missing or not a string")
    if type(shape) is not list or any(type(d) is not int or d < 0 for d in shape):
        raise CheckpointError(f"{where}: 'shape' must be a list of non-negative integers, got {shape!r}")
    if (type(offsets) is not list or len(offsets) != 2 or any(type(o) is not int for o in offsets)
            or not 0 <= offsets[0] <= offsets[1] <= data_bytes):
        raise CheckpointError(f"{where}: 'data_offsets' {offsets!r} do not lie inside the file's {data_bytes} "
                              "bytes of data (truncated or corrupt?)")
    torch_dtype = _DTYPES.get(dtype)
    if torch_dtype is not None:
        numel = 1
        for d in shape:
            numel *= d
        need = numel * torch_dtype.itemsize
        if offsets[1] - offsets[0] != need:
            raise CheckpointError(f"{where}: holds {offsets[1] - offsets[0]} bytes, its {dtype} shape {shape} "
                                  f"needs {need}")
    return torch_dtype, shape, offsets[0], offsets[1]


def iter_file(path: Path):
    """Yields (name, tensor) for every tensor of one safetensors file, in name order (as safetensors does)."""
    path = Path(path)
    with open(path, "rb", buffering=0) as handle:
        entries, start = read_header(path, handle)
        if sys.byteorder != "little" or any(e[0] is None for e in entries.values()):
            yield from _iter_with_package(path)
            return
        for name in sorted(entries):
            dtype, shape, begin, end = entries[name]
            yield name, _read_tensor(path, name, handle, start + begin, end - begin).view(dtype).reshape(shape)


def _read_tensor(path, name: str, handle, offset: int, nbytes: int) -> torch.Tensor:
    buffer = torch.empty(nbytes, dtype=torch.uint8)
    view = memoryview(buffer.numpy())
    handle.seek(offset)
    done = 0
    while done < nbytes:
        got = handle.readinto(view[done:done + _READ_PIECE])
        if not got:
            raise CheckpointError(f"{path}: tensor {name!r}: the file ends {nbytes - done} bytes short of it "
                                  "(truncated?)")
        done += got
    return buffer


def _iter_with_package(path: Path):
    from safetensors import safe_open
    with safe_open(str(path), framework="pt") as f:
        for name in f.keys():
            yield name, f.get_tensor(name)


def load_file(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of one safetensors file, by name."""
    return dict(iter_file(path))
