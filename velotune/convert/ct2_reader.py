"""Reading CTranslate2's `model.bin` with numpy alone: the header, every variable, and the aliases.

The file is little-endian and holds, in order: the binary version (uint32); the spec name (string) and its
revision (uint32); the variable count (uint32), then per variable its name (string), rank (uint8), each dimension
(uint32), a dtype id (uint8: float32, int8, int16, int32, float16, bfloat16) and the byte count (uint32) before
the raw data; finally the alias count (uint32) and (alias, target) string pairs. A string is a uint16 length that
counts a trailing NUL, then the UTF-8 bytes and the NUL. Versions 4 to 6 share this layout (older ones stored an
item size instead of a dtype id and predate every Whisper model), so only those are read.

Opening a file reads the header and records where each array lies; `array(name)` then reads that one array, so
a multi-gigabyte model never sits in memory twice. Quantized weights (`NAME` beside `NAME_scale`) come back
dequantized to float32. Nothing here executes what it reads.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import CheckpointError, UnsupportedError

SUPPORTED_BINARY_VERSIONS = (4, 5, 6)
# Index = dtype id in the file. bfloat16 has no numpy dtype: read as uint16, widened to float32 on access.
_DTYPES = ("float32", "int8", "int16", "int32", "float16", "bfloat16")
_NUMPY_DTYPES = (np.float32, np.int8, np.int16, np.int32, np.float16, np.uint16)
# No real spec comes near these; they keep a corrupt count from looping for hours or allocating wildly.
_MAX_RANK = 8
_MAX_ENTRIES = 10_000_000


@dataclass(frozen=True)
class Ct2Variable:
    """Where one array lies in model.bin and what it is."""

    name: str
    shape: tuple[int, ...]
    dtype: str          # one of _DTYPES
    offset: int         # byte offset of the raw data in the file
    nbytes: int


class Ct2Model:
    """The parsed header of a model.bin; arrays are read on demand with `array(name)`."""

    def __init__(self, path: Path, binary_version: int, spec: str, revision: int,
                 variables: dict[str, Ct2Variable], aliases: dict[str, str]):
        self.path, self.binary_version, self.spec, self.revision = path, binary_version, spec, revision
        self.variables, self.aliases = variables, aliases

    def names(self) -> list[str]:
        """Every name the file defines, aliases included."""
        return sorted(set(self.variables) | set(self.aliases))

    def __contains__(self, name: str) -> bool:
        return name in self.variables or name in self.aliases

    def resolve(self, name: str) -> Ct2Variable:
        """The stored variable behind `name`, following aliases (the converter that wrote the file aliases a
        variable equal to an earlier one, e.g. a projection tied to the embeddings)."""
        seen = []
        while name in self.aliases:
            if name in seen:
                raise CheckpointError(f"{self.path}: alias loop {' -> '.join(seen + [name])}")
            seen.append(name)
            name = self.aliases[name]
        if name not in self.variables:
            via = f" (reached through alias {' -> '.join(seen)})" if seen else ""
            raise CheckpointError(f"{self.path}: no variable '{name}'{via}")
        return self.variables[name]

    def raw(self, name: str) -> np.ndarray:
        """The array exactly as stored (bfloat16 as its uint16 bit patterns)."""
        var = self.resolve(name)
        count = int(np.prod(var.shape, dtype=np.int64))
        dtype = np.dtype(_NUMPY_DTYPES[_DTYPES.index(var.dtype)]).newbyteorder("<")
        with open(self.path, "rb") as f:
            data = np.fromfile(f, dtype=dtype, count=count, offset=var.offset)
        if data.size != count:  # the file shrank after its header was read
            raise CheckpointError(f"{self.path}: variable '{name}' is cut short (file changed while reading?)")
        return data.reshape(var.shape)

    def array(self, name: str) -> np.ndarray:
        """The array as float32 when it holds weights (float16/bfloat16 widened exactly, int8/int16 with a
        `NAME_scale` companion dequantized), or as its own integer type when it is a plain integer value."""
        var = self.resolve(name)
        data = self.raw(name)
        if var.dtype == "bfloat16":
            return (data.astype(np.uint32) << 16).view(np.float32)
        if var.dtype in ("float32", "float16"):
            return data.astype(np.float32)
        if f"{name}_zero" in self:
            raise UnsupportedError(f"{self.path}: '{name}' is stored with zero points (AWQ-style quantization); "
                                   f"only float32/float16/bfloat16 and CTranslate2 int8/int16 weights are read")
        if f"{name}_scale" in self:
            return _dequantize(data, self.array(f"{name}_scale"), f"{self.path}: '{name}'")
        return data

    def scalar(self, name: str, default=None):
        """A scalar attribute (num_heads, activation...) as a Python int or float, or `default` if absent."""
        if name not in self:
            return default
        value = self.raw(name)
        if value.size != 1:
            raise CheckpointError(f"{self.path}: '{name}' should be a single value, has shape {value.shape}")
        return value.reshape(()).item()


def _dequantize(values: np.ndarray, scale: np.ndarray, where: str) -> np.ndarray:
    """CTranslate2 stores q = round(w * scale): one scale per output row (int8) or one for the tensor (int16)."""
    values = values.astype(np.float32)
    if scale.size == 1:
        return values / np.float32(scale.reshape(()))
    if scale.ndim == 1 and values.ndim >= 1 and scale.shape[0] == values.shape[0]:
        return values / scale.astype(np.float32).reshape((-1,) + (1,) * (values.ndim - 1))
    raise CheckpointError(f"{where}: scale of shape {scale.shape} does not fit weights of shape {values.shape}")


class _Cursor:
    """Sequential reads from the file, each checked against its size so truncation names the place."""

    def __init__(self, f, path: Path, size: int):
        self.f, self.path, self.size = f, path, size

    def take(self, count: int, what: str) -> bytes:
        start = self.f.tell()
        if start + count > self.size:
            raise CheckpointError(f"{self.path}: truncated: {what} needs {count} bytes at offset {start}, "
                                  f"but the file ends at {self.size} bytes")
        return self.f.read(count)

    def unpack(self, fmt: str, what: str):
        return struct.unpack("<" + fmt, self.take(struct.calcsize("<" + fmt), what))[0]

    def string(self, what: str) -> str:
        length = self.unpack("H", f"the length of {what}")
        raw = self.take(length, what)
        if length == 0 or raw[-1:] != b"\0":
            raise CheckpointError(f"{self.path}: corrupt {what} at offset {self.f.tell() - length}: "
                                  f"not a NUL-terminated string")
        try:
            return raw[:-1].decode("utf-8")
        except UnicodeDecodeError:
            raise CheckpointError(f"{self.path}: corrupt {what}: not UTF-8") from None

    def skip(self, count: int, what: str):
        start = self.f.tell()
        if start + count > self.size:
            raise CheckpointError(f"{self.path}: truncated: {what} needs {count} bytes at offset {start}, "
                                  f"but the file ends at {self.size} bytes")
        self.f.seek(start + count)


def read_ct2_model(path: str | Path) -> Ct2Model:
    """Parses the header of a CTranslate2 model.bin (a file, or a directory holding one).

    Raises CheckpointError naming the file when it is missing, truncated or corrupt, and UnsupportedError
    for a binary version this reader does not know."""
    path = Path(path)
    if path.is_dir():
        path = path / "model.bin"
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file (a CTranslate2 model directory holds model.bin)")
    size = path.stat().st_size
    with open(path, "rb") as f:
        cur = _Cursor(f, path, size)
        version = cur.unpack("I", "the binary version")
        if version not in SUPPORTED_BINARY_VERSIONS:
            raise UnsupportedError(
                f"{path}: CTranslate2 binary version {version} is not supported (read: "
                f"{', '.join(map(str, SUPPORTED_BINARY_VERSIONS))}); not a CTranslate2 model.bin, or one too old "
                f"or too new for this reader")
        spec = cur.string("the spec name")
        revision = cur.unpack("I", "the spec revision")
        variables = _read_variables(cur)
        aliases = _read_aliases(cur)
        if f.tell() != size:
            raise CheckpointError(f"{path}: {size - f.tell()} unexpected bytes after the last alias "
                                  f"(corrupt file, or not a CTranslate2 model.bin)")
    return Ct2Model(path, version, spec, revision, variables, aliases)


def _read_variables(cur: _Cursor) -> dict[str, Ct2Variable]:
    count = cur.unpack("I", "the variable count")
    if count > _MAX_ENTRIES:
        raise CheckpointError(f"{cur.path}: corrupt header: {count} variables")
    variables: dict[str, Ct2Variable] = {}
    for index in range(count):
        name = cur.string(f"the name of variable {index}")
        rank = cur.unpack("B", f"the rank of '{name}'")
        if rank > _MAX_RANK:
            raise CheckpointError(f"{cur.path}: corrupt variable '{name}': rank {rank}")
        shape = tuple(cur.unpack("I", f"a dimension of '{name}'") for _ in range(rank))
        type_id = cur.unpack("B", f"the dtype of '{name}'")
        if type_id >= len(_DTYPES):
            raise CheckpointError(f"{cur.path}: variable '{name}' has unknown dtype id {type_id} "
                                  f"(known: {', '.join(f'{i}={d}' for i, d in enumerate(_DTYPES))})")
        nbytes = cur.unpack("I", f"the byte count of '{name}'")
        dtype = _DTYPES[type_id]
        expected = int(np.prod(shape, dtype=np.int64)) * np.dtype(_NUMPY_DTYPES[type_id]).itemsize
        if nbytes != expected:
            raise CheckpointError(f"{cur.path}: corrupt variable '{name}': shape {list(shape)} of {dtype} needs "
                                  f"{expected} bytes, the file says {nbytes}")
        if name in variables:
            raise CheckpointError(f"{cur.path}: variable '{name}' appears twice")
        variables[name] = Ct2Variable(name, shape, dtype, cur.f.tell(), nbytes)
        cur.skip(nbytes, f"the data of '{name}'")
    return variables


def _read_aliases(cur: _Cursor) -> dict[str, str]:
    count = cur.unpack("I", "the alias count")
    if count > _MAX_ENTRIES:
        raise CheckpointError(f"{cur.path}: corrupt header: {count} aliases")
    aliases = {}
    for index in range(count):
        alias = cur.string(f"alias {index}")
        aliases[alias] = cur.string(f"the target of alias '{alias}'")
    return aliases
