"""Fine-tuning Whisper through vt.train (objective asr) on a tiny random Whisper with a Whisper-style tokenizer and a
manifest of synthetic clips: the labels (prompt, kept <|endoftext|>, padding masked by length although pad ==
eos), the loss against transformers' WhisperForConditionalGeneration, LoRA and full runs whose loss falls with
WER / CER measured before and after, exact resume, and outputs that load back (the adapter over its base in
velotune, the full model and its generation_config.json in transformers)."""
import json

import numpy as np
import pytest
import torch

import velotune as vt
from train_fixtures import make_model_dir, stopped_and_resumed
from velotune.errors import ConfigError, DataError
from velotune.training.objectives.speech import transcription_scores
from velotune.training.trainer import train

sf = pytest.importorskip("soundfile")

SPECIALS = ["<|endoftext|>", "<|startoftranscript|>", "<|en|>", "<|de|>", "<|fr|>", "<|translate|>",
            "<|transcribe|>", "<|startoflm|>", "<|startofprev|>", "<|nospeech|>", "<|notimestamps|>"]
# (transcript, tone in Hz): each word pair has its own pitch, so the audio tells the transcripts apart.
CLIPS = [("low hum", 180), ("high whistle", 2400), ("soft noise", 0), ("two beeps", 900), ("a rising tone", 500),
         ("low hum again", 220), ("high whistle again", 2000), ("soft noise again", 0), ("two more beeps", 1100),
         ("a falling tone", 650)]
TINY = dict(num_mel_bins=80, d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
            decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, max_source_positions=1500,
            max_target_positions=40, begin_suppress_tokens=None, suppress_tokens=None, init_std=0.1)


def make_whisper_tokenizer():
    """A byte-level BPE trained on the transcripts, as transformers' WhisperTokenizer, with Whisper's special
    tokens after the text vocabulary in Whisper's order (<|endoftext|> first, the languages after the start token)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import WhisperTokenizer
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=300, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator([t for t, _ in CLIPS] * 4, trainer=trainer)
    model = json.loads(bpe.to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    tokenizer = WhisperTokenizer(vocab=model["vocab"], merges=merges, pad_token="<|endoftext|>")
    tokenizer.add_special_tokens({"additional_special_tokens": SPECIALS[1:]})
    return tokenizer


def write_clip(path, tone: float, seconds: float, seed: int):
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * 16000)) / 16000
    wave = 0.3 * np.sin(2 * np.pi * tone * t) if tone else 0.2 * rng.standard_normal(t.shape)
    sf.write(str(path), wave.astype(np.float32), 16000, subtype="PCM_16")


def write_manifest(path, rows):
    path.write_text("".join(json.dumps({"audio": a, "text": t}) + "\n" for a, t in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(model dir, manifest, tmp dir, tokenizer): a random tiny Whisper saved by transformers with the tokenizer and
    a preprocessor_config.json; ten clips of 0.4-0.85 s."""
    from transformers import WhisperConfig, WhisperFeatureExtractor, WhisperForConditionalGeneration
    tmp = tmp_path_factory.mktemp("asr")
    tokenizer = make_whisper_tokenizer()
    ids = tokenizer.get_vocab()
    torch.manual_seed(0)
    config = WhisperConfig(vocab_size=len(tokenizer), pad_token_id=ids["<|endoftext|>"],
                           bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|endoftext|>"],
                           decoder_start_token_id=ids["<|startoftranscript|>"], **TINY)
    model_dir = tmp / "whisper-tiny-random"
    WhisperForConditionalGeneration(config).save_pretrained(str(model_dir))
    tokenizer.save_pretrained(str(model_dir))
    WhisperFeatureExtractor(feature_size=80).save_pretrained(str(model_dir))
    (tmp / "clips").mkdir()
    rows = []
    for i, (text, tone) in enumerate(CLIPS):
        write_clip(tmp / "clips" / f"{i}.wav", tone, 0.4 + 0.05 * i, seed=i)
        rows.append((f"clips/{i}.wav", text))
    return model_dir, write_manifest(tmp / "train.jsonl", rows), tmp, tokenizer


def asr_config(model_dir, manifest, out, **sections):
    cfg = {"objective": "asr", "model": {"path": str(model_dir), "dtype": "float32", "device": "cpu"},
           "data": {"path": str(manifest), "eval_fraction": 0.2},
           "lora": {"r": 4, "alpha": 8},
           "speech": {"eval_max_new_tokens": 6, "eval_batch_size": 4},
           "train": {"output_dir": str(out), "batch_size": 4, "max_steps": 6, "lr": 1e-2, "progress": False,
                     "seed": 3, "max_grad_norm": None}}
    for section, values in sections.items():
        cfg.setdefault(section, {}).update(values)
    return cfg


