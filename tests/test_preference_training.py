"""Preference objectives (dpo, orpo, simpo) through the one training loop: the batch split does not change an
update, the two references agree, a resumed full fine-tune keeps its reference, and DPO learns a preference that
holds on held-out prompts."""
import json

import pytest
from torch.optim.optimizer import register_optimizer_step_pre_hook

import velotune as vt
from train_fixtures import (FACTS, base_config, chat_records, make_model_dir, pair_records, stopped_and_resumed,
                            write_jsonl)

_ = vt.train
from velotune.errors import CheckpointError  # noqa: E402
from velotune.training.trainer import train  # noqa: E402

# The accumulation checks compare fp32 gradients of the same 8 pairs summed in another order: measured <= 3e-7
# relative (of each tensor's largest value); 1e-5 is the bound and still fails on a wrong normalisation
# (a factor of 2, 4 or 8).
GRAD_RTOL = 1e-5


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pref")
    return make_model_dir(tmp), write_jsonl(tmp / "pairs.jsonl", pair_records(8)), tmp


def first_step_grads(cfg):
    """The gradients of the first optimizer step (after the loop's normalisation), by parameter name."""
    model, tok = vt.load(cfg["model"]["path"], dtype="float32", device="cpu")
    if cfg.get("finetune", {}).get("method") != "full":
        vt.add_lora(model, r=4, alpha=8, seed=0)
    names = {id(p): n for n, p in model.named_parameters()}
    grads = {}

    def hook(optimizer, args, kwargs):
        if not grads:
            for group in optimizer.param_groups:
                for p in group["params"]:
                    if p.grad is not None:
                        grads[names[id(p)]] = p.grad.detach().clone()
    handle = register_optimizer_step_pre_hook(hook)
    try:
        result = train(cfg, model=model, tokenizer=tok)
    finally:
        handle.remove()
    return grads, result


def max_rel_diff(a, b):
    assert a.keys() == b.keys() and a
    return max(float((a[k] - b[k]).abs().max() / b[k].abs().max().clamp(min=1e-12)) for k in a)


@pytest.mark.parametrize("objective,extra", [("dpo", {}), ("dpo", {"loss_type": "ipo"}), ("orpo", {}),
                                             ("simpo", {})])
def test_the_batch_split_does_not_change_the_update(tiny, objective, extra):
    """8 pairs as 8 x 1, 4 x 2 and 2 x 4 (batch x accumulation): the same gradients. Pairs of unequal lengths
    make a per-micro-batch mean (TRL's) differ here; ORPO's NLL is over the global batch's chosen tokens."""
    model_dir, data, tmp = tiny
    grads = {}
    for batch, accum in ((8, 1), (4, 2), (2, 4)):
        cfg = base_config(model_dir, data, tmp / f"split-{objective}-{batch}",
                          train={"batch_size": batch, "grad_accum": accum, "max_steps": 1, "overwrite": True},
                          preference=extra, data={"shuffle": False})
        cfg["objective"] = objective
        grads[batch], _ = first_step_grads(cfg)
    assert max_rel_diff(grads[4], grads[8]) <= GRAD_RTOL
    assert max_rel_diff(grads[2], grads[8]) <= GRAD_RTOL


def test_adapter_off_and_precomputed_references_agree(tiny):
    """For LoRA the base never changes: the reference computed every step with the adapters off and the one
    computed once before training give the same run."""
    model_dir, data, tmp = tiny
    losses = {}
    for mode in ("adapter_off", "precomputed"):
        cfg = base_config(model_dir, data, tmp / f"ref-{mode}", preference={"reference": mode},
                          train={"overwrite": True, "max_steps": 3})
        cfg["objective"] = "dpo"
        losses[mode] = train(cfg).losses
    assert losses["adapter_off"][0] == pytest.approx(0.6931471805599453, abs=1e-6)  # policy == reference: log 2
    assert losses["precomputed"] == pytest.approx(losses["adapter_off"], rel=1e-5)


