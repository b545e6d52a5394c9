"""Reading a speech manifest: a JSON Lines or CSV file whose rows name an audio file and its transcript.

    {"audio": "clips/0001.wav", "text": "hello there"}        # train.jsonl
    audio,text                                                  # train.csv
    clips/0001.flac,hello there

Audio paths are relative to the manifest's own folder (absolute paths are taken as they are, unless the caller
confines reading to that folder). Every row is decoded and checked before anything is returned, and all bad rows
are reported together, each named as "train.jsonl:LINE". The clip rules (long, silent, resampled) are in
`examples.py`.
"""
from __future__ import annotations

import functools
from pathlib import Path

from ..data.readers import read_records
from ..errors import DataError
from .decode import load_audio
from .examples import AudioExample, AudioStats, ClipRules, RowErrors, admit, check_text


def read_manifest(path: str | Path, *, audio_column: str = "audio", text_column: str = "text",
                  rules: ClipRules | None = None,
                  confine_to_dir: bool = False) -> tuple[list[AudioExample], AudioStats]:
    """The admitted examples of a manifest (.jsonl, .csv, and the other row files velotune reads) and the counts.

    `confine_to_dir=True` refuses audio paths that are absolute or lead (through '..' or a link) out of the
    manifest's folder, for callers that must not read files a manifest merely names.
    Raises `DataError` naming the manifest, and each bad row's line, for: a missing column, an empty or non-text
    transcript, an audio path that is missing, unreadable, empty or of an unsupported format, and (with
    long_clips="refuse") a clip over the length limit; also when no clip is left.
    """
    rules = rules or ClipRules()
    path = Path(path)
    if path.is_dir():
        raise DataError(f"{path}: expected a manifest file (.jsonl or .csv), got a folder")
    records = read_records(path)
    _require_columns(path, records, audio_column, text_column)
    folder = path.parent
    errors = RowErrors(str(path))
    stats = AudioStats()
    examples: list[AudioExample] = []
    for record, origin in zip(records, records.origins):
        stats.rows += 1
        text = check_text(record.get(text_column), origin, text_column, errors)
        audio_path = _audio_path(record.get(audio_column), origin, audio_column, folder, confine_to_dir, errors)
        if audio_path is None:
            continue
        try:
            audio, info = load_audio(audio_path, sample_rate=rules.sample_rate)
        except DataError as exc:
            errors.add(origin, str(exc))
            continue
        if text is None:
            continue
        loader = None if rules.keep_audio else functools.partial(_load_samples, audio_path, rules.sample_rate)
        example = admit(audio, info, text, origin, rules, stats, errors, path=audio_path, loader=loader)
        if example is not None:
            examples.append(example)
    errors.raise_if_any()
    if not examples:
        raise DataError(f"{path}: no clips left to train on: {stats.summary()}")
    return examples, stats


def _require_columns(path: Path, records, audio_column: str, text_column: str):
    """A column no row has is one error for the file, not one per row (e.g. a CSV header naming 'file')."""
    seen: dict[str, None] = {}
    for record in records:
        seen.update(dict.fromkeys(record))
    for column, what, option in ((audio_column, "audio path", "audio_column"),
                                 (text_column, "transcript", "text_column")):
        if column not in seen:
            raise DataError(f"{path}: no '{column}' column for the {what} (columns: "
                            f"{', '.join(map(repr, seen)) or 'none'}); name yours with {option}=...")


def _audio_path(value, origin: str, column: str, folder: Path, confine: bool, errors: RowErrors) -> Path | None:
    if value is None:
        errors.add(origin, f"missing column '{column}' (the audio file path)")
        return None
    if not isinstance(value, str):
        errors.add(origin, f"column '{column}' must be a file path, got {type(value).__name__}")
        return None
    if not value.strip():
        errors.add(origin, f"column '{column}' is empty: every row needs an audio file")
        return None
    given = Path(value)
    full = given if given.is_absolute() else folder / given
    if confine and (given.is_absolute() or not full.resolve().is_relative_to(folder.resolve())):
        errors.add(origin, f"audio path '{value}' leads outside the manifest's folder {folder}")
        return None
    return full


def _load_samples(path: Path, sample_rate: int):
    return load_audio(path, sample_rate=sample_rate)[0]