def metrics(out_dir) -> list[dict]:
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


def special(tokenizer, *tokens) -> list[int]:
    return [tokenizer.get_vocab()[t] for t in tokens]


# ---- labels ----------------------------------------------------------------------------------------------------

def test_labels_are_the_prompt_the_transcript_and_eos_with_padding_masked_by_length(tiny):
    model_dir, manifest, tmp, tok = tiny
    plan = vt.plan_run(asr_config(model_dir, manifest, tmp / "plan"))
    sot, en, transcribe, notimestamps, eot = special(tok, "<|startoftranscript|>", "<|en|>", "<|transcribe|>",
                                                     "<|notimestamps|>", "<|endoftext|>")
    assert plan.objective.name == "asr" and plan.objective.prompt.ids == [sot, en, transcribe, notimestamps]
    assert tok.pad_token_id == eot  # the case that forbids masking by id
    examples = sorted(plan.data.train, key=len)[:1] + sorted(plan.data.train, key=len)[-1:]
    batch = plan.objective.collate([[e] for e in examples], pad_id=tok.pad_token_id, packing=False)
    width = max(len(e) for e in examples)
    assert batch["labels"].shape == batch["decoder_input_ids"].shape == (2, width)
    assert batch["audio"].shape == (2, 480000) and batch["audio"].dtype == torch.float32
    for row, example in enumerate(examples):
        text = tok(example.clip.text, add_special_tokens=False)["input_ids"]
        sequence = [sot, en, transcribe, notimestamps, *text, eot]
        n = len(sequence) - 1
        assert batch["labels"][row, :n].tolist() == sequence[1:]           # prompt after SOT, text, EOS trained
        assert batch["labels"][row, n:].eq(-100).all()                     # padding, by length
        assert batch["decoder_input_ids"][row, :n].tolist() == sequence[:-1]
        assert batch["decoder_input_ids"][row, n:].eq(eot).all()
    assert batch["labels"][0, len(examples[0]) - 1].item() == eot        # the real EOS, equal to pad, is kept
    assert plan.objective.units(batch) == int((batch["labels"] != -100).sum()) == sum(len(e) for e in examples)
    assert plan.data.stats.samples == 8 and plan.data.stats.eval.samples == 2
    assert "[[<|en|><|transcribe|><|notimestamps|>" in plan.sample_view() and plan.sample_view().endswith("]]")
    assert plan.config.lora.targets == ["q_proj", "v_proj"]             # Whisper's default LoRA targets


def test_english_only_models_take_no_language_or_task_token(tiny, tmp_path):
    model_dir, manifest, tmp, tok = tiny
    english = tmp_path / "english-only"
    english.mkdir()
    for f in model_dir.iterdir():
        (english / f.name).symlink_to(f)
    (english / "generation_config.json").unlink()
    (english / "generation_config.json").write_text(json.dumps({"is_multilingual": False}))
    cfg = asr_config(english, manifest, tmp_path / "out", speech={"language": None})
    plan = vt.plan_run(cfg)
    assert plan.objective.prompt.ids == special(tok, "<|startoftranscript|>", "<|notimestamps|>")
    # its generation_config.json makes transformers' generate() start with the same two tokens, nothing detected
    from transformers import GenerationConfig, WhisperForConditionalGeneration

    from velotune.training.objectives.speech import generation_config
    written = generation_config(plan.objective.prompt, tok, english, 40)
    assert written["is_multilingual"] is False and written["forced_decoder_ids"] == [[1, plan.objective.prompt.ids[1]]]
    hf = WhisperForConditionalGeneration.from_pretrained(str(model_dir)).eval()
    features = plan.objective.features(plan.objective.collate([[plan.data.train[0]]], pad_id=0, packing=False)["audio"])
    out = hf.generate(features, generation_config=GenerationConfig.from_dict(written), max_new_tokens=2,
                      return_dict_in_generate=True)
    assert out.sequences[0, :2].tolist() == plan.objective.prompt.ids
    with pytest.raises(ConfigError, match="English-only.*speech.language: null"):
        vt.plan_run(asr_config(english, manifest, tmp_path / "out"))
    with pytest.raises(ConfigError, match="speech.language: 'xx' is not a language token.*de, en, fr"):
        vt.plan_run(asr_config(model_dir, manifest, tmp_path / "out", speech={"language": "xx"}))
    assert vt.plan_run(asr_config(model_dir, manifest, tmp_path / "out", speech={"language": "German",
                                                                                 "task": "translate"})
                       ).objective.prompt.ids == special(tok, "<|startoftranscript|>", "<|de|>", "<|translate|>",
                                                         "<|notimestamps|>")


