"""KTO (Ethayarajh et al.): unpaired rows, each a desirable or an undesirable completion, against a reference point.

    loss = desirable_weight * (1 - sigma(beta * (log-ratio - z)))     for a desirable completion
         + undesirable_weight * (1 - sigma(beta * (z - log-ratio)))   for an undesirable one
    log-ratio = log pi(y|x) - log pi_ref(y|x);  z = max(0, mean over the step's rows of the same log-ratio on
    mismatched sequences: each row's prompt with another row's completion), detached.

A batch holds n rows as 2n padded sequences: the rows' own, then their mismatched ones. z is estimated once per
optimizer step over the whole global batch (all micro-batches, all ranks: `begin_step`), so the batch split does
not change it; TRL estimates it per micro-batch. The formula is TRL's (trainer/kto_trainer.py), checked in
tests/test_kto.py.
"""
from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from .base import Objective
from .reference import Reference, attach_precomputed, check_reference_setting, sequence_logprobs

log = logging.getLogger("velotune")

DEFAULT_BETA = 0.1


def kto_loss(logps, ref_logps, desirable, kl, *, beta: float, desirable_weight: float = 1.0,
             undesirable_weight: float = 1.0):
    """Per-row losses [n] and rewards [n] (beta * log-ratio) of rows whose sequence log-probs are `logps`;
    `desirable` [n] bool; `kl` the (detached, non-negative) reference point."""
    ratio = logps - ref_logps
    chosen = desirable_weight * (1 - F.sigmoid(beta * (ratio - kl)))
    rejected = undesirable_weight * (1 - F.sigmoid(beta * (kl - ratio)))
    return torch.where(desirable, chosen, rejected), beta * ratio.detach()


class KTO(Objective):
    name = "kto"
    unit_name = "row"
    sample_name = "row"
    row_name = "row"
    settings = None
    reference = None  # adapter_off, precomputed or a frozen copy (start)
    run = None
    _kl = None     # z of the current step (begin_step)

    # ---- records -> examples -----------------------------------------------------------------------------------
    def prepare(self, config, tokenizer, *, max_seq_length: int, seed: int):
        from ...data.unpaired import prepare_unpaired
        check_reference_setting(config)
        self.settings = config.preference
        data = prepare_unpaired(config.data, tokenizer, max_seq_length=max_seq_length, seed=seed)
        self._check_balance(data.train)
        return data

    def _check_balance(self, examples):
        """The KTO paper's advice: desirable_weight x desirable rows / (undesirable_weight x undesirable rows)
        within [1, 4/3]; outside it, a warning with the weights that would bring it there."""
        good = sum(e.desirable for e in examples)
        bad = len(examples) - good
        s = self.settings
        if not good or not bad:
            return
        balance = s.desirable_weight * good / (s.undesirable_weight * bad)
        if not 1.0 <= balance <= 4 / 3:
            low, high = s.undesirable_weight * bad / good, s.undesirable_weight * bad / good * 4 / 3
            log.warning("kto: %d desirable and %d undesirable rows with weights %g and %g give a balance of %.2f; "
                        "the paper advises 1 to 1.33: set preference.desirable_weight in [%.2f, %.2f]", good, bad,
                        s.desirable_weight, s.undesirable_weight, balance, low, high)

    @property
    def beta(self) -> float:
        return self.settings.beta if self.settings.beta is not None else DEFAULT_BETA

    def sample_view(self, example, tokenizer) -> str:
        from ...data.encode import marked_text
        kind = "desirable" if example.desirable else "undesirable"
        return (f"{kind}:\n{marked_text(example.sequence, tokenizer)}\n"
                f"mismatched (for the reference point):\n{marked_text(example.kl_sequence, tokenizer)}")

    # ---- examples -> batches ------------------------------------------------------------------------------------
    def epoch_rows(self, examples, *, packing: bool, **kwargs) -> list:
        return super().epoch_rows(examples, packing=False, **kwargs)

    def collate(self, rows, *, pad_id: int, packing: bool, max_width: int | None = None) -> dict:
        from ...data import collate
        examples = [row[0] for row in rows]
        batch = collate([[e.sequence] for e in examples] + [[e.kl_sequence] for e in examples], pad_id=pad_id,
                        packing=False, max_width=max_width, bucket=self.bucket_widths)
        batch["rows"] = len(examples)
        batch["desirable"] = torch.tensor([e.desirable for e in examples])
        refs = [e.reference for e in examples]
        if all(r is not None for r in refs):
            batch["reference"] = torch.stack(refs).T.reshape(-1)  # the rows' own sequences, then the mismatched
        return batch

    def input_tokens(self, rows) -> int:
        return sum(len(row[0]) for row in rows)

    # ---- the run ------------------------------------------------------------------------------------------------
    def start(self, model, run):
        self.run = run
        self.reference = Reference(self.settings.reference, model, run)
        if self.reference.mode == "precomputed":
            attach_precomputed(model, run, self.collate)

    @torch.no_grad()
    def begin_step(self, model, batches):
        """z for this step: the mean policy - reference log-ratio of every mismatched sequence of the step's
        micro-batches on all ranks, clamped at 0."""
        total = torch.zeros(2, dtype=torch.float64, device=self.run.device)
        for batch in batches:
            batch = {k: v.to(self.run.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
            half = self._half(batch, second=True)
            with self.run.autocast():
                logps = sequence_logprobs(model, half)[0].double()
                ref = self._reference(model, batch, half, second=True).double()
            total += torch.stack([(logps - ref).sum(), torch.tensor(float(batch["rows"]), dtype=torch.float64,
                                                                     device=total.device)])
        self.run.dist.all_sum_(total)
        self._kl = (total[0] / total[1].clamp(min=1)).clamp(min=0).float()

    # ---- batches -> loss ----------------------------------------------------------------------------------------
    def units(self, batch: dict) -> dict:
        n = batch["rows"]
        desirable = int(batch["desirable"].sum())
        tokens = int((batch["labels"][:n, 1:] != -100).sum())
        return {"row": n, "token": tokens, "desirable": desirable, "undesirable": n - desirable}

    def loss(self, model, batch):
        if self._kl is None:
            raise RuntimeError("kto: begin_step() was not called before loss()")
        half = self._half(batch, second=False)
        logps = sequence_logprobs(model, half)[0]
        ref = self._reference(model, batch, half, second=False)
        desirable = batch["desirable"].to(logps.device)
        losses, rewards = kto_loss(logps, ref.to(logps.dtype), desirable, self._kl.to(logps.device),
                                   beta=self.beta, desirable_weight=self.settings.desirable_weight,
                                   undesirable_weight=self.settings.undesirable_weight)
        metrics = {"kl": self._kl.to(logps.device) * batch["rows"],
                   "rewards/chosen": ((rewards * desirable).sum(), "desirable"),
                   "rewards/rejected": ((rewards * ~desirable).sum(), "undesirable")}
        return {"row": losses.sum()}, self.units(batch), metrics

    # ---- pieces -------------------------------------------------------------------------------------------------
    @staticmethod
    def _half(batch, *, second: bool) -> dict:
        """The rows' own sequences (first half of the batch) or their mismatched ones (second half)."""
        n = batch["rows"]
        part = slice(n, 2 * n) if second else slice(0, n)
        return {k: batch[k][part] for k in ("input_ids", "labels", "attention_mask")}

    def _reference(self, model, batch, half, *, second: bool):
        n = batch["rows"]
        given = None
        if "reference" in batch:
            values = batch["reference"]
            given = (values[n:] if second else values[:n]).to(half["input_ids"].device)
        return self.reference.sequence_logps(model, half, given)
