"""The data of speech recognition (objective asr): Whisper's decoder prompt, manifests of (audio, transcript) rows
read into examples, and batches of raw audio with their decoder ids and labels.

A training sequence is Whisper's prompt, the transcript's tokens and <|endoftext|>:

    <|startoftranscript|> <|en|> <|transcribe|> <|notimestamps|> text tokens ... <|endoftext|>

An English-only (.en) model takes no language and no task token ([<|startoftranscript|>, <|notimestamps|>]), as its
own generation config forces. The decoder reads the sequence but its last id and is trained to predict it shifted
by one: labels are everything after <|startoftranscript|> (the decoder's start token, which no position predicts),
prompt tokens and the final <|endoftext|> included, as transformers' Whisper fine-tuning trains them. Padding is
<|endoftext|> in Whisper's tokenizers, so it is told apart by each row's length, never by its id: labels past a
row's length are -100. Transcripts are tokenized as written (surrounding whitespace stripped).
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ...data.dataset import PreparedData, _split
from ...data.encode import IGNORE_INDEX, DataStats
from ...errors import ConfigError, DataError

log = logging.getLogger("velotune")

START, END, NO_TIMESTAMPS = "<|startoftranscript|>", "<|endoftext|>", "<|notimestamps|>"
TASK_TOKENS = {"transcribe": "<|transcribe|>", "translate": "<|translate|>"}
ENGLISH_ONLY_VOCAB, MULTILINGUAL_VOCABS = 51864, (51865, 51866)   # the released checkpoints' vocabulary sizes
SKIPPED_SHOWN = 5


# ---- the prompt -------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class WhisperPrompt:
    """The ids of Whisper's decoder prompt and end token, as the tokenizer numbers them."""
    start: int                   # <|startoftranscript|>: the decoder's start token
    no_timestamps: int
    end: int                     # <|endoftext|>: the end of a transcript (and the padding)
    language: int | None = None  # None: an English-only model
    task: int | None = None
    language_code: str | None = None
    task_name: str | None = None

    @property
    def ids(self) -> list[int]:
        """The decoder's first ids, before the transcript."""
        return [self.start] + [i for i in (self.language, self.task) if i is not None] + [self.no_timestamps]


def _vocab_id(vocab: dict, token: str, what: str) -> int:
    if token not in vocab:
        raise ConfigError(f"the tokenizer has no {token} token: {what} (is it a Whisper tokenizer?)")
    return vocab[token]


def language_tokens(vocab: dict) -> dict[str, int]:
    """{"<|en|>": id, ...}: Whisper's language tokens lie between <|startoftranscript|> and <|translate|>."""
    start, translate = vocab.get(START), vocab.get(TASK_TOKENS["translate"])
    if start is None or translate is None:
        return {}
    return {token: i for token, i in vocab.items() if start < i < translate and token.startswith("<|")}


def whisper_prompt(tokenizer, language: str | None, task: str, *, multilingual: bool | None,
                   model_name: str = "the model") -> WhisperPrompt:
    """The prompt for `language` (a code such as "en", a language name, or None for an English-only model) and
    `task`. `multilingual`: what the model directory says it is (None: it does not say); a language for an
    English-only model, or none for a multilingual one, is refused by name."""
    vocab = tokenizer.get_vocab()
    start = _vocab_id(vocab, START, "the decoder's start token")
    no_timestamps = _vocab_id(vocab, NO_TIMESTAMPS, "transcripts are trained without timestamps")
    end = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else _vocab_id(vocab, END, "the end token")
    if language is None:
        if multilingual:
            raise ConfigError(f"speech.language: null is for English-only (.en) models, and {model_name} is "
                              "multilingual: set the transcripts' language (e.g. speech.language: en)")
        if task != "transcribe":
            raise ConfigError(f"speech.task: {task!r} needs a multilingual model and speech.language; an "
                              "English-only model only transcribes")
        return WhisperPrompt(start, no_timestamps, end)
    if multilingual is False:
        raise ConfigError(f"speech.language: {language!r}, but {model_name} is English-only (generation_config.json "
                          "is_multilingual: false): set speech.language: null (it takes no language or task token)")
    code = _language_code(language, vocab)
    task_id = _vocab_id(vocab, TASK_TOKENS[task], f"speech.task {task!r}")
    return WhisperPrompt(start, no_timestamps, end, vocab[f"<|{code}|>"], task_id, code, task)


