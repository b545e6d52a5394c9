"""GRPO: for each prompt, `num_generations` completions sampled from the model being trained (our KV-cache
generation, adapters live), scored by reward functions; each completion's advantage is its reward against its
group's; the policy-gradient loss with a clipped ratio, and optionally a KL to the reference (k3 estimator).

    per token:  -min(r * A, clip(r, 1 - epsilon, 1 + epsilon_high) * A) + beta * k3,   r = pi / pi_old
    k3 = exp(ref - logp) - (ref - logp) - 1          (an unbiased, non-negative estimate of KL(pi || ref))
    dapo: sum over the global batch's completion tokens / those tokens; grpo: each completion's token mean,
    then the mean over completions; dr_grpo: the sum / (completions x max_completion_length)

With `num_iterations` = 1 (the default) pi_old is the policy being trained, so r = 1 in value and the clip never
binds: the gradient is A * grad log pi. With mu > 1 each batch of samples (the grad_accum micro-batches of a step)
serves mu optimizer steps in a row, pi_old's log-probs taken when they were sampled, as TRL's num_iterations does
(an epoch's shorter last step too: it stays its own step, mu times). What is kept for the steps still to come goes
into each checkpoint (state_dict), so a run stopped between those steps resumes on the same samples. The formulas are
TRL's (trainer/grpo_trainer.py), checked in tests/test_grpo.py. Log-probs come from the fused chunked cross-entropy
per token: no [completions, length, vocab] logits.
"""
from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from ...errors import CheckpointError, ConfigError
from ..distributed import unwrap
from ..rewards import resolve_rewards, score
from .base import Objective
from .reference import Reference, check_reference_setting, token_logprobs

log = logging.getLogger("velotune")
ADVANTAGE_EPS = 1e-4  # added to a std before dividing by it (TRL's value)
# What a kept batch of samples must hold to serve its next steps ("ref_logps" too when beta > 0).
KEPT_TENSORS = ("input_ids", "labels", "attention_mask", "reward_total", "rewards", "advantages", "group_std",
                "completion_lengths", "old_logps")


def clipped_token_loss(logps, old_logps, advantages, *, epsilon: float, epsilon_high: float, beta: float = 0.0,
                       ref_logps=None):
    """Per-token loss [n, T] (to be masked by the caller), the per-token k3 KL (or None) and the clipped mask."""
    ratio = torch.exp(logps - old_logps)
    a = advantages[:, None]
    unclipped, clipped = ratio * a, torch.clamp(ratio, 1 - epsilon, 1 + epsilon_high) * a
    loss = -torch.min(unclipped, clipped)
    kl = None
    if beta:
        delta = ref_logps - logps
        kl = torch.exp(delta) - delta - 1
        loss = loss + beta * kl
    was_clipped = (ratio < 1 - epsilon) & (a < 0) | (ratio > 1 + epsilon_high) & (a > 0)
    return loss, kl, was_clipped


def _train_key(key: tuple) -> bool:
    """A kept batch of the train split (prompt indices), not of evaluation."""
    return all(type(i) is int for i in key)


def group_advantages(rewards, group: int, scale: str, batch_std=None):
    """Each reward minus its group's mean, divided by the group's std ("group"), a given std ("batch") or 1."""
    grouped = rewards.view(-1, group)
    centred = (grouped - grouped.mean(dim=1, keepdim=True)).view(-1)
    if scale == "group":
        return centred / (grouped.std(dim=1).repeat_interleave(group) + ADVANTAGE_EPS)
    if scale == "batch":
        return centred / (batch_std + ADVANTAGE_EPS)
    return centred


