"""velotune's safetensors reader (plain reads, no memory map) gives the safetensors package's tensors, checks the
header before reading, and names the file and tensor when a file is damaged."""
import json
import struct

import pytest
import torch
from safetensors.torch import load_file as package_load, save_file

from velotune.errors import CheckpointError
from velotune.models import safetensors_reader as reader
from velotune.models.checkpoint import iter_tensors


def _every_dtype() -> dict:
    g = torch.Generator().manual_seed(0)
    out = {
        "f64": torch.randn(3, 5, dtype=torch.float64, generator=g),
        "f32": torch.randn(4, 7, generator=g),
        "bf16": torch.randn(2, 3, 5, generator=g).to(torch.bfloat16),
        "f16": torch.randn(9, generator=g).to(torch.float16),
        "i64": torch.randint(-9, 9, (6,), generator=g),
        "i32": torch.randint(-9, 9, (2, 2), generator=g, dtype=torch.int32),
        "i16": torch.randint(-9, 9, (3,), generator=g, dtype=torch.int16),
        "i8": torch.randint(-9, 9, (5,), generator=g, dtype=torch.int8),
        "u8": torch.randint(0, 255, (2, 8), generator=g, dtype=torch.uint8),
        "bool": torch.rand(7, generator=g) > 0.5,
        "scalar": torch.tensor(3.5),
        "empty": torch.zeros(0, 4),
    }
    if hasattr(torch, "float8_e4m3fn"):
        out["f8"] = torch.randn(4, 4, generator=g).to(torch.float8_e4m3fn)
    return out


def test_same_tensors_as_the_package(tmp_path):
    path = tmp_path / "t.safetensors"
    save_file(_every_dtype(), str(path), metadata={"format": "pt"})
    ours, theirs = reader.load_file(path), package_load(str(path))
    assert list(ours) == sorted(theirs)
    for name, tensor in theirs.items():
        assert ours[name].dtype == tensor.dtype and ours[name].shape == tensor.shape, name
        assert _bytes(ours[name]) == _bytes(tensor), name


def _bytes(tensor: torch.Tensor) -> bytes:
    return tensor.reshape(-1).view(torch.uint8).numpy().tobytes()


def test_tensors_are_writable_and_independent(tmp_path):
    path = tmp_path / "t.safetensors"
    save_file({"a": torch.ones(4), "b": torch.ones(4)}, str(path))
    tensors = reader.load_file(path)
    tensors["a"] += 1  # its own buffer: neither the file nor the other tensor changes
    assert torch.equal(tensors["b"], torch.ones(4))
    assert torch.equal(reader.load_file(path)["a"], torch.ones(4))


def test_large_tensors_are_read_in_pieces(tmp_path, monkeypatch):
    monkeypatch.setattr(reader, "_READ_PIECE", 7)  # forces several reads per tensor
    path = tmp_path / "t.safetensors"
    x = torch.randn(33, 5)
    save_file({"x": x}, str(path))
    assert torch.equal(reader.load_file(path)["x"], x)


def test_unknown_dtype_falls_back_to_the_package(tmp_path, monkeypatch):
    path = tmp_path / "t.safetensors"
    save_file({"x": torch.arange(6, dtype=torch.int16)}, str(path))
    monkeypatch.delitem(reader._DTYPES, "I16")
    assert torch.equal(reader.load_file(path)["x"], torch.arange(6, dtype=torch.int16))


def _raw_file(path, header: dict, data: bytes, claimed: int | None = None):
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text) if claimed is None else claimed) + text + data)
    return path


@pytest.mark.parametrize("header, data, claimed, words", [
    ({"x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 4, None, "do not lie inside"),
    ({"x": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, b"\0" * 8, None, "needs 12"),
    ({"x": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 8]}}, b"\0" * 8, None, "non-negative"),
    ({"x": {"shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8, None, "'dtype'"),
    ({"x": [1, 2]}, b"", None, "not an object"),
    ({"x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8, 10 ** 9, "header claims"),
])
def test_damaged_headers_name_the_file_and_tensor(tmp_path, header, data, claimed, words):
    path = _raw_file(tmp_path / "bad.safetensors", header, data, claimed)
    with pytest.raises(CheckpointError, match=words) as err:
        reader.load_file(path)
    assert str(path) in str(err.value)


def test_not_json_and_too_short(tmp_path):
    short = tmp_path / "short.safetensors"
    short.write_bytes(b"\1\2")
    with pytest.raises(CheckpointError, match="truncated"):
        reader.load_file(short)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(struct.pack("<Q", 4) + b"\xff{[x")
    with pytest.raises(CheckpointError, match="not JSON"):
        reader.load_file(garbage)


def test_iter_tensors_reads_every_file(tmp_path):
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    save_file({"x": torch.ones(2)}, str(a))
    save_file({"y": torch.zeros(3)}, str(b))
    got = [(name, file.name) for name, _, file in iter_tensors([a, b])]
    assert got == [("x", "a.safetensors"), ("y", "b.safetensors")]


def test_loading_does_not_map_the_file(tmp_path):
    """The reason for the module: no tensor's storage lies in a map of the file."""
    path = tmp_path / "t.safetensors"
    save_file({"x": torch.randn(1000)}, str(path))
    for _, tensor in reader.iter_file(path):
        with open("/proc/self/maps") as maps:
            assert str(path) not in maps.read()
        assert tensor.untyped_storage().nbytes() == tensor.numel() * tensor.element_size()
