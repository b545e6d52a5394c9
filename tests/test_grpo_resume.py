"""GRPO with num_iterations (mu) > 1: a batch of samples serves mu optimizer steps in a row.

A run stopped between those steps resumes on the batch it kept (saved in the checkpoint as JSON + safetensors):
the same losses, rewards and final adapter as one run, and the sampling RNG goes on as in one run. An epoch whose
last step holds fewer than grad_accum batches repeats that short step mu times, each its own optimizer step, with
the units and loss the formula gives.
"""
import json

import pytest
import torch

from train_fixtures import FACTS, base_config, interrupt_at_step, make_model_dir, write_jsonl
from velotune.errors import CheckpointError
from velotune.training.objectives.base import step_sizes
from velotune.training.objectives.grpo import GRPO
from velotune.training.objectives.reference import token_logprobs
from velotune.training.trainer import train

G, MAX_NEW = 4, 6


def vowel_share(prompts, completions, **columns):
    """A reward that varies between completions (so advantages are not all zero): the share of vowels."""
    from velotune.training.rewards import completion_text
    texts = [completion_text(c) for c in completions]
    return [sum(ch in "aeiou" for ch in t) / max(1, len(t)) for t in texts]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("grpo-resume")
    rows = [{"prompt": [{"role": "user", "content": q}], "answer": a} for q, a in FACTS]
    return make_model_dir(tmp), write_jsonl(tmp / "prompts.jsonl", rows), tmp


def mu_config(tiny, out, **train_extra):
    """8 prompts in 4 batches of 2, steps of 3 batches, mu = 2: steps of 3, 3 (the same samples), then the short
    last step of 1 batch, twice: 4 optimizer steps."""
    model_dir, data, tmp = tiny
    cfg = base_config(model_dir, data, tmp / out, data={"max_seq_length": 96},
                      train={"overwrite": True, "max_steps": None, "epochs": 1, "batch_size": 2, "grad_accum": 3,
                             "lr": 5e-2, "log_every": 1, "save_every": 1, "keep_last": 10, **train_extra},
                      grpo={"num_generations": G, "max_completion_length": MAX_NEW, "num_iterations": 2,
                            "reward_funcs": ["test_grpo_resume:vowel_share"]})
    cfg["objective"] = "grpo"
    return cfg


class Counting(GRPO):
    """GRPO that counts its rollouts (each samples one micro-batch) and records what each loss call saw."""

    def __init__(self):
        super().__init__()
        self.rollouts, self.seen = 0, []

    def _rollout(self, model, batch):
        self.rollouts += 1
        super()._rollout(model, batch)

    def loss(self, model, batch):
        with torch.no_grad():
            logps = token_logprobs(model, batch).detach().clone()
        self.seen.append({"logps": logps, **{k: v.detach().clone() for k, v in batch.items()
                                              if isinstance(v, torch.Tensor)}})
        return super().loss(model, batch)


def run(cfg, overrides=(), stop_in=None):
    """(result, per-step records, objective) of one run; `stop_in`: a Ctrl-C in that optimizer step."""
    objective, records = Counting(), []
    handle = interrupt_at_step(stop_in) if stop_in else None
    try:
        result = train(cfg, list(overrides), objective=objective,
                       callbacks=[lambda e: records.append(e.metrics) if e.kind == "step" else None])
    finally:
        if handle:
            handle.remove()
    return result, records, objective


def adapter_tensors(result) -> dict:
    from safetensors.torch import load_file
    (file,) = result.adapter_dir.glob("*.safetensors")
    return load_file(str(file))


def test_step_closes_keep_each_repetition_of_a_short_step_its_own_step():
    objective = GRPO()
    objective.cfg = type("C", (), {"num_iterations": 2})()
    assert objective.step_closes(8, 3) == {7, 8}                       # 4 batches in steps of 3, twice each
    assert step_sizes(8, 3, {7, 8}) == [3, 3, 1, 1]
    assert step_sizes(8, 3) == [3, 3, 2]                                 # what grad_accum alone would make
    assert step_sizes(8, 3, {7, 8}, start=6) == [1, 1] and step_sizes(8, 3, {7, 8}, start=7) == [1]
    assert objective.step_closes(8, 2) == set()                         # 4 batches in whole steps of 2
    objective.cfg.num_iterations = 3                                     # 5 batches, steps of 2, thrice each
    assert step_sizes(15, 2, objective.step_closes(15, 2)) == [2] * 6 + [1] * 3


