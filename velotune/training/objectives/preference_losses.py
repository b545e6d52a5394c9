"""The per-pair losses of preference training, from sequence log-probabilities (sums over each completion's tokens).

Each returns the loss of every pair [B] (the objective sums them; the loop divides by the pairs of the whole global
batch) and the per-pair "rewards" of the method, for logging. The formulas are TRL's (trainer/dpo_trainer.py,
experimental/orpo, experimental/cpo for SimPO), checked against them in tests/test_preference_losses.py.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

DPO_LOSS_TYPES = ("sigmoid", "ipo", "hinge", "robust")


def dpo_loss(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, *, beta: float,
             loss_type: str = "sigmoid", label_smoothing: float = 0.0, chosen_tokens=None, rejected_tokens=None):
    """DPO and its variants. The implicit reward of a completion is beta * (log pi(y|x) - log pi_ref(y|x)).

    sigmoid  -log sigma(beta * delta), delta = the chosen log-ratio minus the rejected one (Rafailov et al.)
    hinge    max(0, 1 - beta * delta) (SLiC)
    ipo      (delta per token - 1 / (2 beta))^2, each log-ratio divided by its completion's tokens (Azar et al.,
             as TRL normalises it)
    robust   the sigmoid loss unbiased for a share `label_smoothing` of flipped labels (Chowdhury et al.)
    Returns (loss [B], chosen rewards [B], rejected rewards [B])."""
    chosen_ratio = chosen_logps - ref_chosen_logps
    rejected_ratio = rejected_logps - ref_rejected_logps
    delta = chosen_ratio - rejected_ratio
    if loss_type == "sigmoid":
        loss = -F.logsigmoid(beta * delta)
    elif loss_type == "hinge":
        loss = torch.relu(1 - beta * delta)
    elif loss_type == "ipo":
        if chosen_tokens is None or rejected_tokens is None:
            raise ValueError("the ipo loss needs the completions' token counts")
        per_token = chosen_ratio / chosen_tokens.clamp(min=1) - rejected_ratio / rejected_tokens.clamp(min=1)
        loss = (per_token - 1 / (2 * beta)) ** 2
    elif loss_type == "robust":
        eps = label_smoothing
        loss = (-(1 - eps) * F.logsigmoid(beta * delta) + eps * F.logsigmoid(-beta * delta)) / (1 - 2 * eps)
    else:
        raise ValueError(f"preference.loss_type: {loss_type!r}; expected one of {', '.join(DPO_LOSS_TYPES)}")
    return loss, beta * chosen_ratio.detach(), beta * rejected_ratio.detach()


def log1mexp(x):
    """log(1 - exp(x)) for x < 0, accurate on both sides of -log 2."""
    return torch.where(x < -math.log(2), torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def orpo_odds_ratio(chosen_mean_logps, rejected_mean_logps, *, beta: float):
    """ORPO's odds-ratio term (Hong et al.), on per-token mean log-probs: -beta * log sigma(log odds(chosen) -
    log odds(rejected)), odds(y) = p / (1 - p). The NLL of the chosen completion is added by the objective.
    Returns (loss [B], log odds ratio [B], chosen rewards [B], rejected rewards [B])."""
    chosen, rejected = chosen_mean_logps, rejected_mean_logps
    log_odds = (chosen - rejected) - (log1mexp(chosen) - log1mexp(rejected))
    loss = -beta * F.logsigmoid(log_odds)
    return loss, log_odds.detach(), beta * chosen.detach(), beta * rejected.detach()


def simpo_loss(chosen_mean_logps, rejected_mean_logps, *, beta: float, gamma: float, label_smoothing: float = 0.0):
    """SimPO (Meng et al.): reference-free, length-normalised rewards beta * mean log-prob, and a target margin
    gamma: -log sigma(beta * (chosen - rejected) - gamma), smoothed as TRL's CPO trainer does.
    Returns (loss [B], chosen rewards [B], rejected rewards [B])."""
    logits = (chosen_mean_logps - rejected_mean_logps) - gamma / beta
    eps = label_smoothing
    loss = -(1 - eps) * F.logsigmoid(beta * logits) - eps * F.logsigmoid(-beta * logits)
    return loss, beta * chosen_mean_logps.detach(), beta * rejected_mean_logps.detach()
