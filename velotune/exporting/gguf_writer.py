"""GGUF export for llama.cpp and Ollama, pure Python: the `gguf` package writes the file and quantizes with numpy.

    export_gguf(model, tokenizer, "out_dir", quant="q8_0")   # out_dir/model.gguf + out_dir/Modelfile
    export_gguf(model, tokenizer, "name.gguf", quant="f16")  # name.gguf + name.Modelfile beside it

A single-file export names its Modelfile after the .gguf (`a.gguf` -> `a.Modelfile`), so that several exports
can share a folder (`ollama create a -f a.Modelfile`); a directory export writes `model.gguf` and `Modelfile`.

LoRA adapters are merged and quantized bases dequantized in fp32 first, once; each tensor is then written in the
asked type. 1-D tensors (norms, biases, RoPE factors) stay F32, as llama.cpp keeps them; a matrix whose rows do
not split into the type's blocks falls back to F16. The file is written under a temporary name and renamed
into place, so an interrupted export never leaves a half-written file under the final name; the temporaries of
an interrupted export are removed by the next one.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from ..errors import UnsupportedError
from ..models.checkpoint import atomic_dir, publish_file, remove_stale_temporaries, temporary_file_beside
from .gguf_arch import arch_spec, gguf_arch, gguf_tensors, write_hparams
from .gguf_meta import write_general
from .gguf_vocab import write_vocab
from .output import check_output, write_text_atomic

log = logging.getLogger("velotune")

GGUF_NAME = "model.gguf"
MODELFILE_NAME = "Modelfile"
# What gguf.quants can write in Python (K-quants and i-quants need llama.cpp's compiled llama-quantize).
QUANT_TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1")
_ALIASES = {"fp32": "f32", "float32": "f32", "fp16": "f16", "float16": "f16", "bfloat16": "bf16"}
# quant -> (GGMLQuantizationType member, LlamaFileType member)
_GGUF_TYPES = {"f32": ("F32", "ALL_F32"), "f16": ("F16", "MOSTLY_F16"), "bf16": ("BF16", "MOSTLY_BF16"),
               "q8_0": ("Q8_0", "MOSTLY_Q8_0"), "q4_0": ("Q4_0", "MOSTLY_Q4_0"), "q4_1": ("Q4_1", "MOSTLY_Q4_1"),
               "q5_0": ("Q5_0", "MOSTLY_Q5_0"), "q5_1": ("Q5_1", "MOSTLY_Q5_1")}


def resolve_quant(quant, dtype=None) -> str:
    """The quant type name; default: the dtype asked for (float32 -> f32 ...), else f16."""
    if quant is None:
        name = str(dtype).replace("torch.", "") if dtype is not None else "f16"
    else:
        name = str(quant)
    key = _ALIASES.get(name.strip().lower(), name.strip().lower())
    if key not in QUANT_TYPES:
        raise UnsupportedError(f"GGUF quant type {name!r} cannot be written by the gguf package in Python; "
                               f"supported: {', '.join(QUANT_TYPES)} (K-quants such as q4_k_m: run llama.cpp's "
                               "llama-quantize on an f16 export)")
    return key


def gguf_paths(out) -> tuple[Path, Path]:
    """(GGUF file, Modelfile): `out` and `out` with the suffix .Modelfile when it ends in .gguf, else
    `out`/model.gguf and `out`/Modelfile."""
    out = Path(out)
    if out.suffix.lower() == ".gguf":
        return out, out.with_name(f"{out.stem}.{MODELFILE_NAME}")
    return out / GGUF_NAME, out / MODELFILE_NAME


def check_gguf_output(out, overwrite: bool) -> bool:
    """Refuses existing outputs unless `overwrite`; returns whether `out` names a single .gguf file."""
    single_file = Path(out).suffix.lower() == ".gguf"
    for path in gguf_paths(out) if single_file else (Path(out),):
        check_output(path, overwrite)
    return single_file


def export_gguf(model, tokenizer, out, quant=None, dtype=None, overwrite: bool = False) -> Path:
    """Writes the GGUF file and an Ollama Modelfile; returns the GGUF path. Everything that can be refused
    (architecture, tensors, quant type, vocabulary, existing output) is refused before the file is opened."""
    from .modelfile import modelfile_text
    quant = resolve_quant(quant, dtype)
    spec = arch_spec(model)
    if tokenizer is None:
        raise UnsupportedError("GGUF export needs the model's tokenizer: llama.cpp reads the vocabulary from the file")
    gguf_path, modelfile_path = gguf_paths(out)
    single_file = check_gguf_output(out, overwrite)
    writer = build_writer(model, tokenizer, spec, quant)
    text = modelfile_text(model, tokenizer, f"./{gguf_path.name}")
    if single_file:
        gguf_path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(gguf_path.parent)
        write_atomic(writer, gguf_path)
        write_text_atomic(modelfile_path, text)
    else:
        with atomic_dir(Path(out), overwrite=overwrite) as tmp:
            write_atomic(writer, tmp / GGUF_NAME)
            (tmp / MODELFILE_NAME).write_text(text, encoding="utf-8")
    log.info("wrote %s (%s) and %s", gguf_path, quant, modelfile_path)
    return gguf_path


def build_writer(model, tokenizer, spec, quant: str):
    """A GGUFWriter holding the metadata and every tensor, nothing written to disk yet."""
    import gguf
    from ..lora import merged_state_dict
    tensors = gguf_tensors(model, merged_state_dict(model, torch.float32), spec)
    writer = gguf.GGUFWriter(None, gguf.MODEL_ARCH_NAMES[gguf_arch(spec)])
    write_general(writer, model, getattr(gguf.LlamaFileType, _GGUF_TYPES[quant][1]))
    write_hparams(writer, model, spec)
    write_vocab(writer, tokenizer, model.args.vocab_size)
    target = getattr(gguf.GGMLQuantizationType, _GGUF_TYPES[quant][0])
    fallbacks = []
    tensors.reverse()
    while tensors:  # popped one by one: each fp32 copy is freed once encoded
        name, tensor = tensors.pop()
        # Biases stay F32 whatever their rank (gpt-oss's expert biases are 2-D: ggml adds only F32 ones), and
        # so do MoE routers (`ffn_gate_inp`), as llama.cpp's own converter keeps them.
        keep_f32 = name.endswith(".bias") or ".ffn_gate_inp." in name
        data, qtype = encode_tensor(tensor.detach().cpu().numpy().astype(np.float32, copy=False),
                                    gguf.GGMLQuantizationType.F32 if keep_f32 else target)
        if not keep_f32 and qtype != target and tensor.dim() > 1:
            fallbacks.append(name)
        writer.add_tensor(name, data, raw_dtype=qtype)
    if fallbacks:
        log.info("GGUF export: %d matrices written as F16, their rows not a multiple of the %s block: %s",
                 len(fallbacks), quant, ", ".join(fallbacks[:4]) + (" ..." if len(fallbacks) > 4 else ""))
    return writer


def encode_tensor(array: np.ndarray, target):
    """(data, type): 1-D tensors in F32; matrices in `target`, or F16 when their rows do not fit its blocks."""
    import gguf
    from gguf.quants import quantize
    types = gguf.GGMLQuantizationType
    if array.ndim < 2 or target == types.F32:
        return array, types.F32
    block = gguf.GGML_QUANT_SIZES[target][0]
    qtype = target if array.shape[-1] % block == 0 else types.F16
    return quantize(array, qtype), qtype


def write_atomic(writer, final: Path):
    """Writes the file under a temporary name beside `final`, then renames it; on any error removes the
    temporary file and leaves `final` as it was."""
    tmp = temporary_file_beside(final)
    try:
        writer.write_header_to_file(tmp)
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        publish_file(tmp, final)
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise
