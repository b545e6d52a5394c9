"""GRPO: the loss equals TRL's GRPOTrainer for the same log-probs and advantages (values and gradients, each loss
type, with and without the KL term); k3 estimates the exact KL; advantages are group-relative; bad reward functions,
prompts and settings are named; a failing reward function leaves the last checkpoint intact; the mean reward rises."""
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

import velotune as vt
from train_fixtures import FACTS, base_config, make_model_dir, write_jsonl
from velotune.errors import ConfigError, TrainingError
from velotune.training.objectives.grpo import clipped_token_loss, group_advantages
from velotune.bench.baselines import trainer_checkpointing

_ = vt.train
from velotune.training.trainer import train  # noqa: E402

N, T, MAX_LEN = 6, 5, 7
CALLS = {"n": 0}


# Reward functions named in configs below as test_grpo:NAME (pytest puts tests/ on sys.path).
def vowel_share(prompts, completions, **columns):
    """The share of vowels among a completion's characters: a reward a random model can climb. Chat prompts give
    completions as [{"role": "assistant", "content": ...}], as TRL does."""
    from velotune.training.rewards import completion_text
    texts = [completion_text(c) for c in completions]
    return [sum(ch in "aeiou" for ch in t) / max(1, len(t)) for t in texts]


def fails_on_third_call(prompts, completions, **columns):
    CALLS["n"] += 1
    if CALLS["n"] == 3:
        raise ValueError("no score for this one")
    return [0.0] * len(completions)


def too_few(prompts, completions, **columns):
    return [1.0]


def not_a_number(prompts, completions, **columns):
    return [float("nan")] * len(completions)


def trl_grpo_loss(per_token, mask, advantages, ref, loss_type, beta):
    trl_grpo = pytest.importorskip("trl.trainer.grpo_trainer")
    leaf = per_token.clone().requires_grad_(True)
    identity = SimpleNamespace(device=torch.device("cpu"), num_processes=1, gather=lambda t: t,
                               gather_for_metrics=lambda t: t, reduce=lambda t, reduction="sum": t)
    trainer = SimpleNamespace(
        _get_per_token_logps_and_entropies=lambda *a, **k: (leaf, torch.zeros(N, T), None), aux_loss_enabled=False,
        top_entropy_quantile=1.0, off_policy_mask_threshold=None, importance_sampling_level="token", beta=beta,
        args=SimpleNamespace(use_bias_correction_kl=False, delta=None, steps_per_generation=1), loss_type=loss_type,
        epsilon_low=0.2, epsilon_high=0.28, use_vllm=False, model=SimpleNamespace(training=True),
        current_gradient_accumulation_steps=1, max_completion_length=MAX_LEN, accelerator=identity,
        _entropy_bonus_enabled=False, _metrics={"train": defaultdict(list)})
    inputs = {"prompt_ids": torch.zeros(N, 2, dtype=torch.long), "prompt_mask": torch.ones(N, 2, dtype=torch.long),
              "completion_ids": torch.zeros(N, T, dtype=torch.long), "completion_mask": mask,
              "advantages": advantages, "ref_per_token_logps": ref, "num_items_in_batch": mask.sum()}
    try:
        loss = trl_grpo.GRPOTrainer._compute_loss(trainer, None, inputs)
    except AttributeError as exc:  # a stand-in attribute TRL reads after the loss (metrics): the loss is done
        pytest.fail(f"the stand-in trainer lacks {exc}")
    loss.backward()
    return loss.detach(), leaf.grad


