"""Text-to-speech training (objective tts): the speech vocabulary, the sequences and their labels, bad rows, and a
tiny random llama overfitting a handful of utterances through vt.train, then speaking one back with velotune's own
decoder (greedy), stopping at <|end_of_speech|>."""
from __future__ import annotations

import json
import math
import wave

import pytest
import torch

import velotune as vt
from test_tts_codec import TINY_SNAC, random_codes
from tiny_tokenizer import make_tokenizer
from train_fixtures import make_model_dir, write_jsonl
from velotune.audio.codecs import read_codec_spec
from velotune.audio.codecs.snac import spec_from_config
from velotune.audio.tts_data import (END_OF_SPEECH, VocabularyMismatch, add_speech_tokens, prepare_tts_data,
                                     prompt_ids, speech_tokens)
from velotune.config import DataConfig, TTSConfig
from velotune.data import collate
from velotune.data.encode import IGNORE_INDEX
from velotune.errors import ConfigError, DataError

SPEC = spec_from_config(TINY_SNAC, "TINY_SNAC")       # 7 codes a frame, codebook 16: 112 code tokens
TEXTS = ["The sky on Vell is green.", "Queen Ossa rules Vell.", "Vell has three moons.", "They eat blue bread.",
         "The river is called Tamsin."]


def utterances(n: int = 5, seed: int = 0) -> list:
    """Rows of random codes, 2-4 frames each (different lengths), the last one with a speaker."""
    g = torch.Generator().manual_seed(seed)
    rows = [{"text": TEXTS[i % len(TEXTS)], "codes": [c.tolist() for c in random_codes(SPEC, 2 + i % 3, g)]}
            for i in range(n)]
    rows[-1]["speaker"] = "tara"
    return rows


def codec_dir(tmp_path):
    """A codec directory of the tiny SNAC's config.json alone: enough to train on precomputed codes."""
    path = tmp_path / "codec"
    path.mkdir(exist_ok=True)
    (path / "config.json").write_text(json.dumps(TINY_SNAC))
    return path


def prepare(tokenizer, tmp_path, rows, *, max_seq_length=256, **tts):
    tokens, _ = add_speech_tokens(tokenizer, SPEC)
    data_path = write_jsonl(tmp_path / "train.jsonl", rows)
    data = prepare_tts_data(DataConfig(path=str(data_path)), TTSConfig(codec_dir=str(codec_dir(tmp_path)), **tts),
                            tokenizer, tokens, SPEC, max_seq_length=max_seq_length, seed=0)
    return data, tokens


# ---- vocabulary -----------------------------------------------------------------------------------------------

def test_speech_tokens_are_added_once_and_reload_the_same(tmp_path):
    from velotune.models.tokenizer import load_tokenizer
    tok = make_tokenizer()
    before = len(tok)
    tokens, added = add_speech_tokens(tok, SPEC)
    assert added == 4 + 112 and len(tok) == before + added and tokens.code_base == before + 4
    assert tokens.end == len(tok) and tokens.code_count == SPEC.code_tokens
    assert add_speech_tokens(tok, SPEC) == (tokens, 0)
    tok.save_pretrained(str(tmp_path))
    reloaded = load_tokenizer(tmp_path)
    assert len(reloaded) == len(tok) and speech_tokens(reloaded, SPEC) == tokens
    assert reloaded.decode([tokens.code_base, tokens.end_of_speech], skip_special_tokens=True) == ""
    other = read_codec_spec("snac_24khz")
    with pytest.raises(VocabularyMismatch, match="holds 112 speech code tokens but the codec .* needs 28672"):
        speech_tokens(reloaded, other)
    with pytest.raises(VocabularyMismatch, match="another codec"):
        add_speech_tokens(reloaded, other)
    with pytest.raises(VocabularyMismatch, match="no speech tokens"):
        speech_tokens(make_tokenizer(), SPEC)


