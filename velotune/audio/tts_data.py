"""Text-to-speech training data: rows of text (and a speaker) with their audio, as token sequences for a decoder LM.

    {"text": "Hello there.", "audio": "clips/1.wav", "speaker": "tara"}     # train.jsonl; audio relative to it
    {"text": "Hi.", "codes": [[12, 40], [3, 9, 1, 7], [...8 codes...]]}      # or the codec's codes, per level

A row's sequence is
    [BOS] <|start_of_human|> "speaker: text" <|end_of_human|> <|start_of_speech|> codes... <|end_of_speech|>
with the codes in frame order (codecs/base.py: one token range per frame slot). Only the code tokens and
<|end_of_speech|> are trained. Each sequence is as long as its own clip: nothing is padded here.

The speech tokens are added to the tokenizer once (`add_speech_tokens`): the four markers, then one token per
(slot, code), `<|speech_code_N|>` for N in 0..codes_per_frame * codebook_size - 1, with consecutive ids. A
tokenizer saved after that reloads with the same ids; `speech_tokens` finds them again and refuses a codec whose
code count is not the tokenizer's.

A row holding both codes and audio is taken with its codes. Bad rows (no text, audio that cannot be read, codes
that do not fit the codec) are reported together, each named by its file:line; a clip too long for max_seq_length
is an error too, or left out and counted (long_clips skip).
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from ..data.dataset import PreparedData
from ..data.encode import IGNORE_INDEX, DataStats, Encoded
from ..errors import ConfigError, DataError
from .codecs.base import CodecSpec
from .examples import RowErrors

log = logging.getLogger("velotune")

START_OF_HUMAN, END_OF_HUMAN = "<|start_of_human|>", "<|end_of_human|>"
START_OF_SPEECH, END_OF_SPEECH = "<|start_of_speech|>", "<|end_of_speech|>"
MARKERS = (START_OF_HUMAN, END_OF_HUMAN, START_OF_SPEECH, END_OF_SPEECH)
CODE_TOKEN = "<|speech_code_{}|>"


class VocabularyMismatch(ConfigError):
    """The tokenizer's speech tokens do not fit the codec (another codebook size or frame layout)."""


@dataclass(frozen=True)
class SpeechTokens:
    """Where the speech tokens sit in the vocabulary."""

    code_base: int          # id of <|speech_code_0|>; slot s's code c is code_base + s * codebook_size + c
    code_count: int         # codes_per_frame * codebook_size
    start_of_human: int
    end_of_human: int
    start_of_speech: int
    end_of_speech: int

    @property
    def end(self) -> int:
        """One past the highest speech token id: the vocabulary size the model needs at least."""
        return max(self.code_base + self.code_count, self.end_of_speech + 1, self.start_of_speech + 1,
                   self.start_of_human + 1, self.end_of_human + 1)

    def to_dict(self) -> dict:
        return dict(self.__dict__)

    @classmethod
    def from_dict(cls, data: dict, source: str) -> "SpeechTokens":
        try:
            return cls(**{k: int(data[k]) for k in cls.__dataclass_fields__})
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"{source}: the token layout lacks or garbles {exc}") from None


def _ids(tokenizer, names: list) -> list:
    unknown = tokenizer.unk_token_id
    ids = tokenizer.convert_tokens_to_ids(names)
    return [None if i is None or (unknown is not None and i == unknown) else int(i) for i in ids]


def _code_tokens_present(tokenizer) -> int:
    """How many <|speech_code_N|> tokens the tokenizer has (0: none)."""
    added = tokenizer.get_added_vocab()
    prefix, suffix = CODE_TOKEN.split("{}")
    return sum(1 for name in added if name.startswith(prefix) and name.endswith(suffix))