@pytest.mark.parametrize("loss_type", ["dapo", "grpo", "dr_grpo"])
@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_loss_equals_trl(loss_type, beta):
    g = torch.Generator().manual_seed(0)
    per_token = -torch.rand(N, T, generator=g, dtype=torch.float64) * 3
    ref = per_token + torch.randn(N, T, generator=g, dtype=torch.float64) * 0.3
    mask = torch.ones(N, T, dtype=torch.long)
    for row, cut in enumerate([5, 3, 4, 1, 5, 2]):
        mask[row, cut:] = 0
    advantages = torch.randn(N, generator=g, dtype=torch.float64)
    want, want_grad = trl_grpo_loss(per_token, mask, advantages, ref, loss_type, beta)
    leaf = per_token.clone().requires_grad_(True)
    loss, kl, _ = clipped_token_loss(leaf, leaf.detach(), advantages, epsilon=0.2, epsilon_high=0.28, beta=beta,
                                     ref_logps=ref)
    loss = loss * mask
    got = {"dapo": loss.sum() / mask.sum(), "grpo": (loss.sum(1) / mask.sum(1)).mean(),
           "dr_grpo": loss.sum() / (N * MAX_LEN)}[loss_type]  # what the loop's normalisation gives for one batch
    got.backward()
    assert torch.allclose(got, want, rtol=1e-12), (got, want)
    assert torch.allclose(leaf.grad, want_grad, rtol=1e-10, atol=1e-14)


def test_clipping_binds_where_the_ratio_leaves_the_trust_region():
    """With an older policy the clip is what limits the update: a positive advantage gains nothing above 1.28."""
    logps = torch.tensor([[0.0, 0.5, -0.5]], requires_grad=True)
    old = torch.zeros(1, 3)
    loss, _, clipped = clipped_token_loss(logps, old, torch.tensor([1.0]), epsilon=0.2, epsilon_high=0.28)
    loss.sum().backward()
    assert clipped.tolist() == [[False, True, False]]
    assert logps.grad[0, 1] == 0 and logps.grad[0, 0] < 0 and logps.grad[0, 2] < 0


def test_k3_estimates_the_exact_kl():
    """E over samples of the policy of k3 = exp(ref - logp) - (ref - logp) - 1 is KL(policy || ref)."""
    g = torch.Generator().manual_seed(0)
    policy = torch.softmax(torch.randn(12, generator=g, dtype=torch.float64), 0)
    ref = torch.softmax(torch.randn(12, generator=g, dtype=torch.float64), 0)
    exact = float((policy * (policy.log() - ref.log())).sum())
    draws = torch.multinomial(policy, 400_000, replacement=True, generator=g)
    _, kl, _ = clipped_token_loss(policy.log()[draws][None], policy.log()[draws][None], torch.zeros(1), epsilon=0.2,
                                  epsilon_high=0.2, beta=1.0, ref_logps=ref.log()[draws][None])
    assert float(kl.mean()) == pytest.approx(exact, rel=0.02)
    assert float(kl.min()) >= 0


def test_advantages_are_relative_to_the_group():
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0, 2.0, 2.0, 2.0, 2.0])
    adv = group_advantages(rewards, 4, "group")
    first = torch.tensor([0.75, -0.25, -0.25, -0.25]) / (torch.tensor([1.0, 0, 0, 0]).std() + 1e-4)
    assert torch.allclose(adv[:4], first) and adv[4:].abs().max() == 0  # a group that agrees teaches nothing
    assert torch.allclose(group_advantages(rewards, 4, "none")[:4], torch.tensor([0.75, -0.25, -0.25, -0.25]))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("grpo")
    rows = [{"prompt": [{"role": "user", "content": q}], "answer": a} for q, a in FACTS]
    return make_model_dir(tmp), write_jsonl(tmp / "prompts.jsonl", rows), tmp


def grpo_config(tiny, out, **grpo):
    model_dir, data, tmp = tiny
    cfg = base_config(model_dir, data, tmp / out, data={"max_seq_length": 96},
                      train={"overwrite": True, "max_steps": 2, "batch_size": 2},
                      grpo={"num_generations": 4, "max_completion_length": 6, **grpo})
    cfg["objective"] = "grpo"
    return cfg


@pytest.mark.parametrize("grpo,message", [
    ({"reward_funcs": ["no_such_module_x:f"]}, "cannot import 'no_such_module_x'"),
    ({"reward_funcs": ["test_grpo:missing"]}, "has no function 'missing'"),
    ({"reward_funcs": ["exactly"]}, "neither a built-in"),
    ({"reward_funcs": ["format", "length"], "reward_weights": [1.0]}, "expected 2 finite number"),
    ({"num_generations": 1}, "grpo.num_generations"),
    ({"max_completion_length": 200}, "leaves no room for a prompt"),
])
def test_bad_settings_are_refused_before_any_weights_load(tiny, grpo, message, monkeypatch):
    from train_fixtures import forbid_weight_loading
    forbid_weight_loading(monkeypatch)
    with pytest.raises(ConfigError, match=message):
        train(grpo_config(tiny, "bad", **grpo))