def test_a_short_last_step_is_its_own_step_mu_times_with_the_formulas_loss(tiny):
    """4 steps (3, 3, 1, 1 batches), units per step as sampled, the samples of steps 1-2 and 3-4 shared, and each
    step's loss equal to the clipped policy-gradient formula (dapo: the step's token sum / its tokens)."""
    from velotune.training.plan import plan_run
    cfg = mu_config(tiny, "short")
    assert plan_run(cfg).total_steps == 4
    result, records, objective = run(cfg)
    assert result.steps == 4 and objective.rollouts == 4  # 3 batches sampled for steps 1-2, 1 for steps 3-4
    assert [r["completion"] for r in records] == [3 * 2 * G, 3 * 2 * G, 2 * G, 2 * G]
    assert [r["budget"] for r in records] == [3 * 2 * G * MAX_NEW] * 2 + [2 * G * MAX_NEW] * 2
    assert records[0]["reward"] == records[1]["reward"] and records[2]["reward"] == records[3]["reward"]
    per_step = [objective.seen[0:3], objective.seen[3:6], objective.seen[6:7], objective.seen[7:8]]
    assert torch.equal(per_step[2][0]["input_ids"], per_step[3][0]["input_ids"])
    worst = 0.0
    for step, (batches, record, loss) in enumerate(zip(per_step, records, result.losses)):
        total, scale, tokens = 0.0, 0.0, 0
        for b in batches:
            mask = torch.nn.functional.pad(b["labels"][:, 1:] != -100, (0, 1)).double()
            ratio = torch.exp(b["logps"].double() - b["old_logps"].double())
            adv = b["advantages"].double()[:, None]
            per_token = -torch.minimum(ratio * adv, ratio.clamp(0.8, 1.2) * adv)
            total += float((per_token * mask).sum())
            scale += float((per_token * mask).abs().sum())  # the terms cancel (advantages sum to 0 per group)
            tokens += int(mask.sum())
        assert tokens == record["tokens"]
        print(f"step {step + 1}: loss {loss:.8f}, formula {total / tokens:.8f}, mean |term| {scale / tokens:.4f}")
        worst = max(worst, abs(loss - total / tokens) / (scale / tokens))
    print(f"short last step: max loss difference to the formula, relative to the mean |term|: {worst:.2e}")
    assert worst < 1e-5


@pytest.mark.parametrize("stop_in", [2, 4])
def test_a_run_stopped_between_iterations_resumes_on_its_kept_samples(tiny, stop_in):
    """Ctrl-C in step 2 (checkpoint at step 1, its samples still owed a step) or in step 4 (at step 3, inside the
    repeated short step): the resumed run samples nothing for the owed step, and losses, rewards (sampled after the
    resume, so the RNG went on as in one run) and the final adapter equal one uninterrupted run exactly."""
    whole, whole_records, whole_obj = run(mu_config(tiny, "whole"))
    cfg = mu_config(tiny, f"split-{stop_in}")
    stopped, first_records, _ = run(cfg, stop_in=stop_in)
    assert stopped.interrupted and stopped.steps == stop_in - 1
    kept = stopped.checkpoint / "objective.json"
    assert kept.is_file() and (stopped.checkpoint / "objective.safetensors").is_file()
    assert "pickle" not in kept.read_text() and json.loads(kept.read_text())["format"] == "velotune-state-1"
    resumed, resumed_records, resumed_obj = run(cfg, ["train.resume=true"])
    assert resumed.steps == 4
    assert resumed_obj.rollouts == (1 if stop_in == 2 else 0)  # only step 3's new batch is sampled
    assert stopped.losses + resumed.losses == whole.losses
    rewards = [r["reward"] for r in first_records + resumed_records]
    assert rewards == [r["reward"] for r in whole_records]
    got, want = adapter_tensors(resumed), adapter_tensors(whole)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    # The uninterrupted run's own checkpoints: state kept after steps 1 and 3 (a step still owed), none after 2 / 4.
    steps = {p.name: (p / "objective.json").is_file() for p in (whole.output_dir / "checkpoints").iterdir()}
    assert steps == {"step-000001": True, "step-000002": False, "step-000003": True, "step-000004": False}


def test_without_the_kept_samples_the_resume_would_differ(tiny):
    """The control: the same stop with objective.json removed samples step 2's batch again (as before this was
    kept), and the losses leave the uninterrupted run's: the test above would see a lost state."""
    whole, _, _ = run(mu_config(tiny, "control-whole"))
    cfg = mu_config(tiny, "control")
    stopped, _, _ = run(cfg, stop_in=2)
    (stopped.checkpoint / "objective.json").unlink()
    resumed, _, objective = run(cfg, ["train.resume=true"])
    assert objective.rollouts == 4 and stopped.losses + resumed.losses != whole.losses


def test_a_tampered_kept_state_is_a_clear_error(tiny):
    cfg = mu_config(tiny, "tampered")
    stopped, _, _ = run(cfg, stop_in=2)
    path = stopped.checkpoint / "objective.json"
    doc = json.loads(path.read_text())
    entry = doc["state"]["dict"]["per_rank"][0]["dict"]["kept"][0]["dict"]
    entry["left"] = 5
    path.write_text(json.dumps(doc))
    with pytest.raises(CheckpointError, match=r"objective.json: kept.0.left: 5 steps left, but "
                                              r"grpo.num_iterations=2 leaves 1 to 1"):
        run(cfg, ["train.resume=true"])
    entry["left"], entry["rows"] = 1, [0]  # one prompt, but the tensors hold the completions of 2
    path.write_text(json.dumps(doc))
    with pytest.raises(CheckpointError, match=r"kept.0.tensors.\w+: expected a tensor of 1 prompts x 4 completions"):
        run(cfg, ["train.resume=true"])