class GRPO(Objective):
    name = "grpo"
    unit_name = "completion"
    sample_name = "prompt"
    row_name = "prompt"
    cfg = rewards = tokenizer = run = reference = None
    accum = 1

    def __init__(self):
        super().__init__()
        # The examples of a batch of samples (their indices in the train split) -> (its tensors, optimizer steps it
        # still serves). Indices, not the examples themselves, so that a resumed run finds its kept batches.
        self._reused = {}
        self._index = {}    # id of a train example -> its index in the train split (set in start)

    # ---- records -> examples -----------------------------------------------------------------------------------
    def prepare(self, config, tokenizer, *, max_seq_length: int, seed: int):
        from ...data.prompts import prepare_prompts
        self.cfg, self.tokenizer, self.accum = config.grpo, tokenizer, config.train.grad_accum
        if config.train.distributed == "fsdp2":
            raise ConfigError("objective grpo with train.distributed=fsdp2: sharded generation is not supported yet "
                              "(every rank would have to decode in step); use ddp")
        self.rewards = resolve_rewards(config.grpo)  # a missing function fails here, before any weights load
        if config.grpo.beta:
            check_reference_setting(config, fixed_data=False)
        return prepare_prompts(config.data, config.grpo, tokenizer, max_seq_length=max_seq_length, seed=seed)

    def epoch_line(self, stats) -> str:
        cfg = self.cfg
        return (f"per epoch: {stats.samples} prompts, {stats.total_tokens:,} prompt tokens; each step samples "
                f"{cfg.num_generations} completions of up to {cfg.max_completion_length} tokens per prompt and trains "
                "on them")

    def sample_view(self, example, tokenizer) -> str:
        return ("prompt (completions are sampled; each is trained, the prompt is not):\n"
                + tokenizer.decode(example.prompt_ids, skip_special_tokens=False))

    # ---- examples -> batches ------------------------------------------------------------------------------------
    def epoch_rows(self, examples, *, packing: bool, **kwargs) -> list:
        rows = super().epoch_rows(examples, packing=False, **kwargs)
        mu = self.cfg.num_iterations
        if mu == 1:
            return rows
        # Each step's micro-batches again, mu times in a row: the same samples serve mu optimizer steps. A shorter
        # last step is repeated too; step_closes keeps each repetition its own step.
        return [batch for i in range(0, len(rows), self.accum) for _ in range(mu) for batch in rows[i:i + self.accum]]

    def step_closes(self, batches: int, accum: int) -> set[int]:
        """The ends of the mu repetitions of a shorter last step (epoch_rows): grouped by grad_accum alone, a
        repetition would be merged with the next one into one step (the same samples counted twice)."""
        mu = self.cfg.num_iterations
        short = batches // mu % accum  # the batches of the epoch's last step, before repetition (0: a full one)
        if mu == 1 or not short:
            return set()
        first = batches - short * mu   # the batches read before the first repetition of the short step
        return {first + short * k for k in range(1, mu + 1)}

    def collate(self, rows, *, pad_id: int, packing: bool, max_width: int | None = None) -> dict:
        return {"examples": [row[0] for row in rows], "rows": len(rows)}

    def input_tokens(self, rows) -> int:  # known before sampling: the prompts, once per completion
        return sum(len(row[0]) for row in rows) * self.cfg.num_generations

    # ---- the run ------------------------------------------------------------------------------------------------
    def start(self, model, run):
        from ...infer.defaults import eos_token_ids
        self.run = run
        self.eos = eos_token_ids(unwrap(model), self.tokenizer)
        self._index = {id(e): i for i, e in enumerate(run.train)}
        stale = [key for key in self._reused if any(i >= len(run.train) for i in key)]
        if stale:  # kept samples (of a checkpoint) of prompts this run does not have: sampled again instead
            log.warning("resume: %d kept batch(es) of samples name prompts beyond this run's %d; they are sampled "
                        "again", len(stale), len(run.train))
            for key in stale:
                del self._reused[key]
        if self.cfg.beta:  # the KL term needs a reference: the adapters off, or a frozen copy of the starting model
            self.reference = Reference(run.config.preference.reference, model, run, fixed_data=False)

    @torch.no_grad()
    def begin_step(self, model, batches):
        """Samples and scores the completions of every micro-batch of the step, and their advantages."""
        fresh = [batch for batch in batches if "input_ids" not in batch and not self._reuse(batch)]
        if model.training and len(fresh) == len(batches):
            # A training step that samples anew: every kept batch has served its steps, so whatever is still kept
            # is stale (a checkpoint of other settings, say) and must not be taken for a later batch of the same
            # prompts. Evaluation (model.eval()) keeps its own batches only for its own repetitions.
            self._reused = {key: kept for key, kept in self._reused.items() if not _train_key(key)}
        for batch in fresh:
            self._rollout(model, batch)
            if self.cfg.num_iterations > 1:
                self._keep(model, batch)
        if self.cfg.scale_rewards == "batch":
            sums = torch.zeros(3, dtype=torch.float64, device=self.run.device)
            for batch in batches:
                r = batch["reward_total"].double().to(sums.device)
                sums += torch.stack([r.sum(), (r * r).sum(), torch.tensor(float(r.numel()), device=sums.device,
                                                                       dtype=torch.float64)])
            self.run.dist.all_sum_(sums)
            n = sums[2].clamp(min=2)
            std = ((sums[1] - sums[0] ** 2 / n) / (n - 1)).clamp(min=0).sqrt().float().cpu()
            for batch in batches:
                batch["advantages"] = group_advantages(batch["reward_total"], self.cfg.num_generations, "batch", std)

    def _rollout(self, model, batch):
        from ...infer.decoder import generate_ids
        from ...infer.generation import left_pad
        from ...infer.sampling import SamplingParams
        cfg, G = self.cfg, self.cfg.num_generations
        examples = batch["examples"]
        prompts = [e.prompt_ids.tolist() for e in examples for _ in range(G)]
        ids, mask = left_pad(prompts, self.run.pad_id)
        params = SamplingParams(max_new_tokens=cfg.max_completion_length, temperature=cfg.temperature,
                                top_p=cfg.top_p, top_k=cfg.top_k)
        with self.run.autocast():
            out = generate_ids(unwrap(model), ids, mask, params, eos_token_ids=self.eos, pad_token_id=self.run.pad_id)
        completions = [tokens + ([end] if reason == "eos" and end is not None else [])
                       for tokens, reason, end in zip(out.tokens, out.finish_reasons, out.finish_tokens)]
        texts = [self.tokenizer.decode(tokens, skip_special_tokens=True) for tokens in out.tokens]
        chat = isinstance(examples[0].prompt, list)
        shown = [[{"role": "assistant", "content": t}] for t in texts] if chat else texts
        origins = [e.origin for e in examples for _ in range(G)]
        keys = list(dict.fromkeys(k for e in examples for k in e.extras))
        columns = {k: [e.extras.get(k) for e in examples for _ in range(G)] for k in keys}
        rewards = score(self.rewards, [e.prompt for e in examples for _ in range(G)], shown, columns, origins)
        weights = torch.tensor([r.weight for r in self.rewards])
        total = (rewards * weights).sum(dim=1)
        batch.update(self._sequences(prompts, completions))
        batch["reward_total"], batch["rewards"] = total, rewards
        batch["advantages"] = group_advantages(total, G, cfg.scale_rewards)
        batch["group_std"] = total.view(-1, G).std(dim=1).repeat_interleave(G)
        batch["completion_lengths"] = torch.tensor([len(c) for c in completions], dtype=torch.float32)
        if cfg.beta:
            with self.run.autocast():
                moved = {k: batch[k].to(self.run.device) for k in ("input_ids", "labels", "attention_mask")}
                batch["ref_logps"] = self.reference.token_logps(model, moved).cpu()

    def _reuse(self, batch) -> bool:
        """Fills a repeated micro-batch with its samples of the first time; False when it is met for the first time."""
        key = self._key(batch)
        kept = self._reused.get(key)
        if kept is None:
            return False
        tensors, left = kept
        batch.update(tensors)
        if left <= 1:
            del self._reused[key]
        else:
            self._reused[key] = (tensors, left - 1)
        return True

    def _keep(self, model, batch):
        """Keeps a new batch of samples for its next mu - 1 steps, with the log-probs of the policy that sampled."""
        moved = {k: batch[k].to(self.run.device) for k in ("input_ids", "labels", "attention_mask")}
        with torch.no_grad(), self.run.autocast():
            batch["old_logps"] = token_logprobs(model, moved).cpu()
        tensors = {k: v for k, v in batch.items() if k not in ("examples", "rows")}
        self._reused[self._key(batch)] = (tensors, self.cfg.num_iterations - 1)

    def _key(self, batch) -> tuple:
        """A batch's examples: their indices in the train split (ints); an example of another split (evaluation)
        by its object, which no checkpoint keeps."""
        return tuple(self._index.get(id(e), ("other", id(e))) for e in batch["examples"])

    # ---- checkpoints --------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """The kept batches of samples of training (tensors and steps still served), as the step boundary has them."""
        kept = [{"rows": list(key), "left": left, "tensors": dict(tensors)}
                for key, (tensors, left) in self._reused.items() if _train_key(key)]
        return {"kept": kept} if kept else {}

    def load_state_dict(self, state: dict, *, source: str) -> None:
        """Checks every kept batch (prompt indices, steps left, tensors and their rows) before taking any."""
        if type(state) is not dict or set(state) - {"kept"} or type(state.get("kept", [])) is not list:
            raise CheckpointError(f"{source}: expected {{'kept': [...]}} (GRPO's kept batches of samples)")
        G, mu = self.cfg.num_generations, self.cfg.num_iterations
        need = KEPT_TENSORS + (("ref_logps",) if self.cfg.beta else ())
        restored = {}
        for j, entry in enumerate(state.get("kept", [])):
            where = f"{source}: kept.{j}"
            if type(entry) is not dict or set(entry) != {"rows", "left", "tensors"}:
                raise CheckpointError(f"{where}: expected the keys rows, left, tensors")
            rows, left, tensors = entry["rows"], entry["left"], entry["tensors"]
            if type(rows) is not list or not rows or not all(type(i) is int and i >= 0 for i in rows):
                raise CheckpointError(f"{where}.rows: expected a list of prompt indices, found {rows!r}")
            if type(left) is not int or not 1 <= left <= mu - 1:
                raise CheckpointError(f"{where}.left: {left!r} steps left, but grpo.num_iterations={mu} leaves "
                                      f"1 to {mu - 1}: was the checkpoint written with another num_iterations?")
            if type(tensors) is not dict or set(need) - set(tensors):
                missing = sorted(set(need) - set(tensors)) if type(tensors) is dict else list(need)
                raise CheckpointError(f"{where}.tensors: missing {', '.join(missing)}")
            for name, value in tensors.items():
                if not isinstance(value, torch.Tensor) or value.dim() == 0 or value.shape[0] != len(rows) * G:
                    shape = list(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
                    raise CheckpointError(f"{where}.tensors.{name}: expected a tensor of {len(rows)} prompts x "
                                          f"{G} completions = {len(rows) * G} rows, found {shape}")
            restored[tuple(rows)] = (tensors, left)
        self._reused = restored

    def _sequences(self, prompts, completions) -> dict:
        """Right-padded prompt + completion rows; labels on the completion tokens only."""
        width = max(len(p) + len(c) for p, c in zip(prompts, completions))
        n = len(prompts)
        input_ids = torch.full((n, width), self.run.pad_id, dtype=torch.long)
        labels = torch.full((n, width), -100, dtype=torch.long)
        attention = torch.zeros((n, width), dtype=torch.long)
        for i, (p, c) in enumerate(zip(prompts, completions)):
            row = p + c
            input_ids[i, :len(row)] = torch.tensor(row)
            attention[i, :len(row)] = 1
            if c:
                labels[i, len(p):len(row)] = torch.tensor(c)
        return {"input_ids": input_ids, "labels": labels, "attention_mask": attention}

    # ---- batches -> loss ----------------------------------------------------------------------------------------
    def units(self, batch: dict) -> dict:
        n = int(batch["input_ids"].shape[0])
        tokens = int((batch["labels"][:, 1:] != -100).sum())
        return {"completion": n, "token": tokens, "budget": n * self.cfg.max_completion_length}

    def loss(self, model, batch):
        cfg = self.cfg
        logps = token_logprobs(model, batch)                       # position t: the log-prob of token t + 1
        mask = F.pad(batch["labels"][:, 1:] != -100, (0, 1)).float()
        advantages = batch["advantages"].to(logps.device)
        ref = batch["ref_logps"].to(logps.device) if cfg.beta else None
        old = batch["old_logps"].to(logps.device) if "old_logps" in batch else logps.detach()
        per_token, kl, clipped = clipped_token_loss(
            logps, old, advantages, epsilon=cfg.epsilon,
            epsilon_high=cfg.epsilon_high if cfg.epsilon_high is not None else cfg.epsilon, beta=cfg.beta,
            ref_logps=ref)
        per_token = per_token * mask
        if cfg.loss_type == "dapo":
            terms = {"token": per_token.sum()}
        elif cfg.loss_type == "grpo":
            terms = {"completion": (per_token.sum(dim=1) / mask.sum(dim=1).clamp(min=1)).sum()}
        else:
            terms = {"budget": per_token.sum()}
        dev = logps.device
        metrics = {"reward": batch["reward_total"].sum().to(dev), "reward_std": batch["group_std"].sum().to(dev),
                   "completion_length": batch["completion_lengths"].sum().to(dev),
                   "clip_ratio": ((clipped.float() * mask).sum(), "token")}
        for j, reward in enumerate(self.rewards):
            metrics[f"rewards/{reward.name}"] = batch["rewards"][:, j].sum().to(dev)
        if kl is not None:
            metrics["kl"] = ((kl.detach() * mask).sum(), "token")
        return terms, self.units(batch), metrics