@pytest.mark.parametrize("name,message", [
    ("too_few", "returned 1 value\\(s\\) for 8 completions"),
    ("not_a_number", "returned nan for a completion of .*prompts.jsonl:"),
])
def test_bad_rewards_are_named(tiny, name, message):
    with pytest.raises(TrainingError, match=message):
        train(grpo_config(tiny, f"bad-{name}", reward_funcs=[f"test_grpo:{name}"]))


def test_a_reward_function_that_raises_stops_the_run_and_keeps_its_checkpoint(tiny):
    CALLS["n"] = 0
    cfg = grpo_config(tiny, "raises", reward_funcs=["test_grpo:fails_on_third_call"])
    cfg["train"].update(max_steps=4, save_every=1, batch_size=1, grad_accum=1)
    with pytest.raises(TrainingError, match=r"'test_grpo:fails_on_third_call' raised ValueError: no score for this "
                                            r"one \(on the completions of .*prompts.jsonl:\d+\)"):
        train(cfg)
    kept = sorted(p.name for p in (tiny[2] / "raises" / "checkpoints").iterdir() if p.name.startswith("step-"))
    assert kept == ["step-000001", "step-000002"]
    resumed = train(cfg, ["train.resume=true", "grpo.reward_funcs=format"])
    assert resumed.steps == 4


def test_long_prompts_are_truncated_from_the_left_or_dropped(tiny):
    from velotune.config import load_config
    from velotune.data.prompts import prepare_prompts
    from velotune.models.tokenizer import load_tokenizer
    model_dir, _, tmp = tiny
    rows = [{"prompt": "short", "answer": "1"}, {"prompt": " ".join(["word"] * 80), "answer": "2"}, {"answer": "3"}]
    data = write_jsonl(tmp / "long.jsonl", rows)
    tok = load_tokenizer(model_dir)
    for overflow, kept, truncated, dropped in (("truncate_left", 2, 1, 0), ("drop", 1, 0, 1)):
        cfg = load_config(base_config(model_dir, data, tmp / "o", grpo={"max_prompt_length": 20,
                                                                         "prompt_overflow": overflow}))
        prepared = prepare_prompts(cfg.data, cfg.grpo, tok, max_seq_length=64)
        stats = prepared.stats
        assert (stats.samples, stats.truncated, stats.dropped_too_long) == (kept, truncated, dropped)
        assert stats.dropped_bad == {"missing field 'prompt'": 1}
        assert max(len(e) for e in prepared.train) <= 20
    long = [e for e in prepare_prompts(load_config(base_config(
        model_dir, data, tmp / "o", grpo={"max_prompt_length": 20})).data, load_config(base_config(
            model_dir, data, tmp / "o", grpo={"max_prompt_length": 20})).grpo, tok, max_seq_length=64).train
        if e.extras["answer"] == "2"][0]
    assert tok.decode(long.prompt_ids).endswith("word")  # the end of the prompt is kept


@pytest.mark.slow
def test_grpo_raises_the_mean_reward(tiny):
    """A reward a random model can climb (the share of vowels in the completion): the mean reward of the last steps
    is well above that of the first. Full fine-tuning: LoRA on a random 127k-parameter model climbs too slowly for
    a test (measured: 0.06 -> 0.10 in 40 steps; full: 0.07 -> 0.30)."""
    cfg = grpo_config(tiny, "learn", reward_funcs=["test_grpo:vowel_share"], num_generations=8,
                      max_completion_length=8)
    cfg["finetune"] = {"method": "full"}
    cfg["train"].update(max_steps=40, lr=3e-3, batch_size=2, log_every=1)
    rewards = []
    train(cfg, callbacks=[lambda e: rewards.append(e.metrics["reward"]) if e.kind == "step" else None])
    first, last = sum(rewards[:5]) / 5, sum(rewards[-5:]) / 5
    print(f"GRPO mean reward, first 5 steps {first:.3f}, last 5 steps {last:.3f}")
    assert last > first + 0.1 and last > 2 * first