def _language_code(language: str, vocab: dict) -> str:
    code = language.strip().lower().removeprefix("<|").removesuffix("|>")
    if f"<|{code}|>" in vocab:
        return code
    try:  # a language's name ("german"), as transformers' Whisper accepts it
        from transformers.models.whisper.tokenization_whisper import TO_LANGUAGE_CODE
        named = TO_LANGUAGE_CODE.get(code)
    except ImportError:
        named = None
    if named is not None and f"<|{named}|>" in vocab:
        return named
    known = sorted(t[2:-2] for t in language_tokens(vocab))
    shown = ", ".join(known[:12]) + (f" ... ({len(known)} in all)" if len(known) > 12 else "")
    raise ConfigError(f"speech.language: {language!r} is not a language token of this tokenizer"
                      + (f"; it knows: {shown}" if known else " (it has no language tokens: an English-only model "
                                                               "takes speech.language: null)"))


def model_is_multilingual(model_dir: Path | None) -> bool | None:
    """What the checkpoint says: generation_config.json's is_multilingual, else the released vocabulary sizes
    (51864 English-only; 51865, 51866 multilingual); None when it says neither."""
    if model_dir is None:
        return None
    try:
        generation = json.loads((model_dir / "generation_config.json").read_text(encoding="utf-8"))
        if isinstance(generation.get("is_multilingual"), bool):
            return generation["is_multilingual"]
    except (OSError, ValueError, AttributeError):
        pass
    try:
        vocab_size = json.loads((model_dir / "config.json").read_text(encoding="utf-8")).get("vocab_size")
    except (OSError, ValueError, AttributeError):
        return None
    if vocab_size == ENGLISH_ONLY_VOCAB:
        return False
    return True if vocab_size in MULTILINGUAL_VOCABS else None


# ---- manifests -> examples --------------------------------------------------------------------------------------

@dataclass
class SpeechExample:
    clip: object                 # audio.AudioExample: the transcript, the clip's length and origin, its samples
    tokens: torch.Tensor         # int64: the prompt, the transcript's tokens, <|endoftext|>

    def __len__(self) -> int:    # decoder positions, each with a label
        return int(self.tokens.shape[0]) - 1


@dataclass
class SpeechData(PreparedData):
    seconds: float = 0.0         # of the train split's audio
    eval_seconds: float = 0.0


def _paths(path) -> list:
    return list(path) if isinstance(path, (list, tuple)) else [path]


def read_clips(paths, settings, *, confine_to_dir: bool = False):
    """(the admitted clips of the manifest(s), their AudioStats summed)."""
    from ...audio import AudioStats, ClipRules, read_manifest
    rules = ClipRules(long_clips=settings.long_clips, skip_silent=settings.skip_silent, keep_audio=False)
    clips, total = [], AudioStats()
    for path in _paths(paths):
        found, stats = read_manifest(path, audio_column=settings.audio_column, text_column=settings.text_column,
                                     rules=rules, confine_to_dir=confine_to_dir)
        clips += found
        for name in ("rows", "kept", "skipped_silent", "skipped_long", "resampled", "mixed_down", "kept_seconds"):
            setattr(total, name, getattr(total, name) + getattr(stats, name))
        total.skipped += stats.skipped
    return clips, total


def encode_clips(clips, tokenizer, prompt: WhisperPrompt, *, max_positions: int, long_clips: str,
                 name: str) -> tuple[list[SpeechExample], DataStats]:
    """Each clip's training sequence. A transcript longer than the decoder's `max_positions` is an error naming its
    row (long_clips "refuse") or left out and counted ("skip"); a transcript holding a special token's text is an
    error (it would read as that token: an <|endoftext|> in mid-sentence)."""
    from ...audio.examples import RowErrors
    stats, errors, examples = DataStats(records=len(clips)), RowErrors(name), []
    special = set(tokenizer.get_added_vocab().values()) | set(tokenizer.all_special_ids)
    texts = [clip.text.strip() for clip in clips]
    encoded = tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
    for clip, ids in zip(clips, encoded):
        held = sorted({tokenizer.convert_ids_to_tokens(i) for i in ids if i in special})
        if held:
            errors.add(clip.origin, f"the transcript holds {', '.join(held)}, which the tokenizer reads as "
                                    "special tokens: remove them")
            continue
        tokens = torch.tensor(prompt.ids + list(ids) + [prompt.end], dtype=torch.long)
        if tokens.shape[0] - 1 > max_positions:
            if long_clips == "refuse":
                errors.add(clip.origin, f"the transcript takes {tokens.shape[0] - 1} decoder positions, more than "
                                        f"the {max_positions} the model has; shorten it, or set speech.long_clips: "
                                        "skip to leave such clips out")
            else:
                stats.dropped_too_long += 1
                log.warning("%s: transcript over %d tokens: left out", clip.origin, max_positions)
            continue
        examples.append(SpeechExample(clip, tokens))
    errors.raise_if_any()
    stats.samples = len(examples)
    stats.total_tokens = stats.target_tokens = sum(len(e) for e in examples)
    return examples, stats


