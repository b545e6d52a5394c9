"""Turning a Whisper model in CTranslate2's format (faster-whisper's) into a Hugging Face Whisper directory.

Input: a directory with `model.bin` (read by ct2_reader), `tokenizer.json` and, usually, CTranslate2's
`config.json` (suppressed tokens, alignment heads, language ids). Output: `config.json`, `model.safetensors`,
`generation_config.json`, `tokenizer.json` + `tokenizer_config.json` + `special_tokens_map.json`,
`preprocessor_config.json` and `velotune-conversion.json` (where it came from, and what was assumed), which
`WhisperForConditionalGeneration.from_pretrained` and `WhisperProcessor.from_pretrained` load.

CTranslate2 fuses projections: self-attention stores one [3d, d] Q|K|V matrix, cross-attention Q alone and one
[2d, d] K|V matrix, each with a bias where K's part is zeros (Hugging Face's k_proj has no bias). The key bias
is dropped: it adds q·b_k to every score of a query row alike, which softmax cancels, so even a nonzero one
changes nothing. Every hyperparameter is read from the shapes and the spec's own scalars, never guessed from a
model name. The output directory is written beside its final place and renamed in; a directory velotune did
not write is never overwritten.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ..errors import CheckpointError, ConfigError, UnsupportedError, VelotuneError
from .ct2_reader import Ct2Model, read_ct2_model

OUTPUT_DTYPES = ("float32", "float16", "bfloat16")
RECORD_NAME = "velotune-conversion.json"
_GELU = 3  # CTranslate2's Activation enum
# Whisper's special tokens in vocabulary order; the first is also bos/eos/unk/pad for the tokenizer.
_SPECIALS = ("<|endoftext|>", "<|startoftranscript|>", "<|translate|>", "<|transcribe|>", "<|startoflm|>",
             "<|startofprev|>", "<|nocaptions|>", "<|notimestamps|>")
_SECONDS_PER_TIMESTAMP = 0.02


@dataclass(frozen=True)
class WhisperShape:
    """The hyperparameters of the model, all read from model.bin."""

    vocab_size: int
    d_model: int
    num_mel_bins: int
    encoder_layers: int
    decoder_layers: int
    encoder_attention_heads: int
    decoder_attention_heads: int
    encoder_ffn_dim: int
    decoder_ffn_dim: int
    max_source_positions: int
    max_target_positions: int


def convert_ct2_whisper(src_dir: str | Path, out_dir: str | Path, *, dtype: str = "float32") -> Path:
    """Converts the CTranslate2 Whisper model in `src_dir` into a Hugging Face directory `out_dir`.

    `dtype` is the weights' type in model.safetensors: float32 (default), float16 or bfloat16. `out_dir` may be
    missing, empty, or an earlier output of this converter (replaced); anything else is refused. Returns `out_dir`."""
    from ..models.checkpoint import atomic_dir, save_safetensors

    src, out = Path(src_dir), Path(out_dir)
    if dtype not in OUTPUT_DTYPES:
        raise ConfigError(f"dtype: '{dtype}' is not one of {', '.join(OUTPUT_DTYPES)}")
    if not src.is_dir():
        raise CheckpointError(f"{src}: no such directory (expected a CTranslate2 Whisper model directory)")
    _refuse_foreign_output(out)
    model = read_ct2_model(src / "model.bin")
    if model.spec != "WhisperSpec":
        raise UnsupportedError(f"{model.path}: spec '{model.spec or '(none)'}' is not a Whisper model; "
                               f"only CTranslate2's WhisperSpec is converted")
    _check_architecture(model)
    shape = read_shape(model)
    ct2_config = _read_optional_json(src / "config.json")
    tokenizer = _read_tokenizer(src / "tokenizer.json", shape.vocab_size)
    ids = _special_ids(tokenizer, src / "tokenizer.json")
    state = whisper_state_dict(model, shape)
    assumptions: list[str] = []
    generation = generation_config(shape, ids, tokenizer, ct2_config, assumptions)

    import torch
    torch_dtype = getattr(torch, dtype)
    tensors = {name: torch.from_numpy(array).to(torch_dtype) for name, array in state.items()}
    with atomic_dir(out, overwrite=True) as tmp:
        save_safetensors(tensors, tmp, metadata={"converted_from": "ctranslate2"})
        _write_json(tmp / "config.json", model_config(shape, ids, dtype))
        _write_json(tmp / "generation_config.json", generation)
        _write_tokenizer(tmp, tokenizer, ids, shape.vocab_size)
        _write_json(tmp / "preprocessor_config.json", preprocessor_config(shape.num_mel_bins))
        _write_json(tmp / RECORD_NAME, {
            "converted_by": "velotune convert ct2-whisper", "source": str(src.resolve()),
            "source_model_bin": {"bytes": model.path.stat().st_size, "sha256": _sha256(model.path),
                                 "binary_version": model.binary_version, "spec": model.spec,
                                 "spec_revision": model.revision,
                                 "weight_dtypes": sorted({v.dtype for v in model.variables.values() if v.shape})},
            "dtype": dtype, "shape": asdict(shape), "assumptions": assumptions})
    return out


def _refuse_foreign_output(out: Path):
    """Only a missing or empty directory, or an earlier output of this converter, may be (re)written: not a
    user's directory, nor another velotune output such as a fine-tuned model."""
    from ..models.checkpoint import MANIFEST_NAME
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{out}: exists and is a file; the output must be a directory")
    if out.is_dir() and any(out.iterdir()) and not ((out / MANIFEST_NAME).is_file() and (out / RECORD_NAME).is_file()):
        raise ConfigError(f"{out}: already exists, is not empty and was not written by velotune's Whisper "
                          f"converter; refusing to overwrite it (choose a new or empty directory)")


