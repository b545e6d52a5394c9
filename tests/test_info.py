"""`velotune info`: the facts of a checkpoint and an adapter, read from headers and JSON only."""
import json

import pytest

import velotune as vt
from train_fixtures import make_model_dir
from velotune.cli import main
from velotune.errors import CheckpointError
from velotune.models.info import model_info


def test_info_reads_headers_and_templates(tmp_path, capsys):
    from velotune.data.templates import BUILTIN_TEMPLATES
    model_dir = make_model_dir(tmp_path)
    config = json.loads((model_dir / "config.json").read_text())
    model, tokenizer = vt.load(model_dir, dtype="float32")
    expected_params = sum(p.numel() for p in model.parameters())
    vt.add_lora(model, r=4, alpha=8, targets=["q_proj", "v_proj"])
    adapter = tmp_path / "adapter"
    vt.save_adapter(model, adapter)
    tokenizer.chat_template = BUILTIN_TEMPLATES["alpaca"]
    tokenizer.save_pretrained(str(adapter))

    facts = model_info(model_dir)
    assert facts["model_type"] == "llama" and facts["velotune_path"] == "native"
    assert facts["parameters"] == expected_params and facts["stored_dtypes"] == {"F32": expected_params}
    assert facts["context_length"] == config["max_position_embeddings"]
    assert facts["chat_template"]["source"] is None

    with_adapter = model_info(model_dir, adapter)
    assert with_adapter["adapter"]["r"] == 4 and sorted(with_adapter["adapter"]["targets"]) == ["q_proj", "v_proj"]
    assert with_adapter["chat_template"]["format"] == "alpaca"
    assert with_adapter["chat_template"]["source"].startswith("adapter")

    assert main(["info", str(model_dir), "--adapter", str(adapter)]) == 0
    out = capsys.readouterr().out
    assert "native path" in out and f"{expected_params:,}" in out and "r=4" in out and "alpaca" in out
    assert main(["info", str(model_dir), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["parameters"] == expected_params


def test_info_names_a_missing_directory(tmp_path):
    with pytest.raises(CheckpointError, match="no such model directory"):
        model_info(tmp_path / "nothing")