def test_a_resumed_full_fine_tune_keeps_its_reference(tiny):
    """Full fine-tuning has no adapters to switch off: the reference is computed before step 1 and kept in
    checkpoints/; after Ctrl-C and train.resume the run goes on exactly as if it had not stopped."""
    model_dir, data, tmp = tiny

    def cfg(out):
        c = base_config(model_dir, data, tmp / out, finetune={"method": "full"},
                        train={"max_steps": 4, "save_every": 2, "lr": 1e-3, "batch_size": 2})
        c["objective"] = "dpo"
        return c
    whole = train(cfg("full-whole")).losses
    stopped, resumed = stopped_and_resumed(train, cfg("full-split"), 3)
    assert (tmp / "full-split" / "checkpoints" / "reference_logps.safetensors").is_file()
    assert stopped.losses + resumed.losses == whole

    # A new run over it (train.overwrite) replaces what the old one wrote, its reference log-probs included.
    cache = tmp / "full-split" / "checkpoints" / "reference_logps.safetensors"
    sft = cfg("full-split")
    sft.update(objective="sft", data={**sft["data"], "path": str(tmp / "sft.jsonl")})
    write_jsonl(tmp / "sft.jsonl", chat_records(8))
    train(sft, ["train.overwrite=true", "train.max_steps=1", "train.save_every=null"])
    assert not cache.exists()
    train(cfg("full-split"), ["train.overwrite=true"])
    assert cache.is_file()

    # The reference belongs to its data: other data on resume is refused, not silently recomputed.
    other = write_jsonl(tmp / "other.jsonl", pair_records(8, shift=2))
    with pytest.raises(CheckpointError, match="computed for other train data"):
        train(cfg("full-split"), ["train.resume=true", "train.max_steps=6", f"data.path={other}"])


def test_metrics_name_the_rewards(tiny):
    model_dir, data, tmp = tiny
    cfg = base_config(model_dir, data, tmp / "metrics", train={"overwrite": True, "max_steps": 2},
                      data={"eval_path": str(data)})
    cfg["objective"] = "dpo"
    result = train(cfg)
    lines = [json.loads(line) for line in (tmp / "metrics" / "metrics.jsonl").read_text().splitlines()]
    step = next(line for line in lines if "loss" in line)
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"):
        assert key in step
    assert step["rewards/accuracies"] in (0.0, 0.5, 1.0)  # 2 pairs a step
    assert step["rewards/margins"] == pytest.approx(step["rewards/chosen"] - step["rewards/rejected"], abs=1e-6)
    assert set(result.eval_metrics) >= {"eval_loss", "eval_rewards/accuracies", "eval_rewards/margins"}


@pytest.mark.slow
def test_dpo_learns_a_preference_that_holds_on_held_out_prompts(tmp_path):
    """Chosen answers are polite ("Certainly. ..."), rejected ones curt ("No. ..."); after a short DPO run the
    implicit reward prefers the polite answer on prompts never trained on."""
    model_dir = make_model_dir(tmp_path)
    questions = [q for q, _ in FACTS]

    def rows(qs):
        return [{"prompt": q, "chosen": f" Certainly. {a}", "rejected": f" No. {a}"} for q, a in
                zip(qs, [a for _, a in FACTS])]
    train_file = write_jsonl(tmp_path / "train.jsonl", rows(questions[:6]) * 4)
    held_out = write_jsonl(tmp_path / "held.jsonl", rows(questions[6:]))
    cfg = base_config(model_dir, train_file, tmp_path / "run", data={"eval_path": str(held_out)},
                      train={"max_steps": 24, "lr": 5e-3, "batch_size": 2, "eval_every": 24})
    cfg["objective"] = "dpo"
    result = train(cfg)
    print("held-out after DPO:", result.eval_metrics, "train loss first/last:", result.losses[0], result.losses[-1])
    # Before training the policy is the reference: every margin is 0, accuracy 0, loss log 2.
    assert result.losses[0] == pytest.approx(0.6931, abs=1e-4)
    assert result.eval_metrics["eval_rewards/accuracies"] == 1.0
    assert result.eval_metrics["eval_rewards/margins"] > 1.0
    assert result.losses[-1] < 0.35


def test_qlora_dpo_uses_the_4bit_base_as_its_reference(tiny):
    """QLoRA: the reference is the NF4 base with the adapters off (no second copy); the first loss is log 2."""
    pytest.importorskip("bitsandbytes")
    model_dir, data, tmp = tiny
    cfg = base_config(model_dir, data, tmp / "qlora", model={"quantize": "nf4"},
                      train={"overwrite": True, "max_steps": 2})
    cfg["objective"] = "dpo"
    result = train(cfg)
    assert result.losses[0] == pytest.approx(0.6931471805599453, abs=1e-6)
    assert result.losses[1] != result.losses[0] and (tmp / "qlora" / "adapter" / "adapter_config.json").is_file()


def test_a_frozen_copy_is_the_reference_of_a_resumed_full_fine_tune(tiny):
    """preference.reference: model reads the starting weights again from model.path: the same reference as the
    precomputed one, and after a resume still the starting model (not the trained weights)."""
    model_dir, data, tmp = tiny

    def cfg(out, mode):
        c = base_config(model_dir, data, tmp / out, finetune={"method": "full"}, preference={"reference": mode},
                        train={"max_steps": 4, "save_every": 2, "lr": 1e-3, "batch_size": 2})
        c["objective"] = "dpo"
        return c
    precomputed = train(cfg("copy-pre", "precomputed")).losses
    stopped, resumed = stopped_and_resumed(train, cfg("copy-split", "model"), 3)
    assert stopped.losses + resumed.losses == pytest.approx(precomputed, rel=1e-5)