def test_bad_settings_and_rows_are_refused_before_weights_load(tiny, tmp_path, monkeypatch):
    model_dir, manifest, tmp, tok = tiny
    monkeypatch.setattr("velotune.models.whisper.load_whisper", lambda *a, **k: pytest.fail("weights loaded"))
    with pytest.raises(ConfigError, match="speech.timestamps"):
        vt.train(asr_config(model_dir, manifest, tmp_path / "a", speech={"timestamps": True}))
    rows = [(f"{tmp}/clips/0.wav", "low hum"), (f"{tmp}/clips/1.wav", "a <|endoftext|> inside"),
            (f"{tmp}/clips/2.wav", " ".join(["high whistle"] * 40))]
    bad = write_manifest(tmp_path / "bad.jsonl", rows)
    with pytest.raises(DataError, match=r"bad.jsonl: 2 bad rows:\n  \S*bad.jsonl:2: the transcript holds "
                                        r"<\|endoftext\|>.*\n  \S*bad.jsonl:3: the transcript takes \d+ decoder "
                                        "positions, more than the 40"):
        vt.plan_run(asr_config(model_dir, bad, tmp_path / "b", data={"eval_fraction": 0.0}))
    from velotune.training.objectives import make_objective
    assert make_objective("speech-recognition").name == "asr"
    llama, _ = vt.load(make_model_dir(tmp_path), dtype="float32", device="cpu")
    with pytest.raises(ConfigError, match=r"objective asr trains a Whisper model; .* got a llama model"):
        vt.train(asr_config(model_dir, manifest, tmp_path / "d"), model=llama, tokenizer=tok)
    rows[1] = (rows[1][0], "two beeps")
    plan = vt.plan_run(asr_config(model_dir, write_manifest(tmp_path / "long.jsonl", rows), tmp_path / "c",
                                  data={"eval_fraction": 0.0}, speech={"long_clips": "skip"}))
    assert plan.data.stats.samples == 2 and plan.data.stats.dropped_too_long == 1


# ---- the loss --------------------------------------------------------------------------------------------------

def test_the_loss_is_transformers_whisper_loss_on_the_same_batch(tiny):
    from types import SimpleNamespace

    from transformers import WhisperFeatureExtractor, WhisperForConditionalGeneration
    model_dir, manifest, tmp, tok = tiny
    plan = vt.plan_run(asr_config(model_dir, manifest, tmp / "loss"))
    objective = plan.objective
    ours = objective.load_model(plan.config)
    objective.start(ours, SimpleNamespace(eval=[], dist=SimpleNamespace(active=False), config=plan.config))
    batch = objective.collate([[e] for e in plan.data.train[:4]], pad_id=tok.pad_token_id, packing=False)
    total, units = objective.loss(ours, batch)
    theirs = WhisperForConditionalGeneration.from_pretrained(str(model_dir)).eval()
    extractor = WhisperFeatureExtractor.from_pretrained(str(model_dir))
    features = extractor([e.clip.load() for e in plan.data.train[:4]], sampling_rate=16000,
                         return_tensors="pt").input_features
    assert (objective.features(batch["audio"]) - features).abs().max() < 1e-4
    with torch.no_grad():
        shifted_by_them = theirs(input_features=features, labels=batch["labels"]).loss
        given = theirs(input_features=features, decoder_input_ids=batch["decoder_input_ids"],
                       labels=batch["labels"]).loss
    assert units == int((batch["labels"] != -100).sum())
    assert abs(total.item() / units - given.item()) <= 1e-5 * given.item()
    assert abs(shifted_by_them.item() - given.item()) <= 1e-6 * given.item()  # the same decoder input


# ---- training runs ---------------------------------------------------------------------------------------------

