"""Learning rates per parameter group: LoRA+ (B matrices at lr x train.lora_plus_ratio) and train.embedding_lr for
trained embeddings and head; the schedule scales every group alike and the log shows train.lr."""
import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

import velotune as vt
from test_training_path import metric_lines
from train_fixtures import base_config, chat_records, make_model_dir, write_jsonl
from velotune.config import load_config


@pytest.fixture
def setup(tmp_path):
    return make_model_dir(tmp_path), write_jsonl(tmp_path / "chat.jsonl", chat_records(8)), tmp_path


def _train_and_watch(setup, train: dict, lora: dict):
    """vt.train with the settings; returns ({parameter name: lr at each step}, the run's logged lrs)."""
    model_dir, data, tmp = setup
    model, tok = vt.load(model_dir, dtype="float32", device="cpu")
    rates = {}

    def watch(optimizer, args, kwargs):
        names = {p: n for n, p in model.named_parameters()}
        for group in optimizer.param_groups:
            for p in group["params"]:
                rates.setdefault(names[p], []).append(group["lr"])

    handle = register_optimizer_step_pre_hook(watch)
    try:
        cfg = base_config(model_dir, data, tmp / "run", train={"max_steps": 3, "lr": 1e-3, "warmup_steps": 2,
                                                                 "scheduler": "linear", **train}, lora=lora)
        vt.train(cfg, model=model, tokenizer=tok)
    finally:
        handle.remove()
    logged = [line["lr"] for line in metric_lines(tmp / "run") if "loss" in line]
    return rates, logged


def test_lora_plus_and_embedding_rates_follow_the_schedule(setup):
    rates, logged = _train_and_watch(setup, {"lora_plus_ratio": 16, "embedding_lr": 1e-4},
                                     {"modules_to_save": ["embed_tokens"]})
    a = [n for n in rates if ".lora_A." in n]
    b = [n for n in rates if ".lora_B." in n]
    embed = [n for n in rates if n.endswith("embed_tokens.weight")]
    assert a and b and len(embed) == 1
    schedule = logged  # train.lr's: warm-up over 2 steps, then the linear decay
    assert schedule[:2] == pytest.approx([5e-4, 1e-3])
    assert all(rates[n] == pytest.approx(schedule) for n in a)
    assert all(rates[n] == pytest.approx([16 * r for r in schedule]) for n in b)
    assert rates[embed[0]] == pytest.approx([r / 10 for r in schedule])


def test_without_the_settings_every_parameter_runs_at_lr(setup):
    rates, logged = _train_and_watch(setup, {}, {"modules_to_save": ["embed_tokens"]})
    assert all(r == pytest.approx(logged) for r in rates.values())


def test_transformers_and_unsloth_names_are_read():
    cfg = load_config({"loraplus_lr_ratio": 16, "embedding_learning_rate": 5e-5, "data": {"path": "x.jsonl"},
                       "model": {"path": "m"}})
    assert cfg.train.lora_plus_ratio == 16 and cfg.train.embedding_lr == 5e-5


def test_weight_decay_still_skips_biases_and_norms():
    from velotune.training.optim import build_optimizer
    cfg = load_config({"train": {"lr": 1e-3, "weight_decay": 0.1, "lora_plus_ratio": 4},
                       "data": {"path": "x.jsonl"}, "model": {"path": "m"}}).train
    a, b, norm, table_b = (torch.nn.Parameter(torch.ones(2, 2)), torch.nn.Parameter(torch.ones(2, 2)),
                           torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(2, 2)))
    optimizer = build_optimizer([a, b, norm, table_b], cfg, named={
        a: "x.lora_A.weight", b: "x.lora_B.weight", norm: "n", table_b: "embed_tokens.lora_embedding_B"})
    groups = [(g["lr"], g["weight_decay"], len(g["params"])) for g in optimizer.param_groups]
    assert groups == [(1e-3, 0.1, 1), (1e-3, 0.0, 1), (4e-3, 0.1, 2)]
