"""Reading speech examples from a Hugging Face `datasets.Dataset` with an audio column and a transcript column.

An audio value may be a dict holding "array" and "sampling_rate" (decoded samples), a dict holding "bytes" or
"path" (how `datasets.Audio` stores files), or a plain path string. A `datasets.Audio` column is read without
`datasets`' own decoder (which needs torchcodec): we take its stored bytes or path and decode them ourselves, so
the same rules and errors apply as for a manifest. Rows are named "NAME row INDEX", INDEX as in `dataset[INDEX]`.
"""
from __future__ import annotations

from pathlib import Path

from ..errors import DataError
from .decode import decode_audio_bytes, load_audio, prepare_samples
from .examples import AudioExample, AudioStats, ClipRules, RowErrors, admit, check_text


def read_audio_dataset(dataset, *, audio_column: str = "audio", text_column: str = "text",
                       rules: ClipRules | None = None, base_dir: str | Path | None = None,
                       name: str = "dataset") -> tuple[list[AudioExample], AudioStats]:
    """The admitted examples of `dataset` and the counts, under the same rules and errors as `read_manifest`.

    Relative audio paths are taken from `base_dir` (default: the current folder). `name` names the data set in
    error messages.
    """
    rules = rules or ClipRules()
    dataset = _plain_audio_column(_checked_dataset(dataset, name, audio_column, text_column), audio_column)
    dataset = dataset.select_columns([audio_column, text_column])
    folder = Path(base_dir) if base_dir is not None else Path.cwd()
    errors = RowErrors(name)
    stats = AudioStats()
    examples: list[AudioExample] = []
    for index, row in enumerate(dataset):
        origin = f"{name} row {index}"
        stats.rows += 1
        text = check_text(row.get(text_column), origin, text_column, errors)
        try:
            audio, info, path = _decode_value(row.get(audio_column), origin, audio_column, folder,
                                              rules.sample_rate)
        except DataError as exc:
            errors.add(origin, str(exc))
            continue
        if text is None:
            continue
        loader = None if rules.keep_audio else _row_loader(dataset, index, origin, audio_column, folder,
                                                           rules.sample_rate)
        example = admit(audio, info, text, origin, rules, stats, errors, path=path, loader=loader)
        if example is not None:
            examples.append(example)
    errors.raise_if_any()
    if not examples:
        raise DataError(f"{name}: no clips left to train on: {stats.summary()}")
    return examples, stats


def _checked_dataset(dataset, name: str, audio_column: str, text_column: str):
    # A DatasetDict (a dict of splits) also has column_names, as a dict: it is refused here, not read.
    if isinstance(dataset, dict) or not hasattr(dataset, "column_names") or not hasattr(dataset, "select_columns"):
        splits = list(dataset.keys()) if hasattr(dataset, "keys") else []
        hint = f" (pick a split: {', '.join(map(str, splits))})" if splits else ""
        raise DataError(f"{name}: expected a datasets.Dataset, got {type(dataset).__name__}{hint}")
    for column, option in ((audio_column, "audio_column"), (text_column, "text_column")):
        if column not in dataset.column_names:
            raise DataError(f"{name}: no '{column}' column (columns: {', '.join(dataset.column_names)}); "
                            f"name yours with {option}=...")
    return dataset


def _plain_audio_column(dataset, audio_column: str):
    """Turn a decoding `datasets.Audio` column into its stored {"bytes", "path"} form."""
    try:
        from datasets import Audio
    except ImportError:  # a Dataset-like object without the datasets package: nothing to undo
        return dataset
    feature = getattr(dataset, "features", {}).get(audio_column)
    if isinstance(feature, Audio) and feature.decode:
        return dataset.cast_column(audio_column, Audio(decode=False))
    return dataset


def _decode_value(value, origin: str, column: str, folder: Path, sample_rate: int):
    """(samples, info, path or None) for one audio cell; `DataError` naming `origin` when it cannot be read."""
    if isinstance(value, str):
        value = {"path": value}
    if not isinstance(value, dict):
        if value is None:
            raise DataError(f"{origin}: missing column '{column}' (the audio)")
        raise DataError(f"{origin}: column '{column}' must be a path or a dict with 'array' and 'sampling_rate', "
                        f"'bytes' or 'path', got {type(value).__name__}")
    if value.get("array") is not None:
        rate = value.get("sampling_rate")
        if rate is None:
            raise DataError(f"{origin}: column '{column}' holds an 'array' without its 'sampling_rate'")
        audio, info = prepare_samples(value["array"], rate, source=origin, sample_rate=sample_rate)
        return audio, info, None
    if value.get("bytes"):
        audio, info = decode_audio_bytes(value["bytes"], source=origin, sample_rate=sample_rate)
        return audio, info, None
    if value.get("path"):
        given = Path(value["path"])
        path = given if given.is_absolute() else folder / given
        audio, info = load_audio(path, sample_rate=sample_rate)
        return audio, info, path
    raise DataError(f"{origin}: column '{column}' has none of 'array', 'bytes' or 'path'")


def _row_loader(dataset, index: int, origin: str, column: str, folder: Path, sample_rate: int):
    def load():
        return _decode_value(dataset[index][column], origin, column, folder, sample_rate)[0]
    return load
