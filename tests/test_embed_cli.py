"""`velotune embed`: a file of texts in, embeddings out, equal to sentence-transformers' encode."""
import json
import logging

import numpy as np
import pytest

from velotune.cli import main
from embed_fixtures import INPUT_CAP, LONG, MAX_INPUTS, TEXTS, TOO_LONG, close, files, loaded, minilm, st, tuned_reference  # noqa: F401 (fixtures)


def test_embed_text_file_equals_sentence_transformers(minilm, st, tmp_path, capsys, caplog):
    source = tmp_path / "notes.txt"
    source.write_text("\n".join(TEXTS[:3] + ["", "   "] + TEXTS[3:] + [LONG]) + "\n", encoding="utf-8")
    caplog.set_level(logging.WARNING, "velotune")
    assert main(["embed", minilm, "--input", str(source), "--batch-size", "3", "--dtype", "float32",
                 "--device", "cpu"]) == 0
    out = tmp_path / "notes.embeddings.jsonl"      # the default: beside the input
    assert capsys.readouterr().out.strip() == f"wrote 7 embeddings of dimension 384 to {out}"
    records = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert [r["index"] for r in records] == [0, 1, 2, 5, 6, 7, 8]          # input lines, the empty ones skipped
    assert [r["text"] for r in records] == TEXTS + [LONG]
    close([r["embedding"] for r in records], st(minilm, TEXTS + [LONG]))
    messages = [r.getMessage() for r in caplog.records]
    assert any("2 empty line(s) skipped" in m for m in messages), messages
    assert any("1 text(s) longer than the model's 256 tokens were truncated (line 9)" in m for m in messages)


def test_embed_jsonl_to_npy_with_a_prompt(minilm, st, tmp_path):
    source = tmp_path / "docs.jsonl"
    source.write_text("".join(json.dumps({"id": i, "body": t}) + "\n" for i, t in enumerate(TEXTS)), encoding="utf-8")
    out = tmp_path / "vectors" / "docs.npy"
    assert main(["embed", minilm, "--input", str(source), "--text-field", "body", "--output", str(out),
                 "--prompt", "query: ", "--no-progress"]) == 0
    array = np.load(out)
    assert array.dtype == np.float32 and array.shape == (len(TEXTS), 384)
    close(array, st(minilm, TEXTS, prompt="query: "))
    assert [p.name for p in out.parent.iterdir()] == ["docs.npy"]   # no temporary file left beside it


def test_embed_with_an_adapter(minilm, files, tuned_reference, tmp_path):
    source = tmp_path / "in.txt"
    source.write_text("\n".join(TEXTS), encoding="utf-8")
    out = tmp_path / "out.jsonl"
    assert main(["embed", minilm, "--input", str(source), "--output", str(out), "--adapter", files["tuned"],
                 "--no-text"]) == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert set(records[0]) == {"index", "embedding"}
    close([r["embedding"] for r in records], tuned_reference)


def test_embed_never_overwrites_without_the_flag(minilm, tmp_path, capsys):
    source, out = tmp_path / "in.txt", tmp_path / "out.npy"
    source.write_text("one text\n", encoding="utf-8")
    out.write_bytes(b"precious")
    assert main(["embed", minilm, "--input", str(source), "--output", str(out)]) == 2
    assert capsys.readouterr().err.strip() == f"velotune: error: {out}: already exists (pass --overwrite to replace it)"
    assert out.read_bytes() == b"precious"
    assert main(["embed", minilm, "--input", str(source), "--output", str(out), "--overwrite"]) == 0
    assert np.load(out).shape == (1, 384)


@pytest.mark.parametrize("name, content, args, message", [
    ("missing.txt", None, [], "{input}: no such file"),
    ("empty.txt", "", [], "{input}: nothing to embed: the file is empty"),
    ("blank.txt", "\n  \n\n", [], "{input}: nothing to embed: the file has only empty lines (3)"),
    ("bad.jsonl", '{"text": "fine"}\n{"text": \n', [], "{input}, line 2: not valid JSON"),
    ("field.jsonl", '{"body": "x"}\n', [], "{input}, line 1: no field 'text' (found: body); name it with --text-field"),
    ("number.jsonl", '{"text": 3}\n', [], "{input}, line 1: field 'text' is int, not text"),
    ("in.txt", "x\n", ["--output", "{dir}/out.csv"],
     "--output {dir}/out.csv: expected a file ending in .jsonl or .npy"),
    ("in.txt", "x\n", ["--prompt-name", "query"], "prompt name 'query' is not one of the model's prompts (none)"),
])
def test_embed_errors_name_the_file(minilm, tmp_path, capsys, name, content, args, message):
    source = tmp_path / name
    if content is not None:
        source.write_text(content, encoding="utf-8")
    args = [a.format(dir=tmp_path) for a in args]
    assert main(["embed", minilm, "--input", str(source), *args]) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("velotune: error: " + message.format(input=source, dir=tmp_path)), error
    assert not list(tmp_path.glob("*.embeddings.jsonl"))

