"""The training loop: losses fall, accumulation normalises by tokens, resume is exact, bad states are refused."""
import json

import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

import velotune as vt
from train_fixtures import base_config, chat_records, interrupt_at_step, make_model_dir, write_jsonl
from velotune.config import load_config
from velotune.errors import ConfigError, TrainingError


@pytest.fixture
def setup(tmp_path):
    model_dir = make_model_dir(tmp_path)
    data = write_jsonl(tmp_path / "chat.jsonl", chat_records(16))
    return model_dir, data, tmp_path


def lora_params(result_or_model):
    return {n: p.detach().clone() for n, p in result_or_model.named_parameters() if p.requires_grad}


def test_lora_run_learns_and_writes_outputs(setup):
    model_dir, data, tmp = setup
    cfg = base_config(model_dir, data, tmp / "run", train={"max_steps": 12, "log_every": 1, "lr": 3e-2})
    result = vt.train(cfg)
    assert result.steps == 12 and not result.interrupted
    # A random base learns slowly through rank-4 adapters: the loss must still clearly fall.
    assert sum(result.losses[-4:]) / 4 < sum(result.losses[:4]) / 4 - 0.05
    lines = [json.loads(l) for l in (tmp / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [l["step"] for l in lines] == list(range(1, 13))
    assert all(l["tokens"] > 0 and l["target_tokens_per_s"] > 0 and "lr" in l for l in lines)
    adapter = json.loads((result.adapter_dir / "adapter_config.json").read_text())
    assert adapter["r"] == 4 and adapter["peft_type"] == "LORA"
    assert (result.adapter_dir / "adapter_model.safetensors").is_file()


def test_gradient_accumulation_normalises_by_real_tokens(setup, monkeypatch):
    """1 x 8 and 8 x 1 see the same 8 samples: the same gradient (not merely the same Adam step)."""
    model_dir, data, tmp = setup
    grads = {}

    def capture(tag):
        def hook(optimizer, args, kwargs):
            grads[tag] = [p.grad.detach().clone() for g in optimizer.param_groups for p in g["params"]]
        return hook

    results = {}
    for tag, bs, accum in (("1x8", 8, 1), ("8x1", 1, 8)):
        handle = register_optimizer_step_pre_hook(capture(tag))
        try:
            cfg = base_config(model_dir, data, tmp / tag, train={"batch_size": bs, "grad_accum": accum,
                                                                 "max_steps": 1})
            results[tag] = vt.train(cfg)
        finally:
            handle.remove()
    assert results["1x8"].losses[0] == pytest.approx(results["8x1"].losses[0], rel=1e-6)
    for a, b in zip(grads["1x8"], grads["8x1"]):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-8)


def test_interrupt_then_resume_equals_uninterrupted_run(setup):
    model_dir, data, tmp = setup
    extra = {"lora": {"dropout": 0.1}, "train": {"max_steps": 4, "save_every": 10}}
    full = vt.train(base_config(model_dir, data, tmp / "full", **extra))

    handle = interrupt_at_step(3)  # Ctrl-C during step 3: steps 1-2 are done
    try:
        first = vt.train(base_config(model_dir, data, tmp / "split", **extra))
    finally:
        handle.remove()
    assert first.interrupted and first.steps == 2
    assert (tmp / "split" / "checkpoints" / "step-000002" / "trainable.safetensors").is_file()
    with pytest.raises(ConfigError, match="holds another run"):
        vt.train(base_config(model_dir, data, tmp / "split", **extra))
    second = vt.train(base_config(model_dir, data, tmp / "split", **extra), ["train.resume=true"])
    assert second.steps == 4
    assert second.losses == full.losses[2:]  # bit for bit on CPU fp32

    from safetensors.torch import load_file
    a = load_file(str(full.adapter_dir / "adapter_model.safetensors"))
    b = load_file(str(second.adapter_dir / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_non_finite_loss_stops_with_last_good_checkpoint(setup):
    model_dir, data, tmp = setup
    calls = {"n": 0}

    def poison(optimizer, args, kwargs):
        calls["n"] += 1
        if calls["n"] == 2:  # after step 2's update, break the weights
            for p in optimizer.param_groups[0]["params"]:
                p.data.fill_(float("nan"))
    handle = register_optimizer_step_post_hook(poison)
    try:
        with pytest.raises(TrainingError, match=r"loss is nan at step 3.*step-000002"):
            vt.train(base_config(model_dir, data, tmp / "run", train={"save_every": 1, "keep_last": 5}))
    finally:
        handle.remove()
    ckpts = sorted(p.name for p in (tmp / "run" / "checkpoints").iterdir())
    assert ckpts == ["step-000001", "step-000002"]
    from safetensors.torch import load_file
    good = load_file(str(tmp / "run" / "checkpoints" / "step-000001" / "trainable.safetensors"))
    assert all(torch.isfinite(t).all() for t in good.values())


def test_keep_last_prunes_old_checkpoints(setup):
    model_dir, data, tmp = setup
    vt.train(base_config(model_dir, data, tmp / "run", train={"max_steps": 5, "save_every": 1, "keep_last": 2}))
    assert sorted(p.name for p in (tmp / "run" / "checkpoints").iterdir()) == ["step-000004", "step-000005"]


def test_overwrite_replaces_a_previous_run(setup):
    model_dir, data, tmp = setup
    cfg = base_config(model_dir, data, tmp / "run", train={"max_steps": 1})
    vt.train(cfg)
    result = vt.train(cfg, ["train.overwrite=true"])
    assert result.steps == 1
    assert len((tmp / "run" / "metrics.jsonl").read_text().splitlines()) == 1


def test_full_finetune_last_layers_and_frozen_embeddings(setup):
    model_dir, data, tmp = setup
    cfg = base_config(model_dir, data, tmp / "full", finetune={"method": "full", "freeze_embeddings": True,
                                                               "train_last_n_layers": 1},
                      train={"max_steps": 2, "lr": 1e-3})
    model, tok = vt.load(model_dir, dtype="float32", device="cpu")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    result = vt.train(cfg, model=model, tokenizer=tok)
    # The last block and the final norm after it train; embeddings, lm_head and block 0 stay.
    block = sum(p.numel() for p in model.model.layers[1].parameters())
    assert result.params["trainable_params"] == block + model.model.norm.weight.numel()
    after = dict(model.named_parameters())
    assert torch.equal(before["model.embed_tokens.weight"], after["model.embed_tokens.weight"])
    assert torch.equal(before["model.layers.0.mlp.up_proj.weight"], after["model.layers.0.mlp.up_proj.weight"])
    assert not torch.equal(before["model.layers.1.mlp.up_proj.weight"], after["model.layers.1.mlp.up_proj.weight"])
    reloaded, _ = vt.load(result.model_dir, dtype="float32", device="cpu")
    ids = torch.tensor([[3, 5, 7, 9]])
    assert torch.equal(reloaded(ids).logits, model.eval()(ids).logits)


def test_full_finetune_of_bf16_weights_says_how_to_keep_fp32_masters(setup, caplog):
    model_dir, data, tmp = setup
    cfg = base_config(model_dir, data, tmp / "bf16", finetune={"method": "full"}, train={"max_steps": 1})
    cfg["model"]["dtype"] = "bfloat16"
    with caplog.at_level("INFO", logger="velotune"):
        vt.train(cfg)
    assert "model.dtype: float32 and train.precision: bf16" in caplog.text


def test_continued_pretraining_on_text_with_eval_split(setup):
    model_dir, _, tmp = setup
    text = write_jsonl(tmp / "text.jsonl", [{"text": f"Vell has {i} rivers and {i + 1} hills."} for i in range(20)])
    cfg = base_config(model_dir, text, tmp / "cpt", finetune={"method": "full"},
                      data={"format": "text", "train_on": "all", "packing": True, "eval_fraction": 0.2,
                            "chat_template": None},
                      train={"max_steps": 3, "eval_every": 3, "lr": 1e-3})
    result = vt.train(cfg)
    assert result.eval_loss is not None and result.eval_loss > 0
    lines = [json.loads(l) for l in (tmp / "cpt" / "metrics.jsonl").read_text().splitlines()]
    assert any("eval_loss" in l for l in lines)


def test_gradient_checkpointing_gives_the_same_losses(setup, monkeypatch):
    from velotune.models import base
    model_dir, data, tmp = setup
    plain = vt.train(base_config(model_dir, data, tmp / "a", train={"max_steps": 3}))
    recomputed = []
    real = base.checkpoint
    monkeypatch.setattr(base, "checkpoint", lambda run, *a, **k: recomputed.append(run) or real(run, *a, **k))
    ckpt = vt.train(base_config(model_dir, data, tmp / "b", train={"max_steps": 3, "gradient_checkpointing": True}))
    assert ckpt.losses == pytest.approx(plain.losses, rel=1e-6)
    every, recomputed[:] = len(recomputed), []
    every_other = vt.train(base_config(model_dir, data, tmp / "c", train={
        "max_steps": 3, "gradient_checkpointing": True, "checkpoint_every_n_layers": 2}))
    assert every_other.losses == pytest.approx(plain.losses, rel=1e-6)
    assert every > 0 and len(recomputed) == every // 2   # the tiny model's 2 blocks: block 0 only
    with pytest.raises(ConfigError, match="train.checkpoint_every_n_layers"):
        load_config(base_config(model_dir, data, tmp / "d", train={"checkpoint_every_n_layers": 0}))


@pytest.mark.parametrize("optimizer,scheduler", [("adamw8bit", "cosine"), ("adamw", "constant")])
def test_other_optimizers_and_schedules_train(setup, optimizer, scheduler):
    model_dir, data, tmp = setup
    result = vt.train(base_config(model_dir, data, tmp / "run", train={
        "max_steps": 6, "optimizer": optimizer, "scheduler": scheduler, "warmup_steps": 2}))
    assert all(torch.isfinite(torch.tensor(result.losses)))
    assert min(result.losses[2:]) < result.losses[0]


def test_bf16_autocast_trains(setup):
    model_dir, data, tmp = setup
    result = vt.train(base_config(model_dir, data, tmp / "run", train={"precision": "bf16", "max_steps": 3}))
    assert all(torch.isfinite(torch.tensor(result.losses)))


def test_fp16_loss_scaling_on_the_cpu_is_checkpointed_and_resumes_exactly(setup):
    """fp16 autocast with a GradScaler (the path GPUs without bf16 take): its scale lives in the checkpoint, and
    an interrupted run resumed from it reproduces the uninterrupted one."""
    model_dir, data, tmp = setup
    extra = {"train": {"precision": "fp16", "max_steps": 4, "save_every": 10}}
    full = vt.train(base_config(model_dir, data, tmp / "full", **extra))
    assert all(torch.isfinite(torch.tensor(full.losses)))
    handle = interrupt_at_step(3)
    try:
        first = vt.train(base_config(model_dir, data, tmp / "split", **extra))
    finally:
        handle.remove()
    from velotune.training.state import read_checkpoint_files
    _, saved, _ = read_checkpoint_files(tmp / "split" / "checkpoints" / "step-000002")
    assert saved["scaler"] is not None and saved["scaler"]["scale"] > 0
    second = vt.train(base_config(model_dir, data, tmp / "split", **extra), ["train.resume=true"])
    assert first.steps == 2 and second.steps == 4
    assert second.losses == full.losses[2:]


def test_schedule_shapes():
    from velotune.training.optim import lr_factor
    assert [lr_factor(s, 10, 2, "linear") for s in (0, 1, 2, 6, 10)] == [0.5, 1.0, 1.0, 0.5, 0.0]
    assert lr_factor(6, 10, 2, "cosine") == pytest.approx(0.5)
    assert lr_factor(9, 10, 0, "constant") == 1.0


def test_missing_model_path_and_quantized_full_finetune_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="model.path"):
        vt.train({"data": {"path": "x.jsonl"}, "train": {"output_dir": str(tmp_path / "o")}})


def test_offloaded_checkpointing_gives_the_same_losses(setup):
    model_dir, data, tmp = setup
    plain = vt.train(base_config(model_dir, data, tmp / "a", train={"max_steps": 3}))
    off = vt.train(base_config(model_dir, data, tmp / "b", train={"max_steps": 3, "gradient_checkpointing": "offload"}))
    assert off.losses == pytest.approx(plain.losses, rel=1e-6)


def test_report_to_without_the_package_warns_and_trains(setup, caplog):
    model_dir, data, tmp = setup
    import importlib.util
    if importlib.util.find_spec("tensorboard") is not None:
        pytest.skip("tensorboard is installed: the missing-package path cannot be shown")
    with caplog.at_level("WARNING", logger="velotune"):
        result = vt.train(base_config(model_dir, data, tmp / "run", train={"max_steps": 1,
                                                                           "report_to": ["tensorboard"]}))
    assert result.steps == 1
    assert "tensorboard package is not installed" in caplog.text
