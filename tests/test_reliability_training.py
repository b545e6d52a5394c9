"""A training run's safety (issue 10): it never deletes or overwrites what it did not write, never writes over its
own input model, reports an unwritable output directory before loading weights, exits 130 when interrupted, and
cleans what a killed run left behind."""
import json
import subprocess
import sys

import pytest
import yaml
from torch.optim.optimizer import register_optimizer_step_pre_hook

import velotune as vt
from train_fixtures import (base_config, chat_records, forbid_weight_loading, interrupt_at_step, make_model_dir,
                            write_jsonl)
from velotune.cli import main
from velotune.errors import ConfigError


@pytest.fixture
def setup(tmp_path):
    model_dir = make_model_dir(tmp_path)
    data = write_jsonl(tmp_path / "chat.jsonl", chat_records(16))
    return model_dir, data, tmp_path



def tree(root):
    return {str(p.relative_to(root)): p.read_bytes() if p.is_file() else None for p in sorted(root.rglob("*"))}


def test_a_non_empty_directory_that_holds_no_run_is_refused_and_left_untouched(setup, monkeypatch):
    model_dir, data, tmp = setup
    out = tmp / "d"
    (out / "adapter").mkdir(parents=True)
    (out / "adapter" / "notes.txt").write_text("keep")
    forbid_weight_loading(monkeypatch)
    with pytest.raises(ConfigError, match=r"d is not empty and holds no velotune run.*train.overwrite=true"):
        vt.train(base_config(model_dir, data, out))
    assert tree(out) == {"adapter": None, "adapter/notes.txt": b"keep"}


