"""The config schema: defaults, overrides, and errors that name the key, the file and the line."""
import pytest

from velotune.config import Config, load_config
from velotune.errors import ConfigError


def write(tmp_path, text):
    path = tmp_path / "cfg.yaml"
    path.write_text(text)
    return path


def test_yaml_with_overrides(tmp_path):
    path = write(tmp_path, "model:\n  path: some/model\nlora:\n  r: 8\ntrain:\n  lr: 2e-4\n")
    cfg = load_config(path, ["lora.r=32", "train.batch_size=2", "data.packing=false", "lora.targets=[q_proj]"])
    assert cfg.model.path == "some/model"
    assert cfg.lora.r == 32 and cfg.train.batch_size == 2 and cfg.data.packing is False
    assert cfg.train.lr == pytest.approx(2e-4) and isinstance(cfg.train.lr, float)
    assert cfg.lora.targets == ["q_proj"]


def test_defaults_and_dict_and_object_round_trip():
    cfg = load_config({"lora": {"alpha": 32}})
    assert cfg.lora.alpha == 32.0 and cfg.lora.r == 16 and cfg.finetune.method == "lora"
    again = load_config(cfg)
    assert again == cfg and isinstance(again, Config)


def test_misspelled_key_names_file_line_and_suggestion(tmp_path):
    path = write(tmp_path, "model:\n  path: x\nlora:\n  r: 8\n  alpah: 3\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    msg = str(err.value)
    assert f"{path}:5" in msg and "lora.alpah" in msg and "did you mean 'alpha'" in msg


def test_unknown_section(tmp_path):
    path = write(tmp_path, "modle:\n  path: x\n")
    with pytest.raises(ConfigError, match=r"cfg.yaml:1: unknown key 'modle' \(did you mean 'model'"):
        load_config(path)


def test_wrong_type_names_key_and_expected_type(tmp_path):
    path = write(tmp_path, "train:\n  batch_size: four\n")
    with pytest.raises(ConfigError, match=r"cfg.yaml:2: 'train.batch_size' = 'four': expected int"):
        load_config(path)


def test_bad_choice_lists_allowed_values():
    with pytest.raises(ConfigError, match=r"'train.scheduler' = 'cosne': expected one of 'linear', 'cosine'"):
        load_config({"train": {"scheduler": "cosne"}})


def test_bool_is_not_an_int():
    with pytest.raises(ConfigError, match="train.batch_size"):
        load_config({"train": {"batch_size": True}})


def test_bad_override_syntax_and_invalid_yaml(tmp_path):
    with pytest.raises(ConfigError, match="expected key=value"):
        load_config({}, ["lora.r"])
    path = write(tmp_path, "model:\n  path: [unclosed\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(path)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