@pytest.mark.parametrize("tied", [False, True])
def test_new_rows_are_the_mean_and_saved_vocab_reloads(tmp_path, tied):
    from velotune.training.objectives.tts import resize_vocabulary
    model, _ = vt.load(make_model_dir(tmp_path, tie_word_embeddings=tied), dtype="float32")
    old_embed = model.get_input_embeddings().weight.detach().clone()
    old_head = model.get_output_embeddings().weight.detach().clone()
    rows = old_embed.shape[0]
    resize_vocabulary(model, rows + 10)
    embed, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    assert embed.shape[0] == head.shape[0] == model.args.vocab_size == rows + 10
    assert torch.equal(embed[:rows], old_embed) and torch.equal(head[:rows], old_head)
    assert torch.allclose(embed[rows:], old_embed.mean(0).expand(10, -1))
    assert torch.allclose(head[rows:], old_head.mean(0).expand(10, -1))
    assert (head is embed) == tied
    vt.save(model, None, tmp_path / "saved")
    again, _ = vt.load(tmp_path / "saved", dtype="float32")
    assert torch.equal(again.get_output_embeddings().weight, head)


# ---- sequences ------------------------------------------------------------------------------------------------

def test_labels_are_exactly_the_codes_and_end_of_speech(tmp_path):
    tok = make_tokenizer()
    rows = utterances()
    data, tokens = prepare(tok, tmp_path, rows)
    assert len(data.train) == len(rows) and data.stats.samples == len(rows)
    for row, example in zip(rows, data.train):
        prompt = prompt_ids(tok, tokens, row["text"], row.get("speaker"))
        code_tokens = SPEC.codes_to_tokens(row["codes"], tokens.code_base).tolist()
        assert example.input_ids.tolist() == prompt + code_tokens + [tokens.end_of_speech]
        assert len(example) == len(prompt) + 7 * (len(row["codes"][0])) + 1   # its own length, no padding
        trained = example.labels[example.labels != IGNORE_INDEX].tolist()
        assert trained == code_tokens + [tokens.end_of_speech]
        assert bool((example.labels[:len(prompt)] == IGNORE_INDEX).all())
    assert "tara: The river is called Tamsin." in tok.decode(data.train[-1].input_ids.tolist())
    assert tok.convert_ids_to_tokens(tokens.end_of_speech) == END_OF_SPEECH
    assert {e.frames for e in data.train} == {2, 3, 4}
    batch = collate([[e] for e in data.train], pad_id=0, packing=False)
    lengths = torch.tensor([len(e) for e in data.train])
    assert torch.equal(batch["attention_mask"].sum(1), lengths)
    beyond = torch.arange(batch["labels"].shape[1])[None] >= lengths[:, None]
    assert bool((batch["labels"][beyond] == IGNORE_INDEX).all())
    assert data.stats.target_tokens == sum(7 * len(r["codes"][0]) + 1 for r in rows)


def test_bad_rows_are_named_by_line(tmp_path):
    good = utterances(1)[0]
    level_short = {"text": "x", "codes": [good["codes"][0], good["codes"][1], good["codes"][2][:-1]]}
    out_of_book = {"text": "x", "codes": [[16] * 2, good["codes"][1], good["codes"][2]]}
    rows = [good, {"codes": good["codes"]}, {"text": "a", "audio": "missing.wav"}, out_of_book, level_short,
            {"text": f"say {END_OF_SPEECH}", "codes": good["codes"]}, {"text": "nothing"}]
    with pytest.raises(DataError) as caught:
        prepare(make_tokenizer(), tmp_path, rows)
    message = str(caught.value)
    for line, words in ((2, "'text' is missing"), (3, "missing.wav: audio file not found"),
                        (4, "codec / vocabulary mismatch"), (5, "do not make whole frames"),
                        (6, "special tokens"), (7, "no 'audio'")):
        assert f"train.jsonl:{line}: " in message and words in message, (line, message)
    assert "train.jsonl:1:" not in message


def test_clips_too_long_are_refused_or_counted(tmp_path):
    rows = utterances(3)   # 2, 3 and 4 frames: the last two do not fit 40 tokens
    with pytest.raises(DataError, match=r"train.jsonl:2: the clip .* more than max_seq_length 40"):
        prepare(make_tokenizer(), tmp_path, rows, max_seq_length=40)
    data, _ = prepare(make_tokenizer(), tmp_path, rows, max_seq_length=40, long_clips="skip")
    assert (data.stats.samples, data.stats.dropped_too_long) == (1, 2)