def test_lora_training_lowers_the_loss_measures_wer_and_its_adapter_loads_back(tiny):
    from velotune.models.whisper import load_whisper
    model_dir, manifest, tmp, tok = tiny
    out = tmp / "lora"
    result = train(asr_config(model_dir, manifest, out))
    assert result.steps == 6 and result.losses[-1] < result.losses[0]
    rows = metrics(out)
    evals = [r for r in rows if "eval_wer" in r]
    assert [r["step"] for r in evals] == [0, 6] and all("eval_cer" in r and "eval_loss" in r for r in evals)
    assert result.eval_before["eval_wer"] == evals[0]["eval_wer"]
    adapter = result.adapter_dir
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert sorted(config["target_modules"]) == ["q_proj", "v_proj"] and config["task_type"] == "SEQ_2_SEQ_LM"
    generation = json.loads((adapter / "generation_config.json").read_text())
    assert generation["language"] == "en" and generation["task"] == "transcribe"
    assert (adapter / "preprocessor_config.json").is_file() and (adapter / "tokenizer_config.json").is_file()
    # The adapter over its base, through velotune, transcribes the eval clips as the run's last evaluation did.
    model = vt.load_adapter(load_whisper(model_dir, dtype="float32", device="cpu"), adapter)
    plan = vt.plan_run(asr_config(model_dir, manifest, tmp / "lora-check"))
    scores = transcription_scores(model, tok, plan.data.eval, plan.objective.prompt, max_new_tokens=6)
    assert scores == {"wer": evals[-1]["eval_wer"], "cer": evals[-1]["eval_cer"]}


def test_a_whisper_model_passed_to_train_is_trained_in_place(tiny):
    """vt.train(model=...): the model given trains (LoRA on lora.targets), and its adapter reloaded over the base
    gives the same logits."""
    from velotune.lora import lora_layers
    from velotune.models.whisper import load_whisper
    model_dir, manifest, tmp, tok = tiny
    model = load_whisper(model_dir, dtype="float32", device="cpu")
    cfg = asr_config(model_dir, manifest, tmp / "passed", lora={"targets": ["q_proj", "v_proj"]},
                     train={"max_steps": 2})
    cfg["model"]["path"] = ""
    result = train(cfg, model=model, tokenizer=tok)
    assert len(lora_layers(model)) == 6  # q, v of the encoder's attention, the decoder's self- and cross-attention
    reloaded = vt.load_adapter(load_whisper(model_dir, dtype="float32", device="cpu"), result.adapter_dir)
    plan = vt.plan_run(asr_config(model_dir, manifest, tmp / "passed-check"))
    batch = plan.objective.collate([[e] for e in plan.data.train[:2]], pad_id=tok.pad_token_id, packing=False)
    features = plan.objective.features(batch["audio"])
    with torch.no_grad():
        want = model.eval()(features, batch["decoder_input_ids"]).logits
        got = reloaded(features, batch["decoder_input_ids"]).logits
        base = load_whisper(model_dir, dtype="float32", device="cpu")(features, batch["decoder_input_ids"]).logits
    assert torch.equal(got, want) and not torch.allclose(want, base)  # trained, and reloaded as trained


def test_full_fine_tuning_writes_a_model_transformers_generates_with(tiny):
    from transformers import GenerationConfig, WhisperForConditionalGeneration

    from velotune.audio import log_mel_spectrogram
    from velotune.models.whisper import load_whisper, transcribe_ids
    model_dir, manifest, tmp, tok = tiny
    out = tmp / "full"
    result = train(asr_config(model_dir, manifest, out, finetune={"method": "full"}, train={"lr": 2e-3}))
    assert result.losses[-1] < result.losses[0] and result.model_dir == out / "model"
    assert {"eval_wer", "eval_cer"} <= set(result.eval_before) and {"eval_wer", "eval_cer"} <= set(result.eval_metrics)
    base, trained = (load_whisper(d, dtype="float32", device="cpu") for d in (model_dir, result.model_dir))
    assert torch.equal(trained.model.encoder.embed_positions.weight, base.model.encoder.embed_positions.weight)
    assert not torch.equal(trained.model.encoder.conv1.weight, base.model.encoder.conv1.weight)
    plan = vt.plan_run(asr_config(model_dir, manifest, tmp / "full-check"))
    prompt = plan.objective.prompt
    scores = transcription_scores(trained, tok, plan.data.eval, prompt, max_new_tokens=6)
    assert scores == {"wer": result.eval_metrics["eval_wer"], "cer": result.eval_metrics["eval_cer"]}

    generation = GenerationConfig.from_pretrained(str(result.model_dir))
    assert (generation.language, generation.task, generation.is_multilingual) == ("en", "transcribe", True)
    assert generation.forced_decoder_ids == [[1, prompt.ids[1]], [2, prompt.ids[2]], [3, prompt.ids[3]]]
    hf = WhisperForConditionalGeneration.from_pretrained(str(result.model_dir)).eval()
    features = log_mel_spectrogram([e.clip.load() for e in plan.data.eval])
    generated = hf.generate(features, max_new_tokens=6, return_dict_in_generate=True).sequences
    ours = transcribe_ids(trained, features, prompt.ids, 6, eos_id=prompt.end)
    assert generated[:, :4].tolist() == [prompt.ids] * len(plan.data.eval)  # generate() uses the trained prompt
    width = min(ours.shape[1], generated.shape[1] - 4)
    assert torch.equal(generated[:, 4:4 + width], ours[:, :width])


