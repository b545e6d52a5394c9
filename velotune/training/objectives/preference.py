"""Preference objectives on paired data: DPO (with the ipo, hinge and robust losses), ORPO and SimPO.

A batch holds `batch_size` pairs as 2 x batch_size padded rows: the chosen completions, then the rejected ones. Both
sides' sequence log-probs come from one forward (chunked cross-entropy per token, never the logits). The loss is a
sum over pairs, normalised by the pairs of the whole global batch (ORPO's NLL term by the global batch's chosen
tokens), so the batch split and gradient accumulation do not change an update.
"""
from __future__ import annotations

import torch

from .base import Objective
from .preference_losses import dpo_loss, orpo_odds_ratio, simpo_loss
from .reference import Reference, attach_precomputed, check_reference_setting, sequence_logprobs

DEFAULT_BETA = {"dpo": 0.1, "orpo": 0.1, "simpo": 2.0}


class Preference(Objective):
    """What the preference objectives share: pairs in, per-pair losses out."""

    unit_name = "pair"
    sample_name = "pair"
    row_name = "pair"     # train.batch_size counts pairs (each is two rows of the forward)
    settings = None   # the config's `preference` section, set by prepare

    # ---- records -> examples -----------------------------------------------------------------------------------
    def prepare(self, config, tokenizer, *, max_seq_length: int, seed: int):
        from ...data.preference import prepare_pairs
        self.settings = config.preference
        return prepare_pairs(config.data, tokenizer, max_seq_length=max_seq_length, seed=seed)

    @property
    def beta(self) -> float:
        beta = self.settings.beta if self.settings is not None else None
        return beta if beta is not None else DEFAULT_BETA[self.name]

    def sample_view(self, example, tokenizer) -> str:
        from ...data.encode import marked_text
        return (f"chosen:\n{marked_text(example.chosen, tokenizer)}\n"
                f"rejected:\n{marked_text(example.rejected, tokenizer)}")

    # ---- examples -> batches ------------------------------------------------------------------------------------
    def epoch_rows(self, examples, *, packing: bool, **kwargs) -> list:
        # A pair is two rows of its own: nothing is packed.
        return super().epoch_rows(examples, packing=False, **kwargs)

    def collate(self, rows, *, pad_id: int, packing: bool, max_width: int | None = None) -> dict:
        from ...data import collate
        pairs = [row[0] for row in rows]
        batch = collate([[p.chosen] for p in pairs] + [[p.rejected] for p in pairs], pad_id=pad_id, packing=False,
                        max_width=max_width, bucket=self.bucket_widths)
        batch["pairs"] = len(pairs)
        refs = [p.reference for p in pairs]
        if all(r is not None for r in refs):
            batch["reference"] = torch.stack(refs).T.reshape(-1)  # chosen of every pair, then rejected
        return batch

    def input_tokens(self, rows) -> int:
        return sum(len(row[0]) for row in rows)

    # ---- batches -> loss ----------------------------------------------------------------------------------------
    def units(self, batch: dict) -> dict:
        from ...data import count_target_tokens
        return {"pair": batch["pairs"], "token": count_target_tokens(batch)}

    def policy(self, model, batch: dict):
        """(chosen, rejected) sums of the completions' log-probs, and (chosen, rejected) token counts."""
        logps, counts = sequence_logprobs(model, batch)
        n = batch["pairs"]
        return (logps[:n], logps[n:]), (counts[:n], counts[n:])

    @staticmethod
    def reward_metrics(chosen_rewards, rejected_rewards) -> dict:
        """Sums over the batch's pairs (the loop logs their mean per pair), named as TRL names them."""
        margin = chosen_rewards - rejected_rewards
        return {"rewards/chosen": chosen_rewards.sum(), "rewards/rejected": rejected_rewards.sum(),
                "rewards/margins": margin.sum(), "rewards/accuracies": (margin > 0).float().sum()}


class DPO(Preference):
    """Direct preference optimisation against a frozen reference (preference.reference)."""

    name = "dpo"
    reference = None  # resolved by start(): adapter_off, precomputed or a frozen copy

    def prepare(self, config, tokenizer, *, max_seq_length: int, seed: int):
        check_reference_setting(config)
        return super().prepare(config, tokenizer, max_seq_length=max_seq_length, seed=seed)

    def start(self, model, run):
        self.reference = Reference(self.settings.reference, model, run)
        if self.reference.mode == "precomputed":
            attach_precomputed(model, run, self.collate)

    def loss(self, model, batch):
        (chosen, rejected), (chosen_n, rejected_n) = self.policy(model, batch)
        n = batch["pairs"]
        given = batch["reference"].to(chosen.device) if "reference" in batch else None
        reference = self.reference.sequence_logps(model, batch, given)
        s = self.settings
        losses, chosen_rewards, rejected_rewards = dpo_loss(
            chosen, rejected, reference[:n], reference[n:], beta=self.beta, loss_type=s.loss_type,
            label_smoothing=s.label_smoothing, chosen_tokens=chosen_n, rejected_tokens=rejected_n)
        return {"pair": losses.sum()}, self.units(batch), self.reward_metrics(chosen_rewards, rejected_rewards)


class ORPO(Preference):
    """Odds-ratio preference optimisation: SFT on the chosen completion plus an odds-ratio term; no reference."""

    name = "orpo"

    def units(self, batch: dict) -> dict:
        n = batch["pairs"]
        chosen_tokens = int((batch["labels"][:n, 1:] != -100).sum())
        return {**super().units(batch), "chosen_token": chosen_tokens}

    def loss(self, model, batch):
        (chosen, rejected), (chosen_n, rejected_n) = self.policy(model, batch)
        odds_loss, log_odds, chosen_rewards, rejected_rewards = orpo_odds_ratio(
            chosen / chosen_n.clamp(min=1), rejected / rejected_n.clamp(min=1), beta=self.beta)
        nll = -chosen.sum()
        metrics = {**self.reward_metrics(chosen_rewards, rejected_rewards), "log_odds_ratio": log_odds.sum()}
        return {"pair": odds_loss.sum(), "chosen_token": nll}, self.units(batch), metrics


class SimPO(Preference):
    """Simple preference optimisation: length-normalised rewards with a target margin; no reference."""

    name = "simpo"

    def loss(self, model, batch):
        (chosen, rejected), (chosen_n, rejected_n) = self.policy(model, batch)
        s = self.settings
        losses, chosen_rewards, rejected_rewards = simpo_loss(
            chosen / chosen_n.clamp(min=1), rejected / rejected_n.clamp(min=1), beta=self.beta, gamma=s.gamma,
            label_smoothing=s.label_smoothing)
        return {"pair": losses.sum()}, self.units(batch), self.reward_metrics(chosen_rewards, rejected_rewards)