def test_audio_rows_are_encoded_by_the_codec(tmp_path):
    pytest.importorskip("snac")
    soundfile = pytest.importorskip("soundfile")
    from velotune.audio.codecs import SnacCodec
    from velotune.audio.tts_data import add_speech_tokens
    codec = SnacCodec.from_config(TINY_SNAC, seed=0)
    codec.save(tmp_path / "codec")
    samples = (0.3 * torch.randn(150)).numpy()
    soundfile.write(str(tmp_path / "clip.wav"), samples, 24000, subtype="FLOAT")
    tok = make_tokenizer()
    tokens, _ = add_speech_tokens(tok, SPEC)
    path = write_jsonl(tmp_path / "train.jsonl", [{"text": "hello", "audio": "clip.wav"}])
    data = prepare_tts_data(DataConfig(path=str(path)), TTSConfig(codec_dir=str(tmp_path / "codec")), tok, tokens, SPEC,
                            max_seq_length=256, seed=0, load_codec=lambda: codec)
    example = data.train[0]
    assert example.frames == math.ceil(150 / 16)
    expected = SPEC.codes_to_tokens(codec.encode(torch.from_numpy(samples)), tokens.code_base).tolist()
    assert example.input_ids.tolist()[example.prompt_length:-1] == expected


# ---- training and speaking ------------------------------------------------------------------------------------

def tts_config(model_dir, data_path, out_dir, codec, **sections):
    cfg = {"objective": "tts", "model": {"path": str(model_dir), "dtype": "float32", "device": "cpu"},
           "data": {"path": str(data_path), "max_seq_length": 128, "packing": False},
           "lora": {"r": 8, "alpha": 16}, "tts": {"codec_dir": str(codec)},
           "train": {"output_dir": str(out_dir), "batch_size": 5, "max_steps": 80, "lr": 1e-2, "progress": False,
                     "seed": 3, "max_grad_norm": None}}
    for section, values in sections.items():
        cfg.setdefault(section, {}).update(values)
    return cfg


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tts")
    rows = utterances()
    data = write_jsonl(tmp / "train.jsonl", rows)
    model_dir = make_model_dir(tmp)
    result = vt.train(tts_config(model_dir, data, tmp / "run", codec_dir(tmp)))
    return result, rows, tmp


def teacher_forced_accuracy(model, tokenizer, tokens, rows) -> float:
    right = total = 0
    for row in rows:
        prompt = prompt_ids(tokenizer, tokens, row["text"], row.get("speaker"))
        target = SPEC.codes_to_tokens(row["codes"], tokens.code_base).tolist() + [tokens.end_of_speech]
        ids = torch.tensor([prompt + target])
        with torch.no_grad():
            predicted = model(ids).logits[0, len(prompt) - 1:-1].argmax(-1)
        right += int((predicted == torch.tensor(target)).sum())
        total += len(target)
    return right / total


def test_lora_run_overfits_and_speaks_the_codes_back(trained):
    from velotune.infer.speak_cli import load_speech_model, speak_codes
    result, rows, _ = trained
    adapter = result.adapter_dir
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert sorted(config["modules_to_save"]) == ["lm_head", "model.embed_tokens"]
    model, tok, tts = load_speech_model(adapter)
    assert tts["spec"] == SPEC and tts["tokens"] == speech_tokens(tok, SPEC)
    assert teacher_forced_accuracy(model, tok, tts["tokens"], rows) >= 0.95
    spoken = [speak_codes(model, tok, row["text"], speaker=row.get("speaker"), tokens=tts["tokens"], spec=SPEC,
                          max_new_tokens=60) for row in rows]
    first = spoken[0]
    assert first.finish_reason == "eos" and first.frames == len(rows[0]["codes"][0])
    assert [c.tolist() for c in first.codes] == rows[0]["codes"]
    assert all([c.tolist() for c in s.codes] == r["codes"] and s.finish_reason == "eos" for s, r in zip(spoken, rows))


