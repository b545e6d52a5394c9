"""The Studio's Train page backend: the form generated from the config schema, its checks (the same messages as a
YAML file's), YAML in and out, and the data preview (the run's own reading and encoding, tokenizer only)."""
from __future__ import annotations

import dataclasses
import json
import time
import typing

import pytest
from tiny_tokenizer import make_tokenizer
from train_fixtures import FACTS, chat_records, pair_records, write_jsonl

from velotune.config import Config, load_config, sections, top_level_keys
from velotune.data.encode import encode
from velotune.data.formats import normalise
from velotune.data.templates import CHATML
from velotune.errors import ConfigError, DataError
from velotune.studio.data_preview import preview_data
from velotune.studio.train_forms import (FormCheck, form_schema, form_to_yaml, form_values, nested, validate_form,
                                         yaml_to_form)


# ---- the schema ----------------------------------------------------------------------------------------------------

def test_schema_lists_every_field_with_the_config_default():
    schema = form_schema()
    json.dumps(schema)  # the page receives it as JSON
    fields = {f["key"]: f for f in schema["top_level"]}
    fields.update({f["key"]: f for s in schema["sections"] for f in s["fields"]})
    assert [s["name"] for s in schema["sections"]] == list(sections())
    expected = [f.name for f in top_level_keys()] + [f"{name}.{f.name}" for name, cls in sections().items()
                                                     for f in dataclasses.fields(cls)]
    assert schema["keys"] == expected and list(fields) == expected
    defaults = Config()
    for key, entry in fields.items():
        value = defaults
        for part in key.split("."):
            value = getattr(value, part)
        assert entry["default"] == value, key
        assert entry["help"], key
    assert all(s["help"] for s in schema["sections"])


def test_schema_types_choices_and_bounds():
    fields = {f["key"]: f for s in form_schema()["sections"] for f in s["fields"]}
    assert fields["train.lr"]["type"] == "float" and fields["train.lr"]["bound"]["text"] == ">= 0"
    assert fields["lora.r"]["type"] == "int" and fields["lora.r"]["bound"]["low"] == 1
    assert fields["train.scheduler"]["type"] == "choice"
    assert fields["train.scheduler"]["choices"] == ["linear", "cosine", "constant"]
    assert fields["model.quantize"]["choices"] == ["nf4", "int8"] and fields["model.quantize"]["nullable"]
    assert fields["train.gradient_checkpointing"]["choices"] == [False, True, "offload"]
    assert fields["lora.targets"]["types"] == ["str", "list"]
    assert fields["train.max_steps"]["nullable"] and not fields["train.batch_size"]["nullable"]
    assert fields["train.report_to"]["comma_list"]
    assert fields["train.betas"]["bound"]["count"] == 2
    assert fields["model.path"]["required"] and fields["data.path"]["required"]
    assert "chatml" in fields["data.chat_template"]["suggestions"]
    top = {f["key"]: f for f in form_schema()["top_level"]}
    assert {"sft", "dpo", "pretrain"} <= set(top["objective"]["choices"])
    # Every Literal of the schema is offered as choices (what load_config accepts, no more)
    for name, cls in sections().items():
        for f, hint in typing.get_type_hints(cls).items():
            if typing.get_origin(hint) is typing.Literal:
                assert fields[f"{name}.{f}"]["choices"] == [a for a in typing.get_args(hint) if a is not None]


# ---- validation: the YAML path's messages ---------------------------------------------------------------------------

BAD_VALUES = [  # (key, as written in YAML, as the form sends it)
    ("train.lr", "-0.1", -0.1),                # out of range, typed
    ("train.lr", "-1e-4", "-1e-4"),            # out of range, from a text box
    ("train.scheduler", "cosin", "cosin"),     # not one of the choices
    ("lora.r", "abc", "abc"),                  # wrong type
    ("lora.r", "2.5", 2.5),
    ("train.betas", "[0.9]", "[0.9]"),         # a list of the wrong length
    ("train.lrr", "3", 3),                     # unknown key
    ("data.overflow", "null", None),           # null where it is not allowed
]