def _note_audio(stats: DataStats, audio, name: str):
    """The clips the audio rules left out, counted in the split's stats and named in the log."""
    stats.records = audio.rows
    stats.dropped_too_long += audio.skipped_long
    if audio.skipped_silent:
        stats.dropped_bad = {"silent": audio.skipped_silent}
    log.info("%s: %s", name, audio.summary())
    for line in audio.skipped[:SKIPPED_SHOWN]:
        log.warning("left out: %s", line)
    if len(audio.skipped) > SKIPPED_SHOWN:
        log.warning("left out: ... and %d more", len(audio.skipped) - SKIPPED_SHOWN)


def prepare_speech_data(data_cfg, settings, tokenizer, prompt: WhisperPrompt, *, max_positions: int, seed: int,
                        confine_to_dir: bool = False) -> SpeechData:
    """The train and eval examples of data.path (and data.eval_path, else a data.eval_fraction of data.path)."""
    if not data_cfg.path:
        raise ConfigError("data.path is not set: give a manifest (.jsonl or .csv) whose rows name an audio file "
                          f"({settings.audio_column}) and its transcript ({settings.text_column})")
    name = ", ".join(str(p) for p in _paths(data_cfg.path))
    clips, audio = read_clips(data_cfg.path, settings, confine_to_dir=confine_to_dir)
    if data_cfg.max_samples:
        clips = clips[:data_cfg.max_samples]
    held, eval_audio = [], None
    if data_cfg.eval_path:
        held, eval_audio = read_clips(data_cfg.eval_path, settings, confine_to_dir=confine_to_dir)
    else:
        clips, held = _split(clips, data_cfg.eval_fraction, seed)
    train, stats = encode_clips(clips, tokenizer, prompt, max_positions=max_positions,
                                long_clips=settings.long_clips, name=name)
    long_transcripts = stats.dropped_too_long
    _note_audio(stats, audio, name)
    if not data_cfg.eval_path:
        stats.records -= len(held)
    if not train:
        raise DataError(f"{name}: no clip left to train on ({audio.summary()}; {long_transcripts} transcripts over "
                        f"{max_positions} tokens)")
    eval_examples = []
    if held:
        eval_name = ", ".join(str(p) for p in _paths(data_cfg.eval_path)) if data_cfg.eval_path else "the eval split"
        eval_examples, stats.eval = encode_clips(held, tokenizer, prompt, max_positions=max_positions,
                                                 long_clips=settings.long_clips, name=eval_name)
        if eval_audio is not None:
            _note_audio(stats.eval, eval_audio, eval_name)
    return SpeechData(train, eval_examples, stats, "speech manifest", True, None,
                      seconds=sum(e.clip.duration_s for e in train),
                      eval_seconds=sum(e.clip.duration_s for e in eval_examples))


# ---- examples -> batches ----------------------------------------------------------------------------------------

def clip_audio(examples) -> torch.Tensor:
    """The clips' samples cut or zero-padded to Whisper's 30 s window: float32 [batch, 480000]."""
    from ...audio import pad_or_trim
    return torch.stack([pad_or_trim(torch.from_numpy(np.ascontiguousarray(e.clip.load(), dtype=np.float32)))
                        for e in examples])


def collate_clips(examples: list[SpeechExample], *, pad_id: int) -> dict:
    """audio [B, 480000]; decoder_input_ids [B, T] (the sequences but their last id, `pad_id` after a row's end);
    labels [B, T] (the sequences after their first id, -100 after a row's end); target_tokens: labels trained."""
    width = max(len(e) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    for row, example in enumerate(examples):
        n = len(example)
        ids[row, :n] = example.tokens[:-1]
        labels[row, :n] = example.tokens[1:]
    return {"audio": clip_audio(examples), "decoder_input_ids": ids, "labels": labels,
            "target_tokens": sum(len(e) for e in examples), "rows": len(examples)}


__all__ = ["SpeechData", "SpeechExample", "WhisperPrompt", "clip_audio", "collate_clips", "encode_clips",
           "language_tokens", "model_is_multilingual", "prepare_speech_data", "read_clips", "whisper_prompt"]