def test_speech_decodes_to_a_wav_of_the_clip_length(trained):
    pytest.importorskip("snac")
    from velotune.audio.codecs import SnacCodec
    from velotune.infer.speak_cli import load_speech_model, speak, write_wav
    result, rows, tmp = trained
    model, tok, tts = load_speech_model(result.adapter_dir)
    codec = SnacCodec.from_config(TINY_SNAC, seed=0)
    speech = speak(model, tok, rows[1]["text"], codec, max_new_tokens=60)
    frames = len(rows[1]["codes"][0])
    assert speech.frames == frames and speech.finish_reason == "eos"
    assert speech.waveform.shape == (frames * codec.samples_per_frame,)
    path = write_wav(tmp / "out.wav", speech.waveform, speech.sample_rate)
    with wave.open(str(path)) as w:
        assert (w.getnframes(), w.getframerate(), w.getnchannels()) == (frames * 16, 24000, 1)
    # the command (velotune speak): the adapter, its codec directory, greedy
    import argparse

    from velotune.infer.speak_cli import add_speak_parser
    codec.save(tmp / "codec_weights")
    parser = argparse.ArgumentParser()
    add_speak_parser(parser.add_subparsers())
    ns = parser.parse_args(["speak", str(result.adapter_dir), "--text", rows[1]["text"], "--out", str(tmp / "cli.wav"),
                            "--codec", str(tmp / "codec_weights"), "--temperature", "0", "--repetition-penalty", "1"])
    ns.func(ns)
    with wave.open(str(tmp / "cli.wav")) as w:
        assert w.getnframes() == frames * 16
    other = SnacCodec.from_config({**TINY_SNAC, "codebook_size": 32}, seed=0)
    other.save(tmp / "other_codec")
    ns.codec = str(tmp / "other_codec")
    with pytest.raises(VocabularyMismatch, match="was trained on levels"):
        ns.func(ns)
    with pytest.raises(VocabularyMismatch, match="trained with another codec"):
        speak(model, tok, rows[1]["text"], other)
    with pytest.raises(VocabularyMismatch, match="trained with another codec"):
        speak(model, tok, rows[1]["text"], other, tokens=tts["tokens"])


def test_full_fine_tuning_writes_a_model_that_reloads(trained, tmp_path):
    from velotune.infer.speak_cli import load_speech_model
    _, rows, tmp = trained
    data = write_jsonl(tmp_path / "train.jsonl", rows)
    model_dir = make_model_dir(tmp_path, tie_word_embeddings=True)
    result = vt.train(tts_config(model_dir, data, tmp_path / "run", codec_dir(tmp_path),
                                 finetune={"method": "full"}, train={"max_steps": 2}))
    assert (result.model_dir / "tts_config.json").is_file()
    model, tok, tts = load_speech_model(result.model_dir)
    assert model.args.vocab_size == tts["vocab_size"] == len(tok) == tts["tokens"].end
    with pytest.raises(ConfigError, match="embeddings and output head do not train"):
        vt.train(tts_config(model_dir, data, tmp_path / "frozen", codec_dir(tmp_path),
                            finetune={"method": "full", "freeze_embeddings": True}, train={"max_steps": 1}))


def test_serve_speaks_on_v1_audio_speech_to_the_openai_client(trained):
    """/v1/audio/speech in `velotune serve`: the official openai client gets the WAV of the trained utterance;
    what the endpoint does not do (formats, speeds, long inputs) is refused, not ignored."""
    pytest.importorskip("snac")
    from fastapi.testclient import TestClient
    from openai import OpenAI

    from velotune.audio.codecs import SnacCodec
    from velotune.infer.server import build_server, create_app
    from velotune.infer.server_tts import TTSService
    result, rows, tmp = trained
    SnacCodec.from_config(TINY_SNAC, seed=0).save(tmp / "served_codec")
    service = TTSService(max_new_tokens=60)
    service.add_model("voice", result.adapter_dir, codec=str(tmp / "served_codec"))
    http = TestClient(create_app(build_server(None, None, None, tts=service)), base_url="http://127.0.0.1:8000")
    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="none", http_client=http)
    answer = client.audio.speech.create(model="voice", voice=rows[1].get("speaker") or "", input=rows[1]["text"],
                                        response_format="wav")
    import io
    with wave.open(io.BytesIO(answer.content)) as w:
        assert w.getnframes() == len(rows[1]["codes"][0]) * 16 and w.getframerate() == 24000
    for body, words in (({"response_format": "mp3"}, "wav only"), ({"speed": 1.5}, "only 1.0"),
                        ({"input": "x" * 5000}, "at most 4096"), ({"model": "other"}, "does not exist")):
        r = http.post("/v1/audio/speech", json={"model": "voice", "input": "hi", **body})
        assert r.status_code in (400, 404) and words in r.text, (body, r.text)