def speech_tokens(tokenizer, spec: CodecSpec | None = None, where: str = "the tokenizer") -> SpeechTokens:
    """The speech tokens of a tokenizer `add_speech_tokens` extended; VocabularyMismatch when they are missing, not
    consecutive, or (with `spec`) not as many as the codec's codes."""
    present = _code_tokens_present(tokenizer)
    markers = _ids(tokenizer, list(MARKERS))
    if not present or None in markers:
        raise VocabularyMismatch(f"{where} has no speech tokens ({', '.join(MARKERS)}, {CODE_TOKEN.format('N')}): "
                                 "train the model with objective tts first")
    if spec is not None and present != spec.code_tokens:
        raise VocabularyMismatch(
            f"{where} holds {present} speech code tokens but the codec ({spec.name}, {spec.codes_per_frame} codes "
            f"per frame x codebook {spec.codebook_size}) needs {spec.code_tokens}: the model was trained with "
            "another codec")
    ids = _ids(tokenizer, [CODE_TOKEN.format(n) for n in range(present)])
    if None in ids or ids != list(range(ids[0], ids[0] + present)):
        raise VocabularyMismatch(f"{where}: the speech code tokens do not have consecutive ids")
    return SpeechTokens(ids[0], present, *markers)


def add_speech_tokens(tokenizer, spec: CodecSpec) -> tuple[SpeechTokens, int]:
    """Adds the speech tokens to `tokenizer` (in place) unless it has them: (their layout, how many were added).
    A tokenizer holding speech tokens of another codec is refused (VocabularyMismatch)."""
    if _code_tokens_present(tokenizer):
        return speech_tokens(tokenizer, spec), 0
    before = len(tokenizer)
    names = list(MARKERS) + [CODE_TOKEN.format(n) for n in range(spec.code_tokens)]
    # Special: never split, and left out of decoded text (skip_special_tokens).
    added = tokenizer.add_tokens(names, special_tokens=True)
    if added != len(names):
        raise VocabularyMismatch(f"the tokenizer already holds {len(names) - added} of the speech tokens but not "
                                 "all: it was extended for another layout")
    layout = speech_tokens(tokenizer, spec)
    if layout.code_base < before:
        raise VocabularyMismatch("the tokenizer gave the new speech tokens ids it already used")
    return layout, added


# ---- prompts -------------------------------------------------------------------------------------------------

def prompt_text(text: str, speaker: str | None = None) -> str:
    return f"{speaker}: {text}" if speaker else text


def adds_bos(tokenizer) -> bool:
    bos = tokenizer.bos_token_id
    probe = tokenizer("a", add_special_tokens=True)["input_ids"]
    return bos is not None and bool(probe) and probe[0] == bos


def prompt_ids(tokenizer, tokens: SpeechTokens, text: str, speaker: str | None = None,
               where: str = "the text") -> list[int]:
    """[BOS] <|start_of_human|> "speaker: text" <|end_of_human|> <|start_of_speech|>: what precedes the codes.
    DataError when the text holds a special token's spelling (it would read as that token)."""
    ids = tokenizer(prompt_text(text, speaker), add_special_tokens=False)["input_ids"]
    special = set(tokenizer.all_special_ids) | set(tokenizer.get_added_vocab().values())
    held = sorted({tokenizer.convert_ids_to_tokens(i) for i in ids if i in special})
    if held:
        shown = ", ".join(held[:3]) + (" ..." if len(held) > 3 else "")
        raise DataError(f"{where}: holds {shown}, which the tokenizer reads as special tokens: remove them")
    bos = [tokenizer.bos_token_id] if adds_bos(tokenizer) else []
    return bos + [tokens.start_of_human, *ids, tokens.end_of_human, tokens.start_of_speech]


# ---- examples ------------------------------------------------------------------------------------------------

@dataclass
class TTSExample(Encoded):
    """A training sequence (Encoded's input_ids and labels) and what it was made of."""

    text: str = ""
    speaker: str | None = None
    frames: int = 0          # codec frames of its clip
    prompt_length: int = 0   # tokens up to and including <|start_of_speech|>


def make_example(prompt: list, code_tokens: torch.Tensor, tokens: SpeechTokens, *, origin: str = "", text: str = "",
                 speaker: str | None = None, frames: int = 0) -> TTSExample:
    """The sequence prompt + codes + <|end_of_speech|>; labels: the codes and <|end_of_speech|> only."""
    ids = torch.tensor(list(prompt) + code_tokens.tolist() + [tokens.end_of_speech], dtype=torch.int32)
    labels = ids.clone()
    labels[:len(prompt)] = IGNORE_INDEX
    return TTSExample(ids, labels, origin, text=text, speaker=speaker, frames=frames, prompt_length=len(prompt))