def test_an_interrupted_run_resumes_exactly(tiny):
    """Sampling draws from the RNG a checkpoint saves: Ctrl-C after step 2 and train.resume give the same losses
    and rewards as one run."""
    from train_fixtures import stopped_and_resumed

    def cfg(out):
        c = grpo_config(tiny, out, reward_funcs=["format", "length"])
        c["train"].update(max_steps=4, save_every=2)
        return c
    whole = train(cfg("whole")).losses
    stopped, resumed = stopped_and_resumed(train, cfg("split"), 3)
    assert stopped.losses + resumed.losses == whole


@pytest.mark.slow
def test_grpo_reaches_what_trls_grpo_trainer_reaches(tmp_path):
    """The same task (vowel share), model, data, step budget and settings (full fine-tuning, 2 prompts x 8
    completions of 8 tokens a step, lr 3e-3, dapo, beta 0, no clipping of the gradient norm), three seeds each: the
    mean reward of the last 10 of 40 steps, averaged over the seeds, is at least TRL's (measured: velotune 0.221 /
    0.307 / 0.269, TRL 1.16 0.226 / 0.235 / 0.202; a 0.03 margin for sampling noise)."""
    trl = pytest.importorskip("trl")
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    model_dir = make_model_dir(tmp_path)
    rows = [{"prompt": q} for q, _ in FACTS]
    data = write_jsonl(tmp_path / "prompts.jsonl", rows)
    steps, lr = 40, 3e-3
    ours, theirs = [], []
    for seed in (1, 2, 3):
        rewards = []
        cfg = base_config(model_dir, data, tmp_path / f"ours-{seed}", data={"max_seq_length": 96},
                          finetune={"method": "full"},
                          train={"max_steps": steps, "batch_size": 2, "lr": lr, "log_every": 1, "seed": seed},
                          grpo={"num_generations": 8, "max_completion_length": 8,
                                "reward_funcs": ["test_grpo:vowel_share"]})
        cfg["objective"] = "grpo"
        train(cfg, callbacks=[lambda e: rewards.append(e.metrics["reward"]) if e.kind == "step" else None])
        ours.append(sum(rewards[-10:]) / 10)

        logged = []

        class Rewards(TrainerCallback):
            def on_log(self, args, state, control, logs=None, **kwargs):
                if logs and "reward" in logs:
                    logged.append(float(logs["reward"]))
        args = trl.GRPOConfig(output_dir=str(tmp_path / f"trl-{seed}"), per_device_train_batch_size=16,
                              num_generations=8, max_completion_length=8, max_steps=steps, learning_rate=lr,
                              logging_steps=1, report_to=[], save_strategy="no", beta=0.0, loss_type="dapo",
                              temperature=1.0, top_k=0, max_grad_norm=0.0, use_cpu=True, bf16=False,
                              seed=seed, **trainer_checkpointing(False))
        trainer = trl.GRPOTrainer(model=AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32),
                                  args=args, reward_funcs=vowel_share, train_dataset=Dataset.from_list(rows * 20),
                                  processing_class=AutoTokenizer.from_pretrained(model_dir), callbacks=[Rewards()])
        trainer.train()
        theirs.append(sum(logged[-10:]) / 10)
    print(f"GRPO last-10 mean reward: velotune {ours}, TRL {theirs}")
    assert sum(ours) / 3 >= sum(theirs) / 3 - 0.03
    assert min(ours) > 0.15  # every seed learned (the first steps are at ~0.07)


def test_full_fine_tuning_with_a_kl_uses_a_frozen_copy_of_the_start(tiny):
    """beta > 0 without adapters: the reference is the starting model read again from model.path. At step 1 the
    policy is that model (KL exactly 0); after an update it is not."""
    cfg = grpo_config(tiny, "full-kl", reward_funcs=["test_grpo:vowel_share"], beta=0.1)
    cfg["finetune"] = {"method": "full"}
    cfg["train"].update(max_steps=3, lr=3e-3, log_every=1)
    kls = []
    train(cfg, callbacks=[lambda e: kls.append(e.metrics["kl"]) if e.kind == "step" else None])
    assert kls[0] == 0.0 and kls[-1] > 0


