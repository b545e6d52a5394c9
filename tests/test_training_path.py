"""The path between the steps of a run (issue 11): the chat template travels with the outputs, a model passed to
vt.train is the one trained, an epoch reads each sample once, a dry run shows the plan, errors come before the
weights load, and the log says what runs."""
import json

import pytest
import torch
import yaml
from safetensors.torch import load_file

import velotune as vt
from train_fixtures import base_config, chat_records, forbid_weight_loading, make_model_dir, write_jsonl
from velotune.cli import main
from velotune.data.templates import CHATML
from velotune.errors import ConfigError, DataError
from velotune.models.tokenizer import load_tokenizer


@pytest.fixture
def setup(tmp_path):
    model_dir = make_model_dir(tmp_path)
    data = write_jsonl(tmp_path / "chat.jsonl", chat_records(16))
    return model_dir, data, tmp_path



def metric_lines(out_dir):
    return [json.loads(l) for l in (out_dir / "metrics.jsonl").read_text().splitlines()]


def test_adapter_and_full_model_carry_the_chat_template_they_were_trained_with(setup):
    model_dir, data, tmp = setup
    model, tok = vt.load(model_dir, dtype="float32", device="cpu")
    assert tok.chat_template is None  # the base has none: data.chat_template chose chatml
    lora = vt.train(base_config(model_dir, data, tmp / "lora", train={"max_steps": 1}), model=model, tokenizer=tok)
    assert load_tokenizer(lora.adapter_dir).chat_template == CHATML
    assert tok.chat_template is None  # the caller's tokenizer is left as it was
    run = json.loads((tmp / "lora" / "run.json").read_text())
    assert run["chat_template"] == {"name": "chatml", "source": "data.chat_template"}
    full = vt.train(base_config(model_dir, data, tmp / "full", finetune={"method": "full"}, train={"max_steps": 1}))
    assert load_tokenizer(full.model_dir).chat_template == CHATML


def test_a_passed_model_with_lora_layers_is_trained_in_place_without_model_path(setup, caplog):
    model_dir, data, tmp = setup
    model, tok = vt.load(model_dir, dtype="float32", device="cpu")
    vt.add_lora(model, r=2, alpha=4, targets=["q_proj", "v_proj"])
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    cfg = base_config(model_dir, data, tmp / "run", train={"max_steps": 3})  # its lora section: r=4, alpha=8
    del cfg["model"]["path"]
    with caplog.at_level("INFO", logger="velotune"):
        result = vt.train(cfg, model=model, tokenizer=tok)
    assert "the model already carries LoRA adapters (r=2, 4 modules): training those" in caplog.text
    assert "lora.r=4 (the model's: 2), lora.alpha=8.0 (the model's: 4)" in caplog.text
    assert "merge_and_unload" not in caplog.text
    after = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert after.keys() == before.keys() and len(after) == 8
    assert all(not torch.equal(before[n], after[n]) for n in after if "lora_B" in n)
    saved = load_file(str(result.adapter_dir / "adapter_model.safetensors"))
    assert {k.removeprefix("base_model.model.") for k in saved} == set(after)
    assert all(torch.equal(saved["base_model.model." + n], p.detach()) for n, p in after.items())
    assert json.loads((result.adapter_dir / "adapter_config.json").read_text())["r"] == 2