@dataclass
class TTSData(PreparedData):
    seconds: float = 0.0           # of the train split's audio
    eval_seconds: float = 0.0


@dataclass
class _Row:
    text: str
    speaker: str | None
    codes: list
    origin: str


def _folder_of(origin: str) -> Path:
    """The folder of the file a record came from ("data/train.jsonl:4", "data/rows.json[3]" -> data/), else the
    working directory (records given as a list)."""
    match = re.fullmatch(r"(.+?)(?::\d+|\[\d+\])", origin)
    file = Path(match.group(1)) if match else None
    return file.parent if file is not None and file.is_file() else Path(".")


class _Encoder:
    """Codes of an audio file, with the codec loaded on first use (rows of precomputed codes need none)."""

    def __init__(self, load_codec, spec: CodecSpec):
        self.load_codec, self.spec, self.codec = load_codec, spec, None

    def codes(self, path: Path) -> list:
        from .decode import load_audio
        samples, _ = load_audio(path, sample_rate=self.spec.sample_rate)
        if self.codec is None:
            if self.load_codec is None:
                raise ConfigError("rows name audio files: encoding them needs the codec's weights (pass load_codec)")
            self.codec = self.load_codec()
        return self.codec.encode(torch.from_numpy(samples))


def _checked_codes(codes, spec: CodecSpec, column: str) -> list:
    try:
        spec.num_frames(codes, f"'{column}'")
        return [torch.as_tensor(level, dtype=torch.long).reshape(-1) for level in codes]
    except DataError:
        raise
    except (TypeError, ValueError, RuntimeError) as exc:
        raise DataError(f"'{column}' must be lists of whole numbers, one per codec level ({exc})") from None


def read_rows(records, settings, spec: CodecSpec, errors: RowErrors, encoder: _Encoder) -> list:
    """The rows' texts, speakers and codes; problems go to `errors` with each row's file:line."""
    rows = []
    for record, origin in zip(records, records.origins):
        text = record.get(settings.text_column)
        if not isinstance(text, str) or not text.strip():
            errors.add(origin, f"'{settings.text_column}' is missing or empty: every row needs its text")
            continue
        speaker = record.get(settings.speaker_column)
        if speaker is not None and (not isinstance(speaker, str) or not speaker.strip()):
            errors.add(origin, f"'{settings.speaker_column}' must be a non-empty string when given")
            continue
        codes, audio = record.get(settings.codes_column), record.get(settings.audio_column)
        try:
            if codes is not None:
                codes = _checked_codes(codes, spec, settings.codes_column)
            elif isinstance(audio, str) and audio.strip():
                path = Path(audio) if Path(audio).is_absolute() else _folder_of(origin) / audio
                codes = encoder.codes(path)
            else:
                errors.add(origin, f"no '{settings.audio_column}' (an audio file) and no '{settings.codes_column}' "
                                   "(the codec's codes per level)")
                continue
        except DataError as exc:
            errors.add(origin, str(exc))
            continue
        rows.append(_Row(text.strip(), speaker.strip() if speaker else None, codes, origin))
    return rows


