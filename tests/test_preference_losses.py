"""The preference losses equal TRL's (pinned in the test extra) for the same log-probabilities: values and gradients.

TRL's DPO formula lives inside `DPOTrainer._compute_loss`, so it runs there, on a stand-in trainer and a stand-in
model whose "forward" returns the per-token log-probs we give it; ORPO's and SimPO's (CPO's) are methods of their
trainers and run the same way. Both sides get the same leaf tensors; their gradients are compared too.
"""
import math
from types import SimpleNamespace

import pytest
import torch

from velotune.training.objectives.preference_losses import dpo_loss, log1mexp, orpo_odds_ratio, simpo_loss

trl_dpo = pytest.importorskip("trl.trainer.dpo_trainer")

B, T = 4, 6
TOL = 1e-6  # fp64 on both sides: the only differences are summation order


def per_token_inputs(seed=0):
    """Per-token log-probs of 2B rows (chosen, then rejected) with ragged completion masks, and reference sums."""
    g = torch.Generator().manual_seed(seed)
    logps = -torch.rand(2 * B, T, generator=g, dtype=torch.float64) * 2
    mask = torch.ones(2 * B, T + 1, dtype=torch.long)
    mask[:, :2] = 0                          # the prompt
    for row, cut in enumerate([T + 1, T, T - 1, T - 2, T + 1, T - 3, T, T - 1]):
        mask[row, cut:] = 0                  # ragged completions
    logps = logps * mask[:, 1:]
    ref = -torch.rand(2 * B, generator=g, dtype=torch.float64) * 8
    return logps, mask, ref


def trl_dpo_loss(per_token, mask, ref, loss_type, beta, label_smoothing):
    """TRL's DPO loss for these log-probs, through DPOTrainer._compute_loss."""
    leaf = per_token.clone().requires_grad_(True)

    def model(**kwargs):
        n = 2 * B
        return SimpleNamespace(log_probs=leaf, entropy=torch.zeros(n, T), mean_logits=torch.zeros(n, T),
                               is_top1=torch.zeros(n, T, dtype=torch.bool))

    identity = SimpleNamespace(device=torch.device("cpu"), gather_for_metrics=lambda t: t, gather=lambda t: t)
    from collections import defaultdict
    trainer = SimpleNamespace(model=SimpleNamespace(training=True), accelerator=identity, ld_alpha=None,
                              precompute_ref_logps=True, f_divergence_type="reverse_kl", loss_types=[loss_type],
                              loss_weights=[1.0], beta=beta, label_smoothing=label_smoothing,
                              aux_loss_enabled=False, use_weighting=False, _metrics={"train": defaultdict(list)},
                              _total_train_tokens=0, _tp_size=1, args=SimpleNamespace())
    inputs = {"input_ids": torch.zeros(2 * B, T + 1, dtype=torch.long), "attention_mask": mask.clone(),
              "completion_mask": mask, "ref_chosen_logps": ref[:B], "ref_rejected_logps": ref[B:]}
    loss = trl_dpo.DPOTrainer._compute_loss(trainer, model, inputs, return_outputs=False)
    loss.backward()
    return loss.detach(), leaf.grad


@pytest.mark.parametrize("loss_type,label_smoothing", [("sigmoid", 0.0), ("hinge", 0.0), ("ipo", 0.0),
                                                       ("robust", 0.2)])
def test_dpo_losses_equal_trl(loss_type, label_smoothing):
    per_token, mask, ref = per_token_inputs()
    beta = 0.3
    want, want_grad = trl_dpo_loss(per_token, mask, ref, loss_type, beta, label_smoothing)
    leaf = per_token.clone().requires_grad_(True)
    sums, counts = leaf.sum(1), mask[:, 1:].sum(1)
    losses, chosen_r, rejected_r = dpo_loss(sums[:B], sums[B:], ref[:B], ref[B:], beta=beta, loss_type=loss_type,
                                            label_smoothing=label_smoothing, chosen_tokens=counts[:B],
                                            rejected_tokens=counts[B:])
    got = losses.mean()  # the loop: the sum over pairs / the pairs of the batch
    got.backward()
    assert torch.allclose(got, want, rtol=TOL, atol=0), (got, want)
    assert torch.allclose(leaf.grad, want_grad, rtol=TOL, atol=1e-12)
    assert torch.allclose(chosen_r, beta * (sums[:B] - ref[:B]).detach())