def test_a_precomputed_reference_is_refused_for_sampled_completions(tiny, monkeypatch):
    from train_fixtures import forbid_weight_loading
    forbid_weight_loading(monkeypatch)
    cfg = grpo_config(tiny, "pre", beta=0.1)
    cfg["preference"] = {"reference": "precomputed"}
    with pytest.raises(ConfigError, match="grpo samples its completions as it trains"):
        train(cfg)


def test_num_iterations_reuses_each_batch_of_samples_and_the_clip_binds(tiny):
    """mu = 2: every batch of samples serves two optimizer steps in a row (same rewards), the plan counts them, and
    on the second the ratio to the sampling policy is no longer 1, so a large step gets clipped."""
    from velotune.training.plan import plan_run
    cfg = grpo_config(tiny, "mu", reward_funcs=["test_grpo:vowel_share"], num_iterations=2, epsilon=0.01)
    cfg["train"].update(max_steps=None, epochs=1, lr=5e-2, log_every=1, batch_size=2, grad_accum=2)
    plan = plan_run(cfg)
    assert plan.total_steps == 4  # 8 prompts in 4 batches, 2 per step: 2 batches of samples x 2 iterations
    assert "per epoch: 8 prompts" in plan.describe() and "each step samples 4 completions of up to 6" in \
        plan.describe()
    records = []
    train(cfg, callbacks=[lambda e: records.append(e.metrics) if e.kind == "step" else None])
    assert [r["reward"] for r in records[0::2]] == [r["reward"] for r in records[1::2]]
    assert records[0]["clip_ratio"] == 0 and records[1]["clip_ratio"] > 0
    # 8 prompts in batches of 2 make 4 batches: steps of 3 leave a shorter last step, repeated as its own step
    # (3 + 3 + 1 + 1 batches; tests/test_grpo_resume.py checks its units and loss).
    cfg["train"]["grad_accum"] = 3
    assert plan_run(cfg).total_steps == 4


@pytest.mark.parametrize("loss_type", ["dapo", "grpo", "dr_grpo"])
def test_each_loss_type_sums_over_a_split_batch_to_the_whole(loss_type):
    """The loop divides every micro-batch's summed terms by the counts of the whole global batch: the terms of two
    halves add up to those of the whole batch, so a split cannot double (or halve) a normalisation."""
    from types import SimpleNamespace as NS

    from velotune.config import load_config
    from velotune.training.objectives.grpo import GRPO

    class Scorer(torch.nn.Module):  # per-token losses of a fixed table: the "model" a loss call sees
        def __init__(self):
            super().__init__()
            self.table = torch.nn.Parameter(torch.randn(6, 9, generator=torch.Generator().manual_seed(0)))

        def forward(self, input_ids, labels, attention_mask, reduction, return_logits):
            rows = input_ids[:, 0]
            return NS(loss=self.table[rows][:, :labels.shape[1]] ** 2)
    objective = GRPO()
    objective.cfg = load_config({"grpo": {"loss_type": loss_type, "max_completion_length": 8}}).grpo
    objective.rewards = []
    labels = torch.full((6, 9), -100)
    for row, length in enumerate([8, 3, 5, 1, 7, 4]):
        labels[row, 1:1 + length] = 1
    batch = {"input_ids": torch.arange(6)[:, None].expand(6, 9).clone(), "labels": labels,
             "attention_mask": torch.ones(6, 9), "advantages": torch.randn(6, generator=torch.Generator().manual_seed(1)),
             "reward_total": torch.zeros(6), "group_std": torch.zeros(6), "completion_lengths": torch.zeros(6),
             "rewards": torch.zeros(6, 0)}
    model = Scorer()
    whole, _, _ = objective.loss(model, batch)
    halves = [objective.loss(model, {k: v[part] for k, v in batch.items()})[0] for part in (slice(0, 2), slice(2, 6))]
    (unit,) = whole
    assert torch.allclose(halves[0][unit] + halves[1][unit], whole[unit])
    counts = objective.units(batch)
    split = [objective.units({k: v[part] for k, v in batch.items()}) for part in (slice(0, 2), slice(2, 6))]
    assert counts[unit] == split[0][unit] + split[1][unit]
