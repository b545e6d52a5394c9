"""Every input is checked before anything is allocated: config ranges, key names and overrides (issue 10 item 6,
issue 11 items 5, 6, 9), config.json against the weights' headers (issue 10 item 10), data, tokenizer and
weight files that are broken (issue 10 item 14). Each error is a VelotuneError naming the file, line or field."""
import argparse
import json
import logging

import pytest
import torch
from safetensors.torch import load_file, save_file

import velotune as vt
from hf_reference import make_checkpoint
from velotune.config import load_config
from velotune.data import read_records
from velotune.errors import CheckpointError, ConfigError, DataError
from velotune.lora import lora_layers


def write(tmp_path, text, name="cfg.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


# ---- config: numeric ranges (issue 10 item 6) ---------------------------------------------------------------
BAD_VALUES = [
    ("train.max_grad_norm", -1, "> 0"), ("train.max_grad_norm", 0, "> 0"), ("train.max_steps", -1, "> 0"),
    ("train.max_steps", 0, "> 0"), ("train.batch_size", 0, ">= 1"), ("train.log_every", 0, ">= 1"),
    ("train.grad_accum", 0, ">= 1"), ("train.lr", -1e-3, ">= 0"), ("train.lr", float("nan"), "finite"),
    ("train.lr", float("inf"), "finite"), ("train.betas", [0.9, 1.0], "two numbers in [0, 1)"),
    ("train.betas", [0.9], "two numbers"), ("train.betas", [0.9, "x"], "two numbers"),
    ("train.weight_decay", -0.1, ">= 0"), ("train.epochs", 0, "> 0"), ("train.save_every", 0, "> 0"),
    ("train.eval_every", -5, "> 0"), ("train.warmup_steps", -1, ">= 0"), ("train.warmup_ratio", 1.0, "[0, 1)"),
    ("train.keep_last", 0, ">= 1"), ("train.seed", -1, "[0, 4294967295]"), ("train.seed", 2 ** 32, "4294967295"),
    ("model.max_seq_length", 0, ">= 1"), ("data.max_seq_length", -2, ">= 1"), ("lora.r", 0, ">= 1"),
    ("lora.alpha", 0, "> 0"), ("lora.dropout", 1.0, "[0, 1)"), ("data.eval_fraction", 1.0, "[0, 1)"),
    ("data.max_samples", 0, ">= 1"), ("finetune.train_last_n_layers", -1, ">= 0"),
]


@pytest.mark.parametrize("key, value, bound", BAD_VALUES)
def test_out_of_range_values_name_key_and_bound(key, value, bound):
    section, name = key.split(".")
    with pytest.raises(ConfigError) as err:
        load_config({section: {name: value}})
    msg = str(err.value)
    assert f"'{key}'" in msg and bound in msg, msg


def test_range_error_names_yaml_file_and_line(tmp_path):
    path = write(tmp_path, "model:\n  path: x\ntrain:\n  lr: 1e-4\n  max_grad_norm: -1\n")
    with pytest.raises(ConfigError, match=rf"^{path}:5: 'train.max_grad_norm' = -1.0: must be > 0 \(or null\)$"):
        load_config(path)


def test_yaml_nan_and_numeric_strings_are_checked_too(tmp_path):
    path = write(tmp_path, "train:\n  lr: .nan\n")
    with pytest.raises(ConfigError, match=rf"{path}:2: 'train.lr' = nan: must be finite"):
        load_config(path)
    with pytest.raises(ConfigError, match=r"'train.lr' = -1.0: must be >= 0"):
        load_config({}, ["train.lr=-1e0"])


def test_boundary_values_are_accepted():
    cfg = load_config({"train": {"max_grad_norm": None, "warmup_ratio": 0.0, "seed": 2 ** 32 - 1, "lr": 0,
                                 "max_steps": None, "save_every": None, "betas": [0, 0.5]},
                       "lora": {"dropout": 0.0, "r": 1}, "data": {"eval_fraction": 0.0},
                       "finetune": {"train_last_n_layers": 0}})
    assert cfg.train.seed == 2 ** 32 - 1 and cfg.train.lr == 0.0 and cfg.lora.r == 1


def test_train_refuses_a_negative_grad_norm_before_loading_anything(tmp_path):
    # Today this trained uphill (clip_grad_norm_ with a negative norm); now nothing is loaded at all.
    cfg = {"model": {"path": str(tmp_path / "no_model")}, "data": {"path": str(tmp_path / "no_data.jsonl")},
           "train": {"output_dir": str(tmp_path / "run"), "max_grad_norm": -1}}
    with pytest.raises(ConfigError, match="train.max_grad_norm"):
        vt.train(cfg)
    assert not (tmp_path / "run").exists()


# ---- config: names, overrides, lists (issue 11 items 5, 6, 9) ----------------------------------------------
def test_transformers_and_peft_names_are_read_as_ours_with_an_info_line(tmp_path, caplog):
    path = write(tmp_path, "learning_rate: 3e-4\ntrain:\n  num_train_epochs: 2\n  gradient_accumulation_steps: 4\n"
                           "lora:\n  lora_alpha: 32\n  target_modules: [q_proj, v_proj]\n  lora_dropout: 0.1\n")
    with caplog.at_level(logging.INFO, logger="velotune"):
        cfg = load_config(path, ["per_device_train_batch_size=8", "lora_r=4", "max_grad_norm=0.5"])
    assert cfg.train.lr == pytest.approx(3e-4) and cfg.train.epochs == 2.0 and cfg.train.grad_accum == 4
    assert cfg.train.batch_size == 8 and cfg.train.max_grad_norm == 0.5
    assert cfg.lora.alpha == 32.0 and cfg.lora.targets == ["q_proj", "v_proj"] and cfg.lora.dropout == 0.1
    assert cfg.lora.r == 4
    lines = [r.getMessage() for r in caplog.records]
    assert f"{path}:1: 'learning_rate' is read as 'train.lr'" in lines
    assert "override 'lora_r=4': 'lora_r' is read as 'lora.r'" in lines
    with pytest.raises(ConfigError, match=r"'learning_rate' and 'train.lr' both set train.lr"):
        load_config({"learning_rate": 1e-3, "train": {"lr": 2e-3}})
    # An override wins over the file, whichever name the file used.
    assert load_config(path, ["train.lr=1e-5"]).train.lr == pytest.approx(1e-5)


def test_key_without_section_suggests_the_dotted_name():
    with pytest.raises(ConfigError, match=r"^override 'lr=1e-3': unknown key 'lr' \(did you mean 'train\.lr'\?\)$"):
        load_config({}, ["lr=1e-3"])
    with pytest.raises(ConfigError, match=r"unknown key 'path' \(did you mean 'model\.path' or 'data\.path'\?\)"):
        load_config({"path": "x"})


def test_bad_key_lists_a_few_close_names_never_the_whole_section():
    with pytest.raises(ConfigError) as err:
        load_config({"train": {"learnig_rate": 1e-3}})
    msg = str(err.value)
    assert "did you mean 'lr'" in msg and msg.count("'") <= 8, msg
    with pytest.raises(ConfigError) as err:
        load_config({"train": {"zzzz": 1}})
    msg = str(err.value)
    assert "unknown key 'train.zzzz'" in msg and "velotune config --keys" in msg and "grad_accum" not in msg
    with pytest.raises(ConfigError, match=r"unknown key 'train\.lora_alpha' \(did you mean 'lora\.alpha'\?\)"):
        load_config({"train": {"lora_alpha": 8}})


def test_override_error_blames_the_override_not_the_yaml_line(tmp_path):
    path = write(tmp_path, "train:\n  lr: 1e-4\n")
    with pytest.raises(ConfigError, match=r"^override 'train\.lr=abc': 'train\.lr' = 'abc': expected float$"):
        load_config(path, ["train.lr=abc"])
    with pytest.raises(ConfigError, match=r"^override 'train\.batch_size=0': 'train\.batch_size' = 0: must be >= 1$"):
        load_config(path, ["train.batch_size=0"])


def test_report_to_accepts_a_plain_or_comma_separated_string(tmp_path):
    assert load_config({}, ["train.report_to=tensorboard"]).train.report_to == ["tensorboard"]
    assert load_config({}, ["train.report_to=tensorboard,wandb"]).train.report_to == ["tensorboard", "wandb"]
    path = write(tmp_path, "train:\n  report_to: wandb\n")
    assert load_config(path).train.report_to == ["wandb"]
    assert load_config({"train": {"report_to": ["wandb"]}}).train.report_to == ["wandb"]


def test_caller_dict_is_not_changed_by_overrides():
    source = {"train": {"lr": 1e-3}}
    load_config(source, ["train.lr=2e-3", "learning_rate=5e-4"])
    assert source == {"train": {"lr": 1e-3}}


def test_schema_help_lists_every_key_with_type_default_and_help():
    from velotune.config import Config
    from velotune.config_help import schema_help
    text = schema_help()
    for section in ("model", "finetune", "lora", "data", "train"):
        for name in Config.__dataclass_fields__[section].default_factory().__dataclass_fields__:
            assert f"{section}.{name}" in text, name
    line = next(ln for ln in text.splitlines() if "train.max_grad_norm" in ln)
    assert "float" in line and "1.0" in line and "> 0" in line
    assert "gradient clipping" in text and "learning_rate -> train.lr" in text


def _run_config_cli(argv, capsys):
    from velotune.config_cli import add_config_parser
    parser = argparse.ArgumentParser(prog="velotune")
    add_config_parser(parser.add_subparsers(dest="command"))
    ns = parser.parse_args(argv)
    code = ns.func(ns)
    return code, capsys.readouterr().out


def test_config_command_prints_resolved_yaml_and_keys(tmp_path, capsys):
    import yaml
    path = write(tmp_path, "model:\n  path: some/model\nlora:\n  r: 8\n")
    code, out = _run_config_cli(["config", str(path), "train.lr=1e-3", "learning_rate=5e-4"], capsys)
    resolved = yaml.safe_load(out)
    assert code in (None, 0) and resolved == load_config(path, ["learning_rate=5e-4"]).to_dict()
    assert resolved["lora"]["r"] == 8 and resolved["train"]["lr"] == 5e-4 and resolved["train"]["batch_size"] == 4
    _, keys = _run_config_cli(["config", "--keys"], capsys)
    from velotune.config_help import schema_help
    assert keys.strip() == schema_help().strip()
    with pytest.raises(ConfigError, match="override 'train.lr=x'"):
        _run_config_cli(["config", str(path), "train.lr=x"], capsys)


# ---- data files (issue 10 item 14, issue 11 item 9) ---------------------------------------------------------
def test_non_utf8_bytes_name_file_and_line(tmp_path):
    good = b'{"text": "ok"}\n'
    for name, content, line in [("d.jsonl", good + b'{"text": "caf\xe9"}\n', 2),
                                ("d.json", b'[\n {"text": "ok"},\n {"text": "\xff\xfe"}\n]\n', 3),
                                ("d.csv", b"text\nok\nbad \x92 quote\n", 3)]:
        path = tmp_path / name
        path.write_bytes(content)
        with pytest.raises(DataError, match=rf"^{path}:{line}: not UTF-8 text \(byte 0x[0-9a-f]{{2}} at column \d+\)"):
            read_records(path)


def test_binary_garbage_is_a_data_error(tmp_path):
    garbage = bytes(range(256)) * 4
    for name in ("g.jsonl", "g.json", "g.csv", "g.parquet"):
        path = tmp_path / name
        path.write_bytes(garbage)
        with pytest.raises(DataError, match=rf"^{path}"):
            read_records(path)
    nul = tmp_path / "nul.csv"
    nul.write_bytes(b"text\nfine\nwith \x00 nul\n")
    with pytest.raises(DataError, match=rf"^{nul}:3: "):
        read_records(nul)


def test_json_file_holding_json_lines_is_read_as_such(tmp_path):
    path = tmp_path / "d.json"
    path.write_text('{"text": "a"}\n\n{"text": "b"}\n', encoding="utf-8")
    records = read_records(path)
    assert list(records) == [{"text": "a"}, {"text": "b"}]
    assert records.origins == [f"{path}:1", f"{path}:3"]
    path.write_text('{"text": "a"}\n{"text": oops}\n', encoding="utf-8")
    with pytest.raises(DataError, match=rf"{path}:2: malformed JSON line"):
        read_records(path)


def test_utf8_byte_order_mark_is_accepted(tmp_path):
    for name, text in [("b.jsonl", '{"text": "a"}\n'), ("b.json", '[{"text": "a"}]'), ("b.csv", "text\na\n")]:
        path = tmp_path / name
        path.write_bytes(b"\xef\xbb\xbf" + text.encode())
        assert list(read_records(path)) == [{"text": "a"}]


# ---- model files: config.json against the weights (issue 10 items 10, 14) ---------------------------------
def _edit_config(path, **changes):
    config = json.loads((path / "config.json").read_text())
    config.update(changes)
    (path / "config.json").write_text(json.dumps(config, indent=2))


@pytest.fixture
def modules_built(monkeypatch):
    """Counts nn.Module constructions: a config checked before allocating builds none."""
    built = []
    init = torch.nn.Module.__init__

    def counting(self, *args, **kwargs):
        built.append(type(self).__name__)
        init(self, *args, **kwargs)
    monkeypatch.setattr(torch.nn.Module, "__init__", counting)
    return built


@pytest.mark.parametrize("field, value, match", [
    ("num_hidden_layers", 1_000_000, r"num_hidden_layers is 1000000 but .*model\.safetensors holds 2 layers"),
    ("num_hidden_layers", 0, r"config\.json: field 'num_hidden_layers' must be a positive integer, got 0"),
    ("vocab_size", 1_000_000_000, r"tensor 'model\.embed_tokens\.weight' has shape \[211, 64\] but config\.json "
                                  r"implies \[1000000000, 64\] \(vocab_size"),
    ("hidden_size", 4_000_000, r"model\.embed_tokens\.weight' has shape \[211, 64\] .*hidden_size"),
    ("intermediate_size", 10_000_000, r"down_proj\.weight' has shape \[64, 112\] .*intermediate_size"),
    ("head_dim", 1 << 30, r"q_proj\.weight' has shape \[96, 64\] .*head_dim"),
    ("max_position_embeddings", -1, r"config\.json: field 'max_position_embeddings' must be a positive integer"),
    ("sliding_window", 0, r"config\.json: field 'sliding_window' must be a positive integer or null"),
])
def test_tampered_native_config_fails_before_anything_is_built(tmp_path, modules_built, field, value, match):
    path, _ = make_checkpoint(tmp_path, "llama")
    _edit_config(path, **{field: value})
    modules_built.clear()
    with pytest.raises(CheckpointError, match=match):
        vt.load(path, dtype="float32", device="cpu", load_tokenizer_files=False)
    assert modules_built == []


def test_layer_count_is_checked_before_per_layer_settings_are_listed(tmp_path, modules_built):
    # Qwen 2 without `layer_types` lists one attention kind per layer while its config is read: 10**9 of them
    # would take gigabytes before any module exists.
    path, _ = make_checkpoint(tmp_path, "qwen2_legacywindow")
    _edit_config(path, num_hidden_layers=10 ** 9)
    modules_built.clear()
    with pytest.raises(CheckpointError, match=r"num_hidden_layers is 1000000000 but .* holds 2 layers"):
        vt.load(path, dtype="float32", device="cpu", load_tokenizer_files=False)
    assert modules_built == []


def _neox(tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM
    config = AutoConfig.for_model("gpt_neox", vocab_size=128, hidden_size=64, intermediate_size=128,
                                  num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=64)
    AutoModelForCausalLM.from_config(config).save_pretrained(str(tmp_path / "neox"))
    return tmp_path / "neox"


@pytest.mark.parametrize("field, value, match", [
    ("num_hidden_layers", 1_000_000, r"config\.json: num_hidden_layers is 1000000 but .*holds 2 layers"),
    ("vocab_size", 1_000_000_000, r"config\.json: vocab_size 1000000000 is no dimension of any tensor"),
    ("max_position_embeddings", -1, r"config\.json: field 'max_position_embeddings' must be a positive integer"),
])
def test_tampered_generic_config_fails_before_anything_is_built(tmp_path, modules_built, field, value, match):
    path = _neox(tmp_path)
    _edit_config(path, **{field: value})
    modules_built.clear()
    with pytest.raises(CheckpointError, match=match):
        vt.load(path, dtype="float32", device="cpu", load_tokenizer_files=False)
    assert modules_built == []


def _adapter(tmp_path):
    path, _ = make_checkpoint(tmp_path, "llama")
    model = vt.load(path, dtype="float32", device="cpu", load_tokenizer_files=False)[0]
    adapter = vt.save_adapter(vt.add_lora(model, r=4, alpha=8, targets=["q_proj", "v_proj"]), tmp_path / "adapter")
    fresh = vt.load(path, dtype="float32", device="cpu", load_tokenizer_files=False)[0]
    return adapter, fresh


def _edit_adapter(adapter, **changes):
    config = json.loads((adapter / "adapter_config.json").read_text())
    config.update(changes)
    (adapter / "adapter_config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("changes, match", [
    (dict(r=100_000_000), r"adapter_config\.json: r is 100000000 but .*adapter_model\.safetensors holds rank-4"),
    (dict(target_modules=["q_proj", "v_proj", "k_proj"]),
     r"adapter_config\.json: target_modules select layers .*adapter_model\.safetensors has no weights for: "
     r"model\.layers\.0\.self_attn\.k_proj"),
    (dict(target_modules=["q_proj"]),
     r"adapter_model\.safetensors holds LoRA weights for layers target_modules does not select: "
     r"model\.layers\.0\.self_attn\.v_proj"),
])
def test_adapter_config_is_checked_against_its_weights_before_allocating(tmp_path, modules_built, changes, match):
    adapter, model = _adapter(tmp_path)
    _edit_adapter(adapter, **changes)
    modules_built.clear()
    with pytest.raises(CheckpointError, match=match):
        vt.load_adapter(model, adapter)
    assert modules_built == [] and not lora_layers(model)


def test_non_finite_weights_warn_once_per_tensor_with_name_and_file(tmp_path, caplog):
    path, _ = make_checkpoint(tmp_path, "llama")
    weights = path / "model.safetensors"
    state = load_file(str(weights))
    state["model.layers.1.mlp.up_proj.weight"][3, :5] = float("nan")
    state["model.norm.weight"][0] = float("inf")
    save_file(state, str(weights), metadata={"format": "pt"})
    with caplog.at_level(logging.WARNING, logger="velotune"):
        vt.load(path, dtype="float32", device="cpu", load_tokenizer_files=False)
    warned = sorted(r.getMessage() for r in caplog.records if "non-finite" in r.getMessage())
    assert warned == [f"{weights}: tensor 'model.layers.1.mlp.up_proj.weight' holds 5 non-finite values "
                      f"(NaN or inf) of 7168",
                      f"{weights}: tensor 'model.norm.weight' holds 1 non-finite values (NaN or inf) of 64"]


def test_non_finite_weights_on_the_generic_path_warn_too(tmp_path, caplog):
    path = _neox(tmp_path)
    weights = path / "model.safetensors"
    state = load_file(str(weights))
    name = next(k for k in state if k.endswith("final_layer_norm.weight"))
    state[name][:2] = float("nan")
    save_file(state, str(weights), metadata={"format": "pt"})
    with caplog.at_level(logging.WARNING, logger="velotune"):
        vt.load(path, dtype="float32", device="cpu", load_tokenizer_files=False)
    warned = [r.getMessage() for r in caplog.records if "non-finite" in r.getMessage()]
    assert warned == [f"{path}: tensor '{name}' holds 2 non-finite values (NaN or inf) of 64"]


def test_non_finite_adapter_weights_warn_too(tmp_path, caplog):
    adapter, model = _adapter(tmp_path)
    weights = adapter / "adapter_model.safetensors"
    state = load_file(str(weights))
    name = "base_model.model.model.layers.1.self_attn.v_proj.lora_A.weight"
    state[name][0, 0] = float("-inf")
    save_file(state, str(weights), metadata={"format": "pt"})
    with caplog.at_level(logging.WARNING, logger="velotune"):
        vt.load_adapter(model, adapter)
    warned = [r.getMessage() for r in caplog.records if "non-finite" in r.getMessage()]
    assert warned == [f"{weights}: tensor '{name}' holds 1 non-finite values (NaN or inf) of 256"]


@pytest.mark.parametrize("content, match", [
    ('{"version": "1.0", "model": ', r"tokenizer\.json: invalid JSON at line 1"),
    ('{"version": "1.0"}', r"tokenizer\.json: not a valid tokenizer file"),
])
def test_invalid_tokenizer_json_names_the_file(tmp_path, content, match):
    from tiny_tokenizer import make_tokenizer
    path, _ = make_checkpoint(tmp_path, "llama_tied")
    make_tokenizer().save_pretrained(str(path))
    (path / "tokenizer.json").write_text(content)
    with pytest.raises(CheckpointError, match=rf"^{path}/{match}"):
        vt.load(path, dtype="float32", device="cpu")


def test_non_utf8_json_config_names_the_file(tmp_path):
    from velotune.errors import CheckpointError
    from velotune.models.checkpoint import read_json
    path = tmp_path / "config.json"
    path.write_bytes(b'{"model_type": "\xff\xfe"}')
    with pytest.raises(CheckpointError, match=r"config.json: not UTF-8 text"):
        read_json(path)