def _check_architecture(model: Ct2Model):
    """Refuses variants whose computation a Hugging Face Whisper would not reproduce."""
    expect = {"decoder/activation": _GELU, "decoder/pre_norm": 1, "decoder/scale_embeddings": 0,
              "decoder/alibi": 0, "decoder/start_from_zero_embedding": 0}
    for name, wanted in expect.items():
        value = model.scalar(name, default=wanted)
        if value != wanted:
            raise UnsupportedError(f"{model.path}: '{name}' is {value}; a Hugging Face Whisper needs {wanted}")
    if "decoder/projection/bias" in model and np.any(model.array("decoder/projection/bias")):
        raise UnsupportedError(f"{model.path}: 'decoder/projection/bias' is nonzero; Whisper's output "
                               f"projection has no bias")
    tied = "decoder/projection/weight" not in model or \
        model.resolve("decoder/projection/weight") == model.resolve("decoder/embeddings/weight")
    if not tied and not np.array_equal(model.array("decoder/projection/weight"),
                                       model.array("decoder/embeddings/weight")):
        raise UnsupportedError(f"{model.path}: the output projection differs from the token embeddings; "
                               f"Whisper ties them")


def _count_layers(model: Ct2Model, stack: str) -> int:
    count = 0
    while f"{stack}/layer_{count}/ffn/linear_0/weight" in model:
        count += 1
    if count == 0:
        raise CheckpointError(f"{model.path}: no '{stack}/layer_0/...' variables; not a complete Whisper model")
    return count