def test_overwrite_replaces_only_what_the_previous_run_wrote(setup):
    model_dir, data, tmp = setup
    out = tmp / "run"
    cfg = base_config(model_dir, data, out, train={"max_steps": 2, "save_every": 1})
    vt.train(cfg)
    (out / "notes.txt").write_text("mine")
    (out / "checkpoints" / "README").write_text("mine too")
    vt.train(cfg, ["train.overwrite=true", "train.max_steps=1"])
    assert (out / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["README", "step-000001"]
    assert [json.loads(l)["step"] for l in (out / "metrics.jsonl").read_text().splitlines()] == [1]
    run = json.loads((out / "run.json").read_text())
    assert run["outputs"] == ["run.json", "metrics.jsonl", "checkpoints", "adapter"]


def test_overwrite_keeps_a_users_file_inside_the_adapter_directory(setup):
    """Relies on atomic_dir keeping the entries velotune did not write (models/checkpoint.py)."""
    model_dir, data, tmp = setup
    out = tmp / "d"
    (out / "adapter").mkdir(parents=True)
    (out / "adapter" / "notes.txt").write_text("keep")
    result = vt.train(base_config(model_dir, data, out, train={"max_steps": 1, "overwrite": True}))
    assert (out / "adapter" / "notes.txt").read_text() == "keep"
    assert (result.adapter_dir / "adapter_model.safetensors").is_file()


def test_a_users_file_under_an_output_name_is_refused_even_with_overwrite(setup, monkeypatch):
    model_dir, data, tmp = setup
    out = tmp / "d"
    out.mkdir()
    (out / "metrics.jsonl").write_text("my own numbers\n")
    forbid_weight_loading(monkeypatch)
    with pytest.raises(ConfigError, match=r"metrics.jsonl.*not written by a velotune run"):
        vt.train(base_config(model_dir, data, out, train={"overwrite": True}))
    assert (out / "metrics.jsonl").read_text() == "my own numbers\n"


def test_a_run_never_writes_into_or_over_its_own_input_model(setup, monkeypatch):
    model_dir, data, tmp = setup
    base = tmp / "d" / "model"
    base.parent.mkdir()
    model_dir.rename(base)
    before = tree(tmp / "d")
    forbid_weight_loading(monkeypatch)
    full = {"finetune": {"method": "full"}, "train": {"max_steps": 1, "overwrite": True}}
    cases = [(tmp / "d", r"model.path: .*d/model is this run's output .*d/model"),   # full fine-tune: d/model
             (base, r"train.output_dir: .*d/model is inside the base model directory"),
             (base / "runs" / "a", r"train.output_dir: .*is inside the base model directory")]
    for out, message in cases:
        with pytest.raises(ConfigError, match=message):
            vt.train(base_config(base, data, out, **full))
    assert tree(tmp / "d") == before


def test_a_passed_model_is_protected_like_model_path(setup):
    model_dir, data, tmp = setup
    base = tmp / "d" / "model"
    base.parent.mkdir()
    model_dir.rename(base)
    model, tok = vt.load(base, dtype="float32", device="cpu")
    cfg = base_config(base, data, tmp / "d", finetune={"method": "full"}, train={"max_steps": 1, "overwrite": True})
    del cfg["model"]["path"]
    with pytest.raises(ConfigError, match="is this run's output"):
        vt.train(cfg, model=model, tokenizer=tok)


def test_ctrl_c_exits_130_and_says_where_the_checkpoint_is_and_how_to_continue(setup, capsys):
    model_dir, data, tmp = setup
    out = tmp / "run"
    config = tmp / "cfg.yaml"
    config.write_text(yaml.safe_dump(base_config(model_dir, data, out, train={"max_steps": 4})))
    handle = interrupt_at_step(3)
    try:
        code = main(["train", str(config), "train.lr=0.02"])
    finally:
        handle.remove()
    captured = capsys.readouterr()
    assert code == 130
    assert "done:" not in captured.out
    assert f"checkpoint: {out / 'checkpoints' / 'step-000002'}" in captured.err
    assert f"velotune train {config} train.lr=0.02 train.resume=true" in captured.err
    # ... and that command continues the run to its end.
    assert main(["train", str(config), "train.lr=0.02", "train.resume=true"]) == 0
    assert [json.loads(l)["step"] for l in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4]


def dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_leftovers_of_a_killed_checkpoint_write_are_removed_on_the_next_start(setup):
    """The next start cleans them even when it writes no checkpoint itself (save_every unset)."""
    model_dir, data, tmp = setup
    out = tmp / "run"
    cfg = base_config(model_dir, data, out, train={"max_steps": 2, "save_every": 1})
    vt.train(cfg)
    leftover = out / "checkpoints" / f".step-000003.tmp-{dead_pid()}-x1"
    leftover.mkdir()
    (leftover / "trainable.safetensors").write_bytes(b"half")
    vt.train(cfg, ["train.resume=true", "train.max_steps=3", "train.save_every=null"])
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000001", "step-000002"]


def test_metrics_repeat_no_step_after_a_crash_and_resume(setup):
    model_dir, data, tmp = setup
    out = tmp / "run"
    cfg = base_config(model_dir, data, out, train={"max_steps": 4, "save_every": 2})
    calls = {"n": 0}

    def crash(optimizer, args, kwargs):  # the process dies in step 4: steps 1-3 are logged, step 2 is saved
        calls["n"] += 1
        if calls["n"] == 4:
            raise RuntimeError("killed")
    handle = register_optimizer_step_pre_hook(crash)
    try:
        with pytest.raises(RuntimeError, match="killed"):
            vt.train(cfg)
    finally:
        handle.remove()
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "lo')  # a line cut short by the kill
    vt.train(cfg, ["train.resume=true"])
    assert [json.loads(l)["step"] for l in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4]


def test_an_output_dir_that_cannot_be_written_is_reported_before_any_weights_load(setup, monkeypatch):
    model_dir, data, tmp = setup
    blocker = tmp / "a-file"
    blocker.write_text("not a directory")
    forbid_weight_loading(monkeypatch)
    with pytest.raises(ConfigError, match=r"train.output_dir: cannot write to .*a-file/run"):
        vt.train(base_config(model_dir, data, blocker / "run"))