def encode_rows(rows: list, tokenizer, tokens: SpeechTokens, spec: CodecSpec, *, max_seq_length: int,
                long_clips: str, errors: RowErrors) -> tuple[list, DataStats]:
    stats, examples = DataStats(records=len(rows)), []
    for row in rows:
        try:
            prompt = prompt_ids(tokenizer, tokens, row.text, row.speaker, where="the text")
            code_tokens = spec.codes_to_tokens(row.codes, tokens.code_base)
        except DataError as exc:
            errors.add(row.origin, str(exc))
            continue
        length = len(prompt) + len(code_tokens) + 1
        if length > max_seq_length:
            seconds = len(code_tokens) / spec.codes_per_frame / spec.frame_rate
            if long_clips == "refuse":
                errors.add(row.origin, f"the clip ({seconds:.1f} s) and its text take {length} tokens, more than "
                                       f"max_seq_length {max_seq_length}; shorten it, raise data.max_seq_length, "
                                       "or set tts.long_clips: skip")
            else:
                stats.dropped_too_long += 1
                log.warning("%s: %d tokens, over max_seq_length %d: left out", row.origin, length, max_seq_length)
            continue
        examples.append(make_example(prompt, code_tokens, tokens, origin=row.origin, text=row.text,
                                     speaker=row.speaker, frames=len(code_tokens) // spec.codes_per_frame))
    stats.samples = len(examples)
    stats.total_tokens = sum(len(e) for e in examples)
    stats.target_tokens = sum(e.num_targets for e in examples)
    return examples, stats


def _split(rows: list, fraction: float, seed: int):
    if not fraction:
        return rows, []
    n_eval = max(1, round(len(rows) * fraction))
    if n_eval >= len(rows):
        raise ConfigError(f"data.eval_fraction = {fraction} of {len(rows)} rows leaves none to train on")
    picked = set(torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed))[:n_eval].tolist())
    return [r for i, r in enumerate(rows) if i not in picked], [r for i, r in enumerate(rows) if i in picked]


def _name(path) -> str:
    return ", ".join(str(p) for p in path) if isinstance(path, (list, tuple)) else str(path)


def prepare_tts_data(data_cfg, settings, tokenizer, tokens: SpeechTokens, spec: CodecSpec, *, max_seq_length: int,
                     seed: int, load_codec=None) -> TTSData:
    """The train and eval examples of data.path (and data.eval_path, else a data.eval_fraction of data.path).
    `settings`: the tts config section (column names, long_clips); `load_codec()`: the codec, for rows with audio."""
    from ..data.readers import read_records
    if not data_cfg.path:
        raise ConfigError(f"data.path is not set: give a .jsonl or .csv file whose rows hold "
                          f"'{settings.text_column}' and '{settings.audio_column}' (or '{settings.codes_column}')")
    encoder = _Encoder(load_codec, spec)
    name = _name(data_cfg.path)
    records = read_records(data_cfg.path)
    if data_cfg.max_samples:
        records = records.head(data_cfg.max_samples)
    errors = RowErrors(name)
    rows = read_rows(records, settings, spec, errors, encoder)
    if data_cfg.eval_path:
        eval_errors = RowErrors(_name(data_cfg.eval_path))
        held = read_rows(read_records(data_cfg.eval_path), settings, spec, eval_errors, encoder)
        eval_errors.raise_if_any()
    else:
        rows, held = _split(rows, data_cfg.eval_fraction, seed)
    kwargs = dict(max_seq_length=max_seq_length, long_clips=settings.long_clips)
    train, stats = encode_rows(rows, tokenizer, tokens, spec, errors=errors, **kwargs)
    errors.raise_if_any()
    stats.records = len(records)
    if not train:
        raise DataError(f"{name}: no row left to train on ({stats.dropped_too_long} over max_seq_length "
                        f"{max_seq_length})")
    eval_examples = []
    if held:
        eval_errors = RowErrors(_name(data_cfg.eval_path) if data_cfg.eval_path else "the eval split")
        eval_examples, stats.eval = encode_rows(held, tokenizer, tokens, spec, errors=eval_errors, **kwargs)
        eval_errors.raise_if_any()
        if not data_cfg.eval_path:
            stats.records -= len(held)
    seconds = [sum(e.frames for e in split) / spec.frame_rate for split in (train, eval_examples)]
    return TTSData(train, eval_examples, stats, "tts manifest", True, None, seconds=seconds[0],
                   eval_seconds=seconds[1])


__all__ = ["CODE_TOKEN", "END_OF_HUMAN", "END_OF_SPEECH", "MARKERS", "START_OF_HUMAN", "START_OF_SPEECH",
           "SpeechTokens", "TTSData", "TTSExample", "VocabularyMismatch", "add_speech_tokens", "make_example",
           "prompt_ids", "prompt_text", "prepare_tts_data", "read_rows", "encode_rows", "speech_tokens"]