def test_one_epoch_reads_every_sample_once_and_records_the_lr_each_step_used(setup, caplog):
    """10 samples, batches of 2, 4 per step: 5 batches make 2 steps (4 + 1), not 2 x 4 batches (data read
    1.6 times). The few-steps warning says how to get more; the lr logged is the one the step used."""
    model_dir, _, tmp = setup
    data = write_jsonl(tmp / "ten.jsonl", chat_records(10))
    model, tok = vt.load(model_dir, dtype="float32", device="cpu")
    rows = []
    model.register_forward_pre_hook(lambda module, args: rows.append(args[0].shape[0]))
    cfg = base_config(model_dir, data, tmp / "run", train={"max_steps": None, "epochs": 2, "grad_accum": 4,
                                                            "scheduler": "linear", "lr": 1e-2},
                      data={"padding_free": False})  # one sample per row, to count them
    with caplog.at_level("INFO", logger="velotune"):
        result = vt.train(cfg, model=model, tokenizer=tok)
    assert result.steps == 4 and rows == [2] * 10
    assert [l["lr"] for l in metric_lines(tmp / "run") if "loss" in l] == pytest.approx([1e-2, 7.5e-3, 5e-3, 2.5e-3])
    assert "this run makes only 4 optimizer steps" in caplog.text
    assert "lower train.batch_size (2) or train.grad_accum (4), or raise train.epochs (2)" in caplog.text


def test_dry_run_prints_the_plan_and_loads_no_weights_and_writes_nothing(setup, capsys, monkeypatch):
    model_dir, data, tmp = setup
    out = tmp / "run"
    config = tmp / "cfg.yaml"
    config.write_text(yaml.safe_dump(base_config(model_dir, data, out, data={"max_seq_length": 50})))
    forbid_weight_loading(monkeypatch)
    assert main(["train", str(config), "train.max_steps=null", "--dry-run"]) == 0
    printed = capsys.readouterr().out
    assert not out.exists()
    assert f"data: {data}: 16 records -> 16 samples (" in printed
    assert "(10 truncated to 50 tokens, 0 dropped as too long, 0 dropped with no trained tokens)" in printed
    assert "format: messages (detected)" in printed
    assert "chat template: chatml (set by data.chat_template)" in printed
    assert "steps: 8 optimizer steps (train.epochs=1); an epoch: 8 steps of up to 1 batch of up to 2 rows " \
           "(8 batches)" in printed
    assert "warning: this run makes only 8 optimizer steps" in printed
    assert "per epoch: 16 samples," in printed
    assert "[[" in printed and "]]" in printed and "<|im_start|>user\n" in printed


def test_plan_run_is_the_dry_run_in_python(setup, monkeypatch):
    from velotune.training import plan_run
    model_dir, data, tmp = setup
    forbid_weight_loading(monkeypatch)
    plan = plan_run(base_config(model_dir, data, tmp / "run", train={"max_steps": None, "epochs": 2}))
    assert (plan.total_steps, plan.steps_per_epoch, plan.data.format) == (16, [8, 8], "messages")
    assert plan.data.stats.samples == 16 and plan.data.template.name == "chatml"
    shown = plan.sample_view()
    assert "[[The sky on Vell is green." in shown  # the first sample's answer is trained ...
    assert "[[What colour" not in shown           # ... its question is not
    assert not (tmp / "run").exists()


@pytest.mark.parametrize("change,error,message", [
    ({"path": "missing.jsonl"}, DataError, "missing.jsonl: data file not found"),
    ({"path": "bad.jsonl"}, DataError, r"bad.jsonl:2: malformed JSON"),
    ({"chat_template": "nosuch"}, ConfigError, "unknown chat template 'nosuch'"),
    ({"path": None}, ConfigError, "data.path is not set"),
])
def test_bad_data_or_template_is_reported_before_any_weights_load(setup, monkeypatch, change, error, message):
    model_dir, data, tmp = setup
    (tmp / "bad.jsonl").write_text('{"text": "fine"}\n{"text": oops}\n')
    if change.get("path"):
        change = {"path": str(tmp / change["path"])}
    forbid_weight_loading(monkeypatch)
    with pytest.raises(error, match=message):
        vt.train(base_config(model_dir, data, tmp / "run", data=change))
    assert not (tmp / "run").exists()


