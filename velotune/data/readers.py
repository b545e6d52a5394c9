"""Reading records (dicts) from jsonl / json / csv / parquet files, lists of dicts, or a `datasets.Dataset`.

Every record keeps where it came from ("train.jsonl:12", "data.json[3]"), so a later error about a missing field
can name the file and the line or index.
"""
from __future__ import annotations

import codecs
import csv
import json
from pathlib import Path

from ..errors import DataError

EXTENSIONS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".csv": "csv", ".tsv": "tsv",
              ".parquet": "parquet"}


class Records(list):
    """A list of record dicts, with `origins[i]` naming where record i came from (file:line or file[index])."""

    def __init__(self, records=(), origins=()):
        super().__init__(records)
        self.origins = list(origins)
        if len(self.origins) != len(self):
            raise ValueError("one origin per record")

    def extend_from(self, other: "Records"):
        self.extend(other)
        self.origins.extend(other.origins)

    def head(self, n: int) -> "Records":
        return Records(self[:n], self.origins[:n])


def read_records(source, *, origin: str | None = None) -> Records:
    """Records from a path (file or folder), a list of paths, a list of dicts, or a `datasets.Dataset`."""
    if isinstance(source, (str, Path)):
        return _read_path(Path(source))
    if _is_hf_dataset(source):
        return _read_hf_dataset(source, origin or "<Dataset>")
    if isinstance(source, (list, tuple)):
        if source and all(isinstance(s, (str, Path)) for s in source):
            out = Records()
            for path in source:
                out.extend_from(_read_path(Path(path)))
            return out
        return _read_dicts(source, origin or "<records>")
    raise DataError(f"data source {type(source).__name__!r}: expected a path, a list of paths, "
                    "a list of dicts or a datasets.Dataset")


def _read_path(path: Path) -> Records:
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in EXTENSIONS)
        if not files:
            raise DataError(f"{path}: no data files in this folder (looked for {', '.join(EXTENSIONS)})")
        out = Records()
        for file in files:
            out.extend_from(_read_path(file))
        return out
    if not path.is_file():
        raise DataError(f"{path}: data file not found")
    kind = EXTENSIONS.get(path.suffix.lower())
    if kind is None:
        raise DataError(f"{path}: unknown data file extension '{path.suffix}'; "
                        f"supported: {', '.join(EXTENSIONS)}")
    records = _READERS[kind](path)
    if not records:
        raise DataError(f"no samples in {path}")
    return records


def _read_jsonl(path: Path) -> Records:
    with path.open("rb") as f:
        return _json_lines(path, _decoded_lines(path, f))


def _json_lines(path: Path, lines) -> Records:
    """Records from (line number, text) pairs holding one JSON object each; blank lines are skipped."""
    records, origins = [], []
    for number, line in lines:
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{number}: malformed JSON line ({exc.msg} at column {exc.colno})") from None
        if not isinstance(record, dict):
            raise DataError(f"{path}:{number}: expected a JSON object per line, got {type(record).__name__}")
        records.append(record)
        origins.append(f"{path}:{number}")
    return Records(records, origins)


def _decoded_lines(path: Path, binary):
    """(line number, text) for each line of a binary file, line ends kept. Bytes that are not UTF-8, and NUL bytes
    (binary data, or UTF-16 text), are errors naming the line; a byte-order mark before the first line is dropped."""
    for number, raw in enumerate(binary, start=1):
        if number == 1 and raw.startswith(codecs.BOM_UTF8):
            raw = raw[len(codecs.BOM_UTF8):]
        if b"\0" in raw:
            raise DataError(f"{path}:{number}: NUL byte at column {raw.index(0) + 1}: binary data, or text not "
                            "saved as UTF-8 (UTF-16?)")
        try:
            yield number, raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise DataError(f"{path}:{number}: not UTF-8 text (byte {raw[exc.start]:#04x} at column "
                            f"{exc.start + 1}); save the file as UTF-8") from None


def _read_json(path: Path) -> Records:
    with path.open("rb") as f:
        text = "".join(line for _, line in _decoded_lines(path, f))
    if not text.strip():
        return Records()
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        if exc.msg == "Extra data" and text.lstrip().startswith("{"):  # JSON Lines under a .json name
            return _json_lines(path, enumerate(text.split("\n"), start=1))
        raise DataError(f"{path}:{exc.lineno}: malformed JSON ({exc.msg} at column {exc.colno})") from None
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of records or {{\"data\": [...]}}, "
                        f"got {type(data).__name__}")
    for i, record in enumerate(data):
        if not isinstance(record, dict):
            raise DataError(f"{path}[{i}]: expected a JSON object, got {type(record).__name__}")
    return Records(data, [f"{path}[{i}]" for i in range(len(data))])


def _read_csv(path: Path, delimiter: str = ",") -> Records:
    records, origins = [], []
    with path.open("rb") as f:
        reader = csv.DictReader((line for _, line in _decoded_lines(path, f)), delimiter=delimiter)
        try:
            if reader.fieldnames is None:
                return Records()
            for row in reader:
                line = reader.line_num  # the row's last line: a quoted cell may span several
                if None in row:
                    raise DataError(f"{path}:{line}: more cells than header columns")
                records.append({k: _maybe_json(v) for k, v in row.items()})
                origins.append(f"{path}:{line}")
        except csv.Error as exc:  # e.g. a cell over csv's field size limit (131072 characters)
            raise DataError(f"{path}:{reader.line_num + 1}: not readable as CSV ({exc})") from None
    return Records(records, origins)


def _maybe_json(value):
    """Cells holding conversations are JSON lists of objects ('[{"role": ...}]'): decode those, keep other text."""
    if isinstance(value, str) and value[:1] == "[" and value.rstrip()[-1:] == "]":
        try:
            decoded = json.loads(value)
        except json.JSONDecodeError:
            return value
        if isinstance(decoded, list) and decoded and all(isinstance(d, dict) for d in decoded):
            return decoded
    return value


def _read_parquet(path: Path) -> Records:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"{path}: reading parquet needs pyarrow: pip install 'velotune[data]'") from None
    try:
        rows = pq.read_table(str(path)).to_pylist()
    except (OSError, ValueError) as exc:  # pyarrow's ArrowInvalid is a ValueError; a torn file, an OSError
        raise DataError(f"{path}: not a readable parquet file ({str(exc).splitlines()[0]})") from None
    return Records(rows, [f"{path} row {i + 1}" for i in range(len(rows))])


_READERS = {"jsonl": _read_jsonl, "json": _read_json, "csv": _read_csv,
            "tsv": lambda p: _read_csv(p, delimiter="\t"), "parquet": _read_parquet}


def _read_dicts(items, origin: str) -> Records:
    if not items:
        raise DataError(f"no samples in {origin}")
    for i, record in enumerate(items):
        if not isinstance(record, dict):
            raise DataError(f"{origin}[{i}]: expected a dict, got {type(record).__name__}")
    return Records(items, [f"{origin}[{i}]" for i in range(len(items))])


def _is_hf_dataset(source) -> bool:
    return type(source).__module__.split(".")[0] == "datasets"


def _read_hf_dataset(dataset, origin: str) -> Records:
    if not hasattr(dataset, "to_list"):
        splits = list(dataset.keys()) if hasattr(dataset, "keys") else []
        hint = f" (pick a split: {', '.join(splits)})" if splits else ""
        raise DataError(f"{origin}: expected a datasets.Dataset, got {type(dataset).__name__}{hint}")
    return _read_dicts(dataset.to_list(), origin)