def test_orpo_odds_ratio_equals_trl():
    from trl.experimental.orpo.orpo_trainer import ORPOTrainer
    g = torch.Generator().manual_seed(1)  # fp32: TRL casts ORPO's log-probs to fp32 itself
    chosen = (-torch.rand(B, generator=g) * 3).requires_grad_(True)
    rejected = (-torch.rand(B, generator=g) * 3).requires_grad_(True)
    fake = SimpleNamespace(beta=0.25, accelerator=SimpleNamespace(device=torch.device("cpu")))
    trl_losses, trl_c, trl_r, _, trl_log_odds = ORPOTrainer.odds_ratio_loss(fake, chosen, rejected)
    (-trl_losses.mean()).backward()  # TRL: loss = nll - losses.mean()
    want_grads = chosen.grad.clone(), rejected.grad.clone()
    chosen.grad = rejected.grad = None
    losses, log_odds, c, r = orpo_odds_ratio(chosen, rejected, beta=0.25)
    losses.mean().backward()
    assert torch.allclose(losses, -trl_losses, rtol=TOL)
    assert torch.allclose(log_odds.mean(), trl_log_odds, rtol=TOL)
    assert torch.allclose(chosen.grad, want_grads[0], rtol=TOL) and torch.allclose(rejected.grad, want_grads[1],
                                                                                      rtol=TOL)
    assert torch.allclose(c, trl_c) and torch.allclose(r, trl_r)


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_simpo_equals_trl_cpo(label_smoothing):
    from trl.experimental.cpo.cpo_trainer import CPOTrainer
    g = torch.Generator().manual_seed(2)
    chosen = (-torch.rand(B, generator=g, dtype=torch.float64) * 3).requires_grad_(True)
    rejected = (-torch.rand(B, generator=g, dtype=torch.float64) * 3).requires_grad_(True)
    fake = SimpleNamespace(beta=2.0, simpo_gamma=0.5, loss_type="simpo", label_smoothing=label_smoothing, alpha=0.0,
                           accelerator=SimpleNamespace(device=torch.device("cpu")))
    trl_losses, trl_c, trl_r = CPOTrainer.cpo_loss(fake, chosen, rejected)
    trl_losses.mean().backward()
    want_grads = chosen.grad.clone(), rejected.grad.clone()
    chosen.grad = rejected.grad = None
    losses, c, r = simpo_loss(chosen, rejected, beta=2.0, gamma=0.5, label_smoothing=label_smoothing)
    losses.mean().backward()
    assert torch.allclose(losses, trl_losses, rtol=TOL)
    assert torch.allclose(chosen.grad, want_grads[0], rtol=TOL) and torch.allclose(rejected.grad, want_grads[1],
                                                                                      rtol=TOL)
    assert torch.allclose(c, trl_c) and torch.allclose(r, trl_r)


def test_log1mexp_is_accurate_on_both_sides():
    x = torch.tensor([-1e-8, -0.1, -math.log(2), -1.0, -30.0], dtype=torch.float64)
    want = torch.tensor([math.log(-math.expm1(v)) for v in x.tolist()], dtype=torch.float64)
    assert torch.allclose(log1mexp(x), want, rtol=1e-12)


def test_an_unknown_loss_type_is_refused():
    one = torch.zeros(1)
    with pytest.raises(ValueError, match="preference.loss_type"):
        dpo_loss(one, one, one, one, beta=0.1, loss_type="nope")