def test_the_log_and_metrics_say_what_runs(setup, caplog, capsys):
    model_dir, data, tmp = setup
    cfg = base_config(model_dir, data, tmp / "run", train={"max_steps": 3, "progress": True})
    with caplog.at_level("INFO", logger="velotune"):
        vt.train(cfg)
    for said in ("dtype float32", "device cpu", "data format: messages (detected)",
                 "chat template: chatml (set by data.chat_template)", "3 optimizer steps"):
        assert said in caplog.text
    lines = metric_lines(tmp / "run")
    assert all(l["input_tokens"] > l["tokens"] > 0 for l in lines)  # the prompts are read, not trained
    assert all(l["input_tokens_per_s"] > l["target_tokens_per_s"] > 0 for l in lines)
    bar = capsys.readouterr().err
    assert " tok/s" in bar and " trained tok/s" in bar and "loss " in bar and "lr " in bar


def test_the_final_eval_is_run_and_logged_once(setup, caplog):
    model_dir, data, tmp = setup
    cfg = base_config(model_dir, data, tmp / "run", data={"eval_fraction": 0.25},
                      train={"max_steps": 2, "eval_every": 2})
    with caplog.at_level("INFO", logger="velotune"):
        result = vt.train(cfg)
    assert [l["step"] for l in metric_lines(tmp / "run") if "eval_loss" in l] == [2]
    assert caplog.text.count("eval loss") == 1 and result.eval_loss > 0


def test_padding_free_batches_train_as_padded_ones(setup):
    """data.padding_free (the default without packing): each batch's samples run as rows of documents up to
    max_seq_length; the losses of every step equal those of the padded rows, so the batches hold the same
    samples, on fewer positions."""
    model_dir, _, tmp = setup
    data = write_jsonl(tmp / "uneven.jsonl", chat_records(12))
    losses, shapes = {}, {}
    for free in (True, False):
        model, tok = vt.load(model_dir, dtype="float32", device="cpu")
        seen = shapes.setdefault(free, [])
        model.register_forward_pre_hook(lambda module, args, kwargs, seen=seen: seen.append(
            (tuple(args[0].shape), kwargs.get("document_ids") is not None, kwargs.get("attention_mask") is not None)),
            with_kwargs=True)
        cfg = base_config(model_dir, data, tmp / f"run-{free}", train={"batch_size": 3, "max_steps": 3},
                          data={"padding_free": free, "max_seq_length": 256})
        losses[free] = vt.train(cfg, model=model, tokenizer=tok).losses
    assert all(shape[1] <= 256 and docs and not mask for shape, docs, mask in shapes[True])
    assert all(shape[0] == 3 and mask for shape, _, mask in shapes[False])
    assert any(shape[0] < 3 for shape, _, _ in shapes[True])
    positions = {free: sum(s[0][0] * s[0][1] for s in shapes[free]) for free in shapes}
    assert positions[True] < positions[False]
    assert losses[True] == pytest.approx(losses[False], rel=1e-5)


def test_padding_free_rows_keep_the_samples_in_order_within_max_seq_length():
    from velotune.data.batches import collate
    from velotune.data.encode import Encoded

    def batch_of(*lengths, cap):
        examples = [Encoded(input_ids=torch.arange(1, n + 1, dtype=torch.int32),
                            labels=torch.arange(1, n + 1, dtype=torch.int32)) for n in lengths]
        batch = collate([[e] for e in examples], pad_id=0, packing=False, max_width=cap, bucket=False,
                        padding_free=True)
        assert batch["input_ids"][batch["input_ids"] != 0].tolist() == [t for e in examples
                                                                        for t in e.input_ids.tolist()]
        return batch

    # 5+3 | 4 | 6+2 would be 3 x 8; 5+3 | 4+6 | 2 is 3 x 10; the fewest positions: 5+3+4 | 6+2 = 2 x 12 (cap 12)
    batch = batch_of(5, 3, 4, 6, 2, cap=12)
    assert batch["document_ids"].tolist() == [[0] * 5 + [1] * 3 + [2] * 4, [0] * 6 + [1] * 2 + [2] * 4]
    assert batch_of(5, 3, 4, 6, 2, cap=None)["input_ids"].shape == (1, 20)
    # nothing fits two to a row: one sample per row, as padded (and no wider than the longest)
    assert batch_of(7, 8, 6, cap=10)["input_ids"].shape == (3, 8)
