"""read_records: every file kind, in-memory sources, and each kind of bad input."""
import csv
import json

import pytest

from velotune.data import read_records
from velotune.errors import DataError

ROWS = [{"text": "first sample"}, {"text": "second sample"}]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_jsonl_records_and_line_origins(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n\n" + json.dumps(ROWS[1]) + "\n", encoding="utf-8")
    records = read_records(path)
    assert list(records) == ROWS
    assert records.origins == [f"{path}:1", f"{path}:3"]  # the blank line is skipped, numbering is kept


def test_json_list(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps(ROWS), encoding="utf-8")
    records = read_records(path)
    assert list(records) == ROWS
    assert records.origins == [f"{path}[0]", f"{path}[1]"]


def test_json_data_key(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps({"version": 1, "data": ROWS}), encoding="utf-8")
    assert list(read_records(path)) == ROWS


def test_csv_with_multiline_cell_and_json_conversation(tmp_path):
    path = tmp_path / "d.csv"
    conv = json.dumps([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}])
    with path.open("w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerows([["text", "messages"], ["line one\nline two", conv], ["plain", "[not json]"]])
    records = read_records(path)
    assert records[0]["text"] == "line one\nline two"
    assert records[0]["messages"] == json.loads(conv)
    assert records[1] == {"text": "plain", "messages": "[not json]"}
    assert records.origins == [f"{path}:3", f"{path}:4"]


def test_tsv(tmp_path):
    path = tmp_path / "d.tsv"
    path.write_text("prompt\tcompletion\nQ\tA\n", encoding="utf-8")
    assert list(read_records(path)) == [{"prompt": "Q", "completion": "A"}]


def test_parquet(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq
    path = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist(ROWS), str(path))
    records = read_records(path)
    assert list(records) == ROWS
    assert records.origins[1] == f"{path} row 2"


def test_list_of_paths_and_folder(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", ROWS[:1])
    b = write_jsonl(tmp_path / "b.jsonl", ROWS[1:])
    assert list(read_records([a, str(b)])) == ROWS
    assert list(read_records(tmp_path)) == ROWS  # a folder: its data files in name order


def test_list_of_dicts_with_origin():
    records = read_records(ROWS, origin="mine")
    assert list(records) == ROWS
    assert records.origins == ["mine[0]", "mine[1]"]


def test_hf_dataset():
    datasets = pytest.importorskip("datasets")
    records = read_records(datasets.Dataset.from_list(ROWS))
    assert list(records) == ROWS
    assert records.origins[0] == "<Dataset>[0]"


def test_malformed_json_line_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "ok"}\n{"text": "ok"}\n{"text": broken}\n', encoding="utf-8")
    with pytest.raises(DataError, match=rf"{path}:3: malformed JSON line"):
        read_records(path)


def test_jsonl_line_that_is_not_an_object(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "ok"}\n["a list"]\n', encoding="utf-8")
    with pytest.raises(DataError, match=rf"{path}:2: expected a JSON object"):
        read_records(path)


def test_malformed_json_file_names_line(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('[\n  {"text": "ok"},\n  {"text": }\n]\n', encoding="utf-8")
    with pytest.raises(DataError, match=rf"{path}:3: malformed JSON"):
        read_records(path)


def test_json_that_is_not_a_list(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('{"rows": []}', encoding="utf-8")
    with pytest.raises(DataError, match=r"expected a JSON list of records"):
        read_records(path)


def test_unknown_extension(tmp_path):
    path = tmp_path / "data.xlsx"
    path.write_text("x", encoding="utf-8")
    with pytest.raises(DataError, match=r"unknown data file extension '\.xlsx'; supported: \.jsonl"):
        read_records(path)


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match=r"nope\.jsonl: data file not found"):
        read_records(tmp_path / "nope.jsonl")


@pytest.mark.parametrize("name, content", [("e.jsonl", "\n\n"), ("e.json", "[]"), ("e.csv", "text\n"),
                                           ("e.json", "")])
def test_empty_file(tmp_path, name, content):
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    with pytest.raises(DataError, match=rf"no samples in {path}"):
        read_records(path)


def test_empty_list():
    with pytest.raises(DataError, match=r"no samples in <records>"):
        read_records([])


def test_csv_row_with_extra_cells(tmp_path):
    path = tmp_path / "bad.csv"
    path.write_text("text\nok\na,b\n", encoding="utf-8")
    with pytest.raises(DataError, match=rf"{path}:3: more cells than header columns"):
        read_records(path)