@pytest.mark.parametrize("key,yaml_value,form_value", BAD_VALUES)
def test_errors_are_the_yaml_files_errors(tmp_path, key, yaml_value, form_value):
    section, name = key.split(".")
    path = tmp_path / "run.yaml"
    path.write_text(f"model:\n  path: m\n{section}:\n  {name}: {yaml_value}\n", encoding="utf-8")
    with pytest.raises(ConfigError) as from_yaml:
        load_config(path)
    check = validate_form({"model.path": "m", key: form_value})
    assert check.config is None and len(check.errors) == 1
    assert check.errors[0]["field"] == key
    assert str(from_yaml.value) == f"{path}:4: {check.errors[0]['message']}"


def test_every_bad_field_is_reported_at_once():
    check = validate_form({"train.lr": "-1", "lora.r": "0", "train.scheduler": "cosin", "train.batch_size": "8",
                           "objective": "sfx", "lora.alpha": "x"})
    assert [e["field"] for e in check.errors] == ["train.lr", "lora.r", "train.scheduler", "lora.alpha", "objective"]
    assert "did you mean 'sft'" in check.errors[-1]["message"]
    assert check.config is None and not check.ok
    json.dumps(check.as_dict())


def test_whole_config_checks_and_required_fields():
    check = validate_form({"finetune.method": "full", "model.quantize": "nf4"}, complete=True)
    assert {e["field"] for e in check.errors} == {"model.path", "data.path", "finetune.method"}
    both = validate_form({"learning_rate": 0.1, "train.lr": 0.2})
    assert both.errors == [{"field": "learning_rate", "message": "'learning_rate' and 'train.lr' both set train.lr: "
                                                                 "keep one"}]


def test_text_from_inputs_is_read_as_the_yaml_loader_reads_it():
    values = {"train.lr": "1e-4", "train.batch_size": "8", "train.progress": "false", "train.max_steps": "",
              "data.system_prompt": "yes", "model.path": "123", "lora.targets": "q_proj,v_proj",
              "train.report_to": "tensorboard, wandb", "train.gradient_checkpointing": "offload",
              "model.quantize": "", "train.betas": "[0.8, 0.9]", "data.chat_template": ""}
    check = validate_form(values)
    assert check.ok, check.errors
    cfg = check.config
    assert cfg.train.lr == 1e-4 and cfg.train.batch_size == 8 and cfg.train.progress is False
    assert cfg.train.max_steps is None and cfg.model.quantize is None and cfg.data.chat_template is None
    assert cfg.data.system_prompt == "yes" and cfg.model.path == "123"   # text fields keep the text
    assert cfg.lora.targets == "q_proj,v_proj" and cfg.train.report_to == ["tensorboard", "wandb"]
    assert cfg.train.gradient_checkpointing == "offload" and cfg.train.betas == [0.8, 0.9]
    assert isinstance(check, FormCheck)
    assert validate_form({"train.gradient_checkpointing": "true"}).config.train.gradient_checkpointing is True


# ---- YAML in and out ------------------------------------------------------------------------------------------------

def test_yaml_round_trip(tmp_path):
    values = {"train.lr": "3e-4", "objective": "sft", "lora.r": 8, "model.path": "models/tiny",
              "data.path": "data.jsonl", "data.system_prompt": "no", "train.betas": [0.9, 0.95],
              "train.gradient_checkpointing": "true", "data.max_samples": "", "lora.modules_to_save": "lm_head",
              "train.epochs": "2"}
    text = form_to_yaml(values)
    assert text.index("objective") < text.index("model:") < text.index("lora:") < text.index("data:") \
        < text.index("train:")
    path = tmp_path / "run.yaml"
    path.write_text(text, encoding="utf-8")
    from_file = load_config(path)
    assert from_file == load_config(nested(form_values(values))) == validate_form(values).config
    assert from_file.data.system_prompt == "no" and from_file.train.lr == 3e-4
    assert yaml_to_form(text) == form_values(values)


