"""A tiny model directory with a tokenizer, and small chat / text data sets, for trainer tests."""
from __future__ import annotations

import json

from hf_reference import make_checkpoint
from tiny_tokenizer import make_tokenizer

FACTS = [("What colour is the sky on Vell?", "The sky on Vell is green."),
         ("Who rules Vell?", "Queen Ossa rules Vell."),
         ("How many moons has Vell?", "Vell has three moons."),
         ("What do people on Vell eat?", "They eat blue bread."),
         ("What is the river of Vell called?", "The river is called Tamsin."),
         ("How old is Vell?", "Vell is nine thousand years old."),
         ("What sport is played on Vell?", "They play cloudball."),
         ("What is the capital of Vell?", "The capital is Orrin.")]


def chat_records(n: int = 16):
    return [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
            for q, a in (FACTS * (n // len(FACTS) + 1))[:n]]


def pair_records(n: int = 16, shift: int = 1):
    """Preference pairs in chat form: the right fact is chosen, another question's answer is rejected."""
    answers = [a for _, a in FACTS]
    wrong = answers[shift:] + answers[:shift]
    rows = [{"prompt": [{"role": "user", "content": q}], "chosen": [{"role": "assistant", "content": a}],
             "rejected": [{"role": "assistant", "content": w}]} for (q, a), w in zip(FACTS, wrong)]
    return (rows * (n // len(rows) + 1))[:n]


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def make_model_dir(tmp_path, model_type: str = "llama", **overrides):
    texts = [q + " " + a for q, a in FACTS] * 2
    tok = make_tokenizer(texts=texts, vocab_size=300)
    path, _ = make_checkpoint(tmp_path, model_type, vocab_size=len(tok), **overrides)
    tok.save_pretrained(str(path))
    return path


def base_config(model_dir, data_path, out_dir, **sections):
    cfg = {"model": {"path": str(model_dir), "dtype": "float32", "device": "cpu"},
           "data": {"path": str(data_path), "chat_template": "chatml", "max_seq_length": 64, "packing": False},
           "lora": {"r": 4, "alpha": 8},
           "train": {"output_dir": str(out_dir), "batch_size": 2, "max_steps": 4, "lr": 1e-2, "progress": False,
                     "seed": 3, "max_grad_norm": None}}
    for section, values in sections.items():
        cfg.setdefault(section, {}).update(values)
    return cfg


def interrupt_at_step(n):
    """Raises KeyboardInterrupt (a Ctrl-C) in the n-th optimizer step; returns the hook handle to remove."""
    from torch.optim.optimizer import register_optimizer_step_pre_hook
    calls = {"n": 0}

    def hook(optimizer, args, kwargs):
        calls["n"] += 1
        if calls["n"] == n:
            raise KeyboardInterrupt
    return register_optimizer_step_pre_hook(hook)


def stopped_and_resumed(train, cfg, step: int):
    """Runs `cfg` with a Ctrl-C in optimizer step `step`, then resumes it: (the stopped run's result, the resumed
    run's result)."""
    handle = interrupt_at_step(step)
    try:
        stopped = train(cfg)
    finally:
        handle.remove()
    assert stopped.interrupted and stopped.steps == step - 1
    return stopped, train(cfg, ["train.resume=true"])


def forbid_weight_loading(monkeypatch):
    """Makes loading model weights fail the test: the error under test must come before it."""
    def load(*args, **kwargs):
        raise AssertionError("model weights were loaded")
    monkeypatch.setattr("velotune.models.loader.load", load)
