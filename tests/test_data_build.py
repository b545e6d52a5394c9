"""build_datasets: config -> encoded train / eval examples and their counts, and the errors for data that
leaves nothing to train on."""
import functools
import json

import pytest

from tiny_tokenizer import make_tokenizer
from velotune.config import DataConfig
from velotune.data import build_datasets
from velotune.errors import ConfigError, DataError


@functools.lru_cache(maxsize=None)
def tokenizer():
    return make_tokenizer()


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def alpaca_rows(n):
    return [{"instruction": f"Add {i} and {i}.", "input": "", "output": f"The sum is {2 * i}."} for i in range(n)]


def test_alpaca_file_with_eval_fraction(tmp_path):
    cfg = DataConfig(path=write_jsonl(tmp_path / "a.jsonl", alpaca_rows(20)), chat_template="chatml",
                     eval_fraction=0.25)
    train, held, stats = build_datasets(cfg, tokenizer(), max_seq_length=256, seed=3)
    assert (len(train), len(held)) == (15, 5)
    assert (stats.records, stats.samples, stats.eval.samples) == (15, 15, 5)
    assert stats.target_tokens == sum(e.num_targets for e in train)
    assert stats.total_tokens == sum(len(e) for e in train)
    # The split is seeded: same seed, same split; another seed, another split.
    again, held_again, _ = build_datasets(cfg, tokenizer(), max_seq_length=256, seed=3)
    assert [e.origin for e in held_again] == [e.origin for e in held]
    _, other, _ = build_datasets(cfg, tokenizer(), max_seq_length=256, seed=4)
    assert [e.origin for e in other] != [e.origin for e in held]
    assert not {e.origin for e in held} & {e.origin for e in train}


def test_eval_path_and_max_samples(tmp_path):
    cfg = DataConfig(path=write_jsonl(tmp_path / "t.jsonl", [{"text": f"sample {i}"} for i in range(10)]),
                     eval_path=write_jsonl(tmp_path / "e.jsonl", [{"text": "held out"}]), max_samples=4)
    train, held, stats = build_datasets(cfg, tokenizer(), max_seq_length=64, seed=0)
    assert len(train) == 4 and len(held) == 1 and stats.eval.records == 1
    assert held[0].origin.endswith("e.jsonl:1")


def test_truncate_and_drop_counts(tmp_path):
    rows = [{"text": "short"}, {"text": "a much longer sample that will not fit into a tiny window " * 3}]
    path = write_jsonl(tmp_path / "t.jsonl", rows)
    train, _, stats = build_datasets(DataConfig(path=path, overflow="truncate"), tokenizer(), max_seq_length=16,
                                     seed=0)
    assert (stats.samples, stats.truncated, stats.dropped_too_long) == (2, 1, 0)
    assert max(len(e) for e in train) == 16
    train, _, stats = build_datasets(DataConfig(path=path, overflow="drop"), tokenizer(), max_seq_length=16, seed=0)
    assert (stats.samples, stats.truncated, stats.dropped_too_long) == (1, 0, 1)


def test_system_prompt_from_config(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", alpaca_rows(1))
    train, _, _ = build_datasets(DataConfig(path=path, chat_template="chatml", system_prompt="Be terse."),
                                 tokenizer(), max_seq_length=256, seed=0)
    assert "<|im_start|>system\nBe terse.<|im_end|>" in tokenizer().decode(train[0].input_ids.tolist())


def test_every_sample_fully_masked(tmp_path):
    rows = [{"messages": [{"role": "user", "content": f"question {i}"}]} for i in range(3)]
    cfg = DataConfig(path=write_jsonl(tmp_path / "q.jsonl", rows), chat_template="chatml")
    with pytest.raises(DataError, match=r"every sample in .*q\.jsonl has no trained tokens: check train_on / "
                                        r"the chat template"):
        build_datasets(cfg, tokenizer(), max_seq_length=128, seed=0)


def test_every_sample_too_long(tmp_path):
    cfg = DataConfig(path=write_jsonl(tmp_path / "t.jsonl", [{"text": "far too long for eight tokens"}]),
                     overflow="drop")
    with pytest.raises(DataError, match=r"every sample in .*t\.jsonl is longer than max_seq_length=8"):
        build_datasets(cfg, tokenizer(), max_seq_length=8, seed=0)


def test_chat_data_with_no_template_anywhere(tmp_path):
    cfg = DataConfig(path=write_jsonl(tmp_path / "a.jsonl", alpaca_rows(2)))
    with pytest.raises(ConfigError, match=r"set data\.chat_template"):
        build_datasets(cfg, tokenizer(), max_seq_length=128, seed=0)


def test_empty_data_set(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("", encoding="utf-8")
    with pytest.raises(DataError, match=r"no samples in .*empty\.jsonl"):
        build_datasets(DataConfig(path=str(path)), tokenizer(), max_seq_length=128, seed=0)


def test_missing_field_in_file_names_file_and_line(tmp_path):
    rows = alpaca_rows(2) + [{"instruction": "no answer"}]
    cfg = DataConfig(path=write_jsonl(tmp_path / "a.jsonl", rows), chat_template="chatml")
    with pytest.raises(DataError, match=r"a\.jsonl:3: missing field 'output' \(alpaca format\)"):
        build_datasets(cfg, tokenizer(), max_seq_length=128, seed=0)


def test_no_path():
    with pytest.raises(ConfigError, match=r"data\.path is not set"):
        build_datasets(DataConfig(), tokenizer(), max_seq_length=128, seed=0)


def test_eval_fraction_leaving_nothing(tmp_path):
    cfg = DataConfig(path=write_jsonl(tmp_path / "t.jsonl", [{"text": "one"}]), eval_fraction=0.5)
    with pytest.raises(ConfigError, match=r"leaves none to train on"):
        build_datasets(cfg, tokenizer(), max_seq_length=128, seed=0)