def test_yaml_to_form_reads_aliases_and_reports_bad_yaml(tmp_path):
    form = yaml_to_form("learning_rate: 0.1\nlora:\n  lora_alpha: 8\ntrain:\n")
    assert form == {"train.lr": 0.1, "lora.alpha": 8}
    path = tmp_path / "run.yaml"
    path.write_text("train:\n  lr: 1\n bad: 2\n", encoding="utf-8")
    with pytest.raises(ConfigError) as from_file:
        load_config(path)
    with pytest.raises(ConfigError) as from_text:
        yaml_to_form(path.read_text(), origin=str(path))
    assert str(from_text.value) == str(from_file.value) and f"{path}: line 3: invalid YAML" in str(from_file.value)
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        yaml_to_form("- 1\n")


# ---- the data preview ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A model directory holding only a tokenizer and config.json: the preview must need no weights."""
    path = tmp_path_factory.mktemp("model")
    make_tokenizer(texts=[q + " " + a for q, a in FACTS] * 2, vocab_size=300).save_pretrained(str(path))
    (path / "config.json").write_text(json.dumps({"model_type": "llama", "max_position_embeddings": 256}))
    return path


def _trained_text(sample) -> str:
    return "".join(t["text"] for t in sample["tokens"] if t["trained"])


def _check_against_encode(preview, records, fmt, model_dir):
    from velotune.models.tokenizer import load_tokenizer
    tokenizer = load_tokenizer(model_dir)
    for sample, record in zip(preview["samples"], records):
        expected = encode(normalise(record, fmt), tokenizer, CHATML, max_len=preview["max_seq_length"])
        assert [t["id"] for t in sample["tokens"]] == expected.input_ids.tolist()
        assert [t["trained"] for t in sample["tokens"]] == (expected.labels != -100).tolist()
        assert sample["trained_tokens"] == expected.num_targets and sample["tokens_total"] == len(expected)


def _expected_targets(records, fmt, model_dir, max_len) -> int:
    from velotune.models.tokenizer import load_tokenizer
    tokenizer = load_tokenizer(model_dir)
    return sum(encode(normalise(r, fmt), tokenizer, CHATML, max_len=max_len).num_targets for r in records)


def test_preview_chat_data(tmp_path, model_dir):
    records = chat_records(6)
    data = write_jsonl(tmp_path / "chat.jsonl", records)
    preview = preview_data(model_dir, data, {"data.chat_template": "chatml"}, samples=2)
    json.dumps(preview)
    assert preview["format"] == "messages" and preview["format_detected"]
    assert preview["rows"] == preview["rows_used"] == 6 and preview["max_seq_length"] == 256
    assert preview["template"]["name"] == "chatml" and preview["template"]["source"] == "data.chat_template"
    assert len(preview["samples"]) == 2 and preview["samples"][0]["origin"] == f"{data}:1"
    for sample, record in zip(preview["samples"], records):
        answer = record["messages"][-1]["content"]
        assert _trained_text(sample) == answer + "<|im_end|>"   # the assistant turn and its end, nothing else
        assert sample["text"].startswith("<|bos|><|im_start|>user\n")
        assert f"[[{answer}<|im_end|>]]" in sample["marked"]
    _check_against_encode(preview, records, "messages", model_dir)
    stats = preview["stats"]
    assert stats["samples"] == 6 and stats["dropped"] == {} and not stats["partial"]
    assert stats["target_tokens"] == _expected_targets(records, "messages", model_dir, 256)


def test_preview_alpaca_data_and_counts(tmp_path, model_dir):
    records = [{"instruction": q, "input": "", "output": a} for q, a in FACTS]
    records.append({"instruction": "Tell me everything about Vell. " * 40, "input": "", "output": "No."})
    data = write_jsonl(tmp_path / "alpaca.jsonl", records)
    preview = preview_data(model_dir, data, {"data.chat_template": "chatml", "data.max_seq_length": "64",
                                             "data.overflow": "drop"})
    assert preview["format"] == "alpaca" and preview["rows"] == len(records)
    assert preview["max_seq_length"] == 64
    assert [_trained_text(s) for s in preview["samples"]] == [a + "<|im_end|>" for _, a in FACTS[:3]]
    _check_against_encode(preview, records, "alpaca", model_dir)
    assert preview["stats"]["dropped"] == {"too long": 1} and preview["stats"]["samples"] == len(FACTS)
    assert any("dropped 1" in w for w in preview["warnings"])