def read_shape(model: Ct2Model) -> WhisperShape:
    """Hyperparameters from the variables' shapes and the spec's scalars (num_heads)."""
    def dims(name: str) -> tuple[int, ...]:
        if name not in model:
            raise CheckpointError(f"{model.path}: missing variable '{name}'; not a complete Whisper model")
        return model.resolve(name).shape

    vocab_size, d_model = dims("decoder/embeddings/weight")
    # Whisper's heads are 64 wide in every size; the stored num_heads wins when present.
    heads = {stack: int(model.scalar(f"{stack}/num_heads", default=d_model // 64)) for stack in ("encoder", "decoder")}
    for stack, count in heads.items():
        if count <= 0 or d_model % count:
            raise CheckpointError(f"{model.path}: '{stack}/num_heads' is {count}, which does not divide "
                                  f"d_model {d_model}")
    return WhisperShape(
        vocab_size=vocab_size, d_model=d_model, num_mel_bins=dims("encoder/conv1/weight")[1],
        encoder_layers=_count_layers(model, "encoder"), decoder_layers=_count_layers(model, "decoder"),
        encoder_attention_heads=heads["encoder"], decoder_attention_heads=heads["decoder"],
        encoder_ffn_dim=dims("encoder/layer_0/ffn/linear_0/weight")[0],
        decoder_ffn_dim=dims("decoder/layer_0/ffn/linear_0/weight")[0],
        max_source_positions=dims("encoder/position_encodings/encodings")[0],
        max_target_positions=dims("decoder/position_encodings/encodings")[0])


def whisper_state_dict(model: Ct2Model, shape: WhisperShape) -> dict[str, np.ndarray]:
    """Hugging Face parameter name -> float32 array; proj_out is left out (tied to embed_tokens)."""
    d, state = shape.d_model, {}

    def take(ct2_name: str, expected: tuple[int, ...]) -> np.ndarray:
        if ct2_name not in model:
            raise CheckpointError(f"{model.path}: missing variable '{ct2_name}'")
        array = model.array(ct2_name)
        if array.shape != expected:
            raise CheckpointError(f"{model.path}: '{ct2_name}' has shape {list(array.shape)}, expected "
                                  f"{list(expected)} for d_model {d}")
        return np.ascontiguousarray(array, dtype=np.float32)

    def linear(hf: str, ct2: str, rows: int, cols: int):
        state[f"{hf}.weight"] = take(f"{ct2}/weight", (rows, cols))
        state[f"{hf}.bias"] = take(f"{ct2}/bias", (rows,))

    def norm(hf: str, ct2: str):
        state[f"{hf}.weight"] = take(f"{ct2}/gamma", (d,))
        state[f"{hf}.bias"] = take(f"{ct2}/beta", (d,))

    def split(hf: str, ct2: str, parts: tuple[str, ...]):
        """A fused [len(parts)*d, d] projection into q/k/v; k keeps no bias (see the module docstring)."""
        weight = take(f"{ct2}/weight", (len(parts) * d, d))
        bias = take(f"{ct2}/bias", (len(parts) * d,))
        for i, part in enumerate(parts):
            state[f"{hf}.{part}_proj.weight"] = np.ascontiguousarray(weight[i * d:(i + 1) * d])
            if part != "k":
                state[f"{hf}.{part}_proj.bias"] = np.ascontiguousarray(bias[i * d:(i + 1) * d])

    def block(hf: str, ct2: str, ffn_dim: int, cross: bool):
        split(f"{hf}.self_attn", f"{ct2}/self_attention/linear_0", ("q", "k", "v"))
        linear(f"{hf}.self_attn.out_proj", f"{ct2}/self_attention/linear_1", d, d)
        norm(f"{hf}.self_attn_layer_norm", f"{ct2}/self_attention/layer_norm")
        if cross:
            linear(f"{hf}.encoder_attn.q_proj", f"{ct2}/attention/linear_0", d, d)
            split(f"{hf}.encoder_attn", f"{ct2}/attention/linear_1", ("k", "v"))
            linear(f"{hf}.encoder_attn.out_proj", f"{ct2}/attention/linear_2", d, d)
            norm(f"{hf}.encoder_attn_layer_norm", f"{ct2}/attention/layer_norm")
        linear(f"{hf}.fc1", f"{ct2}/ffn/linear_0", ffn_dim, d)
        linear(f"{hf}.fc2", f"{ct2}/ffn/linear_1", d, ffn_dim)
        norm(f"{hf}.final_layer_norm", f"{ct2}/ffn/layer_norm")

    state["model.encoder.conv1.weight"] = take("encoder/conv1/weight", (d, shape.num_mel_bins, 3))
    state["model.encoder.conv1.bias"] = take("encoder/conv1/bias", (d,))
    state["model.encoder.conv2.weight"] = take("encoder/conv2/weight", (d, d, 3))
    state["model.encoder.conv2.bias"] = take("encoder/conv2/bias", (d,))
    state["model.encoder.embed_positions.weight"] = take("encoder/position_encodings/encodings",
                                                         (shape.max_source_positions, d))
    for i in range(shape.encoder_layers):
        block(f"model.encoder.layers.{i}", f"encoder/layer_{i}", shape.encoder_ffn_dim, cross=False)
    norm("model.encoder.layer_norm", "encoder/layer_norm")
    state["model.decoder.embed_tokens.weight"] = take("decoder/embeddings/weight", (shape.vocab_size, d))
    state["model.decoder.embed_positions.weight"] = take("decoder/position_encodings/encodings",
                                                         (shape.max_target_positions, d))
    for i in range(shape.decoder_layers):
        block(f"model.decoder.layers.{i}", f"decoder/layer_{i}", shape.decoder_ffn_dim, cross=True)
    norm("model.decoder.layer_norm", "decoder/layer_norm")
    return state


def _read_optional_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    from ..models.checkpoint import read_json
    value = read_json(path)
    if not isinstance(value, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return value


def _read_tokenizer(path: Path, vocab_size: int) -> dict:
    if not path.is_file():
        raise CheckpointError(f"{path}: missing; the Whisper tokenizer (Hugging Face tokenizer.json) must sit "
                              f"beside model.bin")
    from ..models.checkpoint import read_json
    tokenizer = read_json(path)
    if not isinstance(tokenizer, dict) or not isinstance(tokenizer.get("model"), dict) \
            or tokenizer["model"].get("type") != "BPE" or not isinstance(tokenizer.get("added_tokens"), list):
        raise CheckpointError(f"{path}: not a Hugging Face BPE tokenizer.json (needs 'model' of type BPE and "
                              f"'added_tokens')")
    largest = max([*tokenizer["model"].get("vocab", {}).values(),
                   *(t.get("id", -1) for t in tokenizer["added_tokens"])], default=-1)
    if largest >= vocab_size:
        raise CheckpointError(f"{path}: token id {largest} does not fit the model's {vocab_size} embeddings")
    return tokenizer


def _special_ids(tokenizer: dict, path: Path) -> dict[str, int]:
    by_content = {t.get("content"): t.get("id") for t in tokenizer["added_tokens"]}
    missing = [s for s in _SPECIALS if not isinstance(by_content.get(s), int)]
    if missing:
        raise CheckpointError(f"{path}: lacks Whisper's special token(s) {', '.join(missing)}")
    return {s: by_content[s] for s in _SPECIALS}


def model_config(shape: WhisperShape, ids: dict[str, int], dtype: str) -> dict:
    return {"architectures": ["WhisperForConditionalGeneration"], "model_type": "whisper", **asdict(shape),
            "num_hidden_layers": shape.encoder_layers, "activation_function": "gelu", "scale_embedding": False,
            "tie_word_embeddings": True, "is_encoder_decoder": True, "use_cache": True,
            "dropout": 0.0, "attention_dropout": 0.0, "activation_dropout": 0.0,
            "bos_token_id": ids["<|startoftranscript|>"], "decoder_start_token_id": ids["<|startoftranscript|>"],
            "eos_token_id": ids["<|endoftext|>"], "pad_token_id": ids["<|endoftext|>"], "dtype": dtype}


def generation_config(shape: WhisperShape, ids: dict[str, int], tokenizer: dict, ct2_config: dict,
                      assumptions: list[str]) -> dict:
    """What Whisper's generate needs: start/end/no-timestamps tokens, suppressed tokens, and for multilingual
    models the language and task ids. Values CTranslate2's config.json lacks are noted in `assumptions`."""
    eos = ids["<|endoftext|>"]
    # OpenAI's multilingual vocabulary is one token larger than the English-only one (51865 vs 51864).
    multilingual = shape.vocab_size >= 51865
    config = {"bos_token_id": ids["<|startoftranscript|>"], "decoder_start_token_id": ids["<|startoftranscript|>"],
              "eos_token_id": eos, "pad_token_id": eos, "no_timestamps_token_id": ids["<|notimestamps|>"],
              "prev_sot_token_id": ids["<|startofprev|>"], "is_multilingual": multilingual,
              "max_length": shape.max_target_positions, "return_timestamps": False,
              "max_initial_timestamp_index": 50}
    assumptions.append("max_initial_timestamp_index 50 (1 s, as OpenAI's decoder and CTranslate2 default)")
    if isinstance(ct2_config.get("suppress_ids"), list):
        config["suppress_tokens"] = ct2_config["suppress_ids"]
    else:
        config["suppress_tokens"] = []
        assumptions.append("suppress_tokens empty: config.json has no suppress_ids")
    if isinstance(ct2_config.get("suppress_ids_begin"), list):
        config["begin_suppress_tokens"] = ct2_config["suppress_ids_begin"]
    else:
        space = tokenizer["model"].get("vocab", {}).get("\u0120")
        config["begin_suppress_tokens"] = [t for t in (space, eos) if isinstance(t, int)]
        assumptions.append("begin_suppress_tokens [space, <|endoftext|>] (OpenAI's): config.json has none")
    if isinstance(ct2_config.get("alignment_heads"), list):
        config["alignment_heads"] = ct2_config["alignment_heads"]
    if multilingual:
        names = {t["id"]: t["content"] for t in tokenizer["added_tokens"]}
        lang_ids = ct2_config.get("lang_ids")
        if not isinstance(lang_ids, list):
            lang_ids = list(range(ids["<|startoftranscript|>"] + 1, ids["<|translate|>"]))
            assumptions.append("language tokens: those between <|startoftranscript|> and <|translate|>")
        config["lang_to_id"] = {names[i]: i for i in lang_ids if i in names}
        config["task_to_id"] = {"transcribe": ids["<|transcribe|>"], "translate": ids["<|translate|>"]}
    return config


def preprocessor_config(num_mel_bins: int) -> dict:
    """Whisper's log-mel front end: 16 kHz, 25 ms windows every 10 ms, 30 s chunks."""
    return {"feature_extractor_type": "WhisperFeatureExtractor", "processor_class": "WhisperProcessor",
            "feature_size": num_mel_bins, "sampling_rate": 16000, "hop_length": 160, "n_fft": 400,
            "chunk_length": 30, "n_samples": 480000, "nb_max_frames": 3000, "padding_side": "right",
            "padding_value": 0.0, "return_attention_mask": False}


def _write_tokenizer(out: Path, tokenizer: dict, ids: dict[str, int], vocab_size: int):
    """tokenizer.json plus the configs that make it a WhisperTokenizer; the timestamp tokens <|0.00|>...
    that CTranslate2 keeps only in its vocabulary become added (non-special) tokens, so every id decodes."""
    tokenizer = dict(tokenizer)
    added = list(tokenizer["added_tokens"])
    taken = {t["id"] for t in added} | set(tokenizer["model"].get("vocab", {}).values())
    first = ids["<|notimestamps|>"] + 1
    for token_id in range(first, vocab_size):
        if token_id not in taken:
            added.append({"id": token_id, "content": f"<|{(token_id - first) * _SECONDS_PER_TIMESTAMP:.2f}|>",
                          "single_word": False, "lstrip": False, "rstrip": False, "normalized": False,
                          "special": False})
    tokenizer["added_tokens"] = sorted(added, key=lambda t: t["id"])
    _write_json(out / "tokenizer.json", tokenizer, indent=None)
    eos = "<|endoftext|>"
    # Whisper's decoder finds where timestamps begin as the last special id + 1: list every special token.
    specials = [t["content"] for t in tokenizer["added_tokens"] if t.get("special") and t["content"] != eos]
    common = {"bos_token": eos, "eos_token": eos, "unk_token": eos, "pad_token": eos,
              "additional_special_tokens": specials}
    _write_json(out / "tokenizer_config.json", {"tokenizer_class": "WhisperTokenizer", **common,
                                                "model_max_length": 1024, "add_prefix_space": False,
                                                "errors": "replace", "processor_class": "WhisperProcessor"})
    _write_json(out / "special_tokens_map.json", common)


def _write_json(path: Path, value, indent: int | None = 2):
    path.write_text(json.dumps(value, indent=indent, ensure_ascii=False) + "\n", encoding="utf-8")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def main(argv: list[str] | None = None) -> int:
    """`python -m velotune.convert.ctranslate2_whisper SRC OUT [--dtype D]`; errors print one line, exit 1."""
    parser = argparse.ArgumentParser(prog="velotune convert ct2-whisper",
                                     description="Convert a CTranslate2 (faster-whisper) Whisper model into a "
                                                 "Hugging Face directory.")
    parser.add_argument("src", help="directory with model.bin and tokenizer.json")
    parser.add_argument("out", help="output directory (new, empty, or one velotune wrote)")
    parser.add_argument("--dtype", choices=OUTPUT_DTYPES, default="float32")
    args = parser.parse_args(argv)
    try:
        out = convert_ct2_whisper(args.src, args.out, dtype=args.dtype)
    except VelotuneError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