def test_wer_falls_as_a_decoder_trained_alone_learns_the_clips(tiny):
    """Full fine-tuning with speech.freeze_encoder, evaluated on its own training clips: the transcripts improve
    (WER 1.0 -> 0.69 measured), the encoder's weights stay as they were, the decoder's change."""
    from velotune.models.whisper import load_whisper
    model_dir, manifest, tmp, tok = tiny
    result = train(asr_config(model_dir, manifest, tmp / "frozen", finetune={"method": "full"},
                              data={"eval_fraction": 0.0, "eval_path": str(manifest)},
                              speech={"freeze_encoder": True, "eval_max_new_tokens": 8, "eval_batch_size": 10},
                              train={"max_steps": 40, "lr": 2e-2, "batch_size": 5, "warmup_steps": 2}))
    assert result.eval_before["eval_wer"] == 1.0 and result.eval_metrics["eval_wer"] <= 0.8
    assert result.eval_metrics["eval_cer"] < result.eval_before["eval_cer"]
    base, trained = (load_whisper(d, dtype="float32", device="cpu") for d in (model_dir, result.model_dir))
    for name, value in base.model.encoder.state_dict().items():
        assert torch.equal(trained.model.encoder.state_dict()[name], value), name
    assert not torch.equal(trained.model.decoder.layers[0].fc1.weight, base.model.decoder.layers[0].fc1.weight)


def test_freeze_encoder_puts_lora_in_the_decoder_only(tiny):
    model_dir, manifest, tmp, tok = tiny
    lora = train(asr_config(model_dir, manifest, tmp / "frozen-lora", speech={"freeze_encoder": True},
                            train={"max_steps": 1}))
    targets = json.loads((lora.adapter_dir / "adapter_config.json").read_text())["target_modules"]
    assert targets and all(t.startswith("model.decoder.") and t.endswith(("q_proj", "v_proj")) for t in targets)
    assert len(targets) == 4  # q and v of the decoder layer's self- and cross-attention


def test_a_stopped_run_resumes_exactly(tiny):
    model_dir, manifest, tmp, tok = tiny

    def cfg(out):
        return asr_config(model_dir, manifest, tmp / out, train={"max_steps": 4, "save_every": 1})
    whole = train(cfg("whole")).losses
    stopped, resumed = stopped_and_resumed(train, cfg("split"), 3)
    assert stopped.losses + resumed.losses == whole
    assert [r["step"] for r in metrics(tmp / "split") if "eval_wer" in r] == [0, 4]


def test_the_example_config_plans_a_run(tiny):
    from pathlib import Path
    model_dir, manifest, tmp, tok = tiny
    example = Path(__file__).resolve().parents[1] / "examples" / "whisper.yaml"
    plan = vt.plan_run(str(example), [f"model.path={model_dir}", f"data.path={manifest}", "data.eval_fraction=0.2",
                                      f"train.output_dir={tmp / 'example'}"])
    assert plan.objective.name == "asr" and plan.config.lora.targets == ["q_proj", "v_proj"]
    assert plan.data.stats.samples == 8 and plan.total_steps == 3  # 3 epochs of one batch of 8 clips
    assert any(line.startswith("per epoch: 8 clips (0.1 min of audio)") for line in plan.summary_lines())


def test_the_8bit_optimizer_trains_whisper_lora(tiny):
    pytest.importorskip("bitsandbytes")
    model_dir, manifest, tmp, _ = tiny
    result = train(asr_config(model_dir, manifest, tmp / "adam8", train={"optimizer": "adamw8bit"},
                              speech={"eval_samples": 1}))
    assert result.steps == 6 and result.losses[-1] < result.losses[0]