def test_preview_counts_only_the_first_rows_of_a_large_file(tmp_path, model_dir):
    data = write_jsonl(tmp_path / "chat.jsonl", chat_records(40))
    preview = preview_data(model_dir, data, {"data.chat_template": "chatml", "data.max_samples": 30},
                           stats_rows=10)
    assert preview["rows"] == 40 and preview["rows_used"] == 30
    assert preview["stats"]["rows_encoded"] == 10 and preview["stats"]["samples"] == 10
    assert preview["stats"]["partial"] and any("first 10 of 30 rows" in w for w in preview["warnings"])


def test_preview_stops_at_a_budget_of_text(tmp_path, model_dir, monkeypatch):
    from velotune.studio import data_preview
    monkeypatch.setattr(data_preview, "STATS_CHARS", 300)
    data = write_jsonl(tmp_path / "chat.jsonl", chat_records(40))
    preview = preview_data(model_dir, data, {"data.chat_template": "chatml"})
    assert 3 <= preview["stats"]["rows_encoded"] < 40 and preview["stats"]["partial"]


def test_preview_of_preference_pairs_shows_both_sides(tmp_path, model_dir):
    records = pair_records(8)
    data = write_jsonl(tmp_path / "pairs.jsonl", records)
    preview = preview_data(model_dir, data, {"objective": "dpo", "data.chat_template": "chatml"}, samples=1)
    sample = preview["samples"][0]
    assert preview["format"] == "preference" and [p["name"] for p in sample["parts"]] == ["chosen", "rejected"]
    chosen, rejected = sample["parts"]
    assert _trained_text(chosen) == records[0]["chosen"][0]["content"] + "<|im_end|>"
    assert _trained_text(rejected) == records[0]["rejected"][0]["content"] + "<|im_end|>"
    assert sample["tokens"] == chosen["tokens"] and sample["marked"].startswith("chosen:")


def test_preview_bad_rows_name_the_file_and_line(tmp_path, model_dir):
    records = [{"instruction": q, "output": a} for q, a in FACTS]
    records[6] = {"instruction": "no answer"}
    data = write_jsonl(tmp_path / "alpaca.jsonl", records)
    for stats_rows in (500, 3):  # in the encoded rows, and after them
        with pytest.raises(DataError, match=rf"{data}:7: missing field 'output' \(alpaca format\)"):
            preview_data(model_dir, data, {"data.chat_template": "chatml"}, stats_rows=stats_rows)
    data.write_text(data.read_text().replace('{"instruction": "no answer"}', '{"instruction": '))
    with pytest.raises(DataError, match=rf"{data}:7: malformed JSON line"):
        preview_data(model_dir, data, {"data.chat_template": "chatml"})
    with pytest.raises(DataError, match="data file not found"):
        preview_data(model_dir, tmp_path / "missing.jsonl")
    with pytest.raises(ConfigError, match=r"'train.lr' = -1.0: must be >= 0"):
        preview_data(model_dir, data, {"train.lr": -1})
    with pytest.raises(ConfigError, match="model.path: required"):
        preview_data(None, data)


def test_preview_of_a_large_file_is_quick(tmp_path, model_dir):
    data = write_jsonl(tmp_path / "big.jsonl", chat_records(10_000))
    preview_data(model_dir, data, {"data.chat_template": "chatml"})  # the tokenizer is loaded and kept
    start = time.perf_counter()
    preview = preview_data(model_dir, data, {"data.chat_template": "chatml"})
    took = time.perf_counter() - start
    print(f"\npreview of a 10,000-row chat file: {took:.2f} s ({preview['stats']['rows_encoded']} rows encoded)")
    assert preview["rows"] == 10_000 and preview["stats"]["partial"]
    assert took < 10  # about 0.3 s on two cores; loose so that a busy machine does not fail it
