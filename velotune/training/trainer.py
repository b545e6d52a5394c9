"""The training loop, one for every objective (objectives/: SFT, continued pre-training, ...) and for LoRA, QLoRA
and full fine-tuning.

The objective gives each micro-batch its loss sum and its units (target tokens for SFT); the loss of an optimizer
step is normalised by the units of the whole global batch (all micro-batches, all ranks), so 1 x 8 and 8 x 1 give
the same update. The state that moves (step, data position, RNG) lives in TrainState. Losses and gradient norms stay
on the device and are read once per logging step (and before a checkpoint), not after every micro-batch: a read
stalls a GPU until its queue drains. Callbacks hear what happens (callbacks.py); a stop request ends the run after
the current step with a checkpoint.
"""
from __future__ import annotations

import logging
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..config import Config, load_config
from ..errors import TrainingError
from . import distributed
from .callbacks import Callbacks, stop_check
from .metrics import MetricsLog, Progress, is_finite
from ..kernels.shape_buckets import shape_keyed_kernels
from .optim import build_optimizer, build_scheduler, trained_embedding_params
from .outputs import prepare_output_dir, tokenizer_template, write_run_file
from .plan import RunPlan, plan_run
from .model_setup import autocast_dtype, prepare_for_training
from .objectives import RunContext, loss_terms, unit_counts
from .objectives.base import step_sizes
from .state import TrainState, list_checkpoints, rng_state

log = logging.getLogger("velotune")


@dataclass
class TrainResult:
    output_dir: Path
    steps: int
    final_loss: float | None
    eval_loss: float | None
    adapter_dir: Path | None = None
    model_dir: Path | None = None
    metrics_path: Path | None = None
    interrupted: bool = False
    checkpoint: Path | None = None       # the last checkpoint written (where an interrupted run continues from)
    data_stats: dict = field(default_factory=dict)
    params: dict = field(default_factory=dict)
    tokens_per_second: float = 0.0       # trained (target) tokens per second
    input_tokens_per_second: float = 0.0  # all tokens through the model (padding excluded) per second
    losses: list = field(default_factory=list)
    eval_metrics: dict = field(default_factory=dict)  # the last evaluation's eval_loss and objective metrics
    eval_before: dict = field(default_factory=dict)   # the same, before step 1 (objectives that measure it)


def train(config, overrides=None, *, model=None, tokenizer=None, objective=None, callbacks=(),
          stop=None) -> TrainResult:
    """Runs a training job from a YAML path, a dict or a Config (`vt.train`).

    `model`/`tokenizer` may be passed to train an already loaded model: that model is the one trained, in place
    (with the LoRA layers it carries, if any; model.path may then be left out). `objective`: an Objective instance
    (default: the config's `objective`, e.g. sft). `callbacks`: functions called with each TrainEvent (step
    metrics, eval, checkpoint saved, finished, stopped). `stop`: a threading.Event or a callable; once it says
    stop, the run ends after the current step with a checkpoint (result.interrupted), as Ctrl-C does.
    Config, output directory, data and chat template are all checked before any weights load. Under torchrun with
    `train.distributed` ddp / fsdp2 every process calls this; fsdp2 shards a passed model in place.
    """
    cfg = load_config(config, overrides)
    dist = distributed.setup(cfg)
    try:
        return _train(cfg, dist, model, tokenizer, objective, callbacks, stop)
    finally:
        dist.close()  # leaves the process group if it joined it, on errors too


def _train(cfg: Config, dist, model, tokenizer, objective, callbacks, stop) -> TrainResult:
    plan = plan_run(cfg, model=model, tokenizer=tokenizer, dist=dist, objective=objective)
    for line in plan.summary_lines():
        log.info("%s", line)
    for warning in plan.warnings:
        log.warning("%s", warning)
    dist.on_main(prepare_output_dir, plan.output, plan.run_info())
    torch.manual_seed(cfg.train.seed)
    if model is None:
        model = plan.objective.load_model(cfg)
    params = prepare_for_training(model, cfg, plan.objective.adjust_trainable)
    log.info("trainable parameters: %s of %s (%.2f%%)", f"{params['trainable_params']:,}",
             f"{params['total_params']:,}", 100 * params["trainable_params"] / max(1, params["total_params"]))
    dist.on_main(write_run_file, plan.output.path, {**plan.run_info(), "params": params})
    dist.seed_rank(cfg.train.seed)
    model = dist.wrap(model, cfg.train.precision)
    events = Callbacks(callbacks, enabled=dist.is_main)
    return _Loop(plan, model, params, dist, events, stop_check(stop)).run()


class _Loop:
    def __init__(self, plan: RunPlan, model, params: dict, dist, events: Callbacks, stop_asked):
        self.plan, self.cfg, self.tcfg = plan, plan.config, plan.config.train
        self.objective, self.events, self.stop_asked = plan.objective, events, stop_asked
        self.model, self.tokenizer, self.params, self.dist = model, plan.tokenizer, params, dist
        self.out_dir = plan.output.path
        self.device = next(model.parameters()).device
        self.train_data, self.eval_data = plan.data.train, plan.data.eval
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self.total_steps = plan.total_steps
        self.optimizer = build_optimizer(model.parameters(), self.tcfg,
                                         named={p: n for n, p in model.named_parameters()},
                                         embedding_params=trained_embedding_params(distributed.unwrap(model)))
        self.scheduler = build_scheduler(self.optimizer, self.tcfg, self.total_steps)
        model_dtype = next(p for p in model.parameters() if p.is_floating_point()).dtype
        self.amp_dtype = autocast_dtype(self.tcfg.precision, self.device, model_dtype)
        self.scaler = torch.amp.GradScaler(self.device.type) if self.amp_dtype == torch.float16 else None
        # fp32 on the CPU keeps nothing per shape: batches exactly as wide as their longest row (padding is work)
        self.objective.bucket_widths = self.device.type != "cpu" or shape_keyed_kernels(
            self.device, self.amp_dtype or model_dtype)
        self.objective.padding_free = self.objective.padding_free_for(self.cfg.data.padding_free)
        self.state = TrainState()
        self._evaluated_at = None  # the step of the last evaluation: the final one is not run twice
        self._unread = []          # (loss, grad norm, metrics, record, log step): device values not read yet
        log.info("model: %s, dtype %s, device %s, autocast %s", type(distributed.unwrap(model)).__name__,
                 _dtype_name(model_dtype), self.device, _dtype_name(self.amp_dtype) if self.amp_dtype else "none")

    # ---- data ------------------------------------------------------------------------------------------
    def _epoch_batches(self, epoch_rows: list, start: int):
        """This process's batches of an epoch (`epoch_rows`) from batch `start` on, each with its real (non-padding)
        tokens."""
        packing = self.cfg.data.packing
        for rows in epoch_rows[start:]:
            examples = [[self.train_data[i] for i in row] for row in rows]
            batch = self.objective.collate(examples, pad_id=self.pad_id, packing=packing,
                                           max_width=self.plan.max_seq_length)
            yield batch, self.objective.input_tokens(examples)

    def _step_batches(self):
        """Endless stream of each optimizer step's micro-batches, from the saved data position: grad_accum of
        them, fewer at the end of an epoch (a step never spans two epochs, so an epoch reads each sample once) or
        where the objective closes a step early (step_closes: GRPO's repeated short step).
        Each is (epoch, batches of the epoch done by all ranks, batch, real tokens); counting the batches of all
        ranks lets a checkpoint resume on another number of processes."""
        ranks, accum = self.dist.world_size, self.tcfg.grad_accum
        epoch, skip = self.state.epoch, self.dist.batches_to_skip(self.state, self.tcfg.batch_size)
        while True:
            rows = self.objective.epoch_rows(self.train_data, epoch=epoch, **self.plan.batch_kwargs())
            # The same grouping as the plan's step count (plan.py), from the resume position on.
            sizes = iter(step_sizes(len(rows), accum, self.objective.step_closes(len(rows), accum), start=skip))
            group, size = [], next(sizes, 0)
            for i, (batch, tokens) in enumerate(self._epoch_batches(rows, skip), start=skip):
                group.append((epoch, (i + 1) * ranks, batch, tokens))
                if len(group) == size:
                    yield group
                    group, size = [], next(sizes, 0)
            epoch, skip = epoch + 1, 0

    # ---- steps -----------------------------------------------------------------------------------------
    def _loss(self, batch):
        """The objective's ({count: summed term}, {metric: summed value}) of a micro-batch, on the model's device,
        under the run's autocast."""
        batch = {k: v.to(self.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        with self._autocast():
            return loss_terms(self.objective, self.objective.loss(self.model, batch))

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=self.amp_dtype) if self.amp_dtype else nullcontext()

    def _step(self, micro):
        """One optimizer step: (loss, metric sums, counts, all real tokens, grad norm), summed over all ranks. Loss,
        metrics and grad norm are tensors on the device (read later, once per logging step); the counts are known
        before the forward."""
        # First what the objective computes over the whole step (GRPO samples its completions, KTO its reference
        # point): the counts may depend on it.
        self.objective.begin_step(self.model, [b for _, _, b, _ in micro])
        counts = [unit_counts(self.objective, b) for _, _, b, _ in micro]
        names = list(counts[0])
        # The step's counts (and all real tokens) over all ranks, in one collective.
        summed = self.dist.all_sum(*(float(sum(c[k] for c in counts)) for k in names),
                                   float(sum(m[3] for m in micro)))
        totals, inputs = {k: int(v) for k, v in zip(names, summed)}, int(summed[-1])
        if totals[names[0]] == 0:
            raise TrainingError(f"step {self.state.step + 1} has nothing to train on (no {self.objective.unit_name} "
                                f"with a target in its batches): check the data's loss mask (data.train_on)")
        loss_sum = torch.zeros((), dtype=torch.float32, device=self.device)
        metric_sums, metric_units = {}, {}
        for i, ((_, _, batch, _), n) in enumerate(zip(micro, counts)):
            if n[names[0]] == 0 and not self.dist.active:  # ranks must run the same backward passes (collectives)
                continue
            with self.dist.gradient_sync(self.model, last=i == len(micro) - 1):
                terms, metrics = self._loss(batch)
                loss = sum(term / max(1, totals[unit]) for unit, term in terms.items())
                scaled = loss * self.dist.grad_scale if self.dist.active else loss
                (self.scaler.scale(scaled) if self.scaler else scaled).backward()
            loss_sum += loss.detach().float()
            for name, value in metrics.items():
                value, metric_units[name] = value if isinstance(value, tuple) else (value, names[0])
                metric_sums[name] = metric_sums.get(name, 0) + value.detach().float()
        # The global loss and metrics, the same on every rank, in one collective.
        summed = torch.stack([loss_sum, *(torch.as_tensor(v, device=self.device).float().reshape(())
                                          for v in metric_sums.values())])
        self.dist.all_sum_(summed)
        loss_sum = summed[0]
        metrics = {name: summed[j + 1] / max(1, totals[metric_units[name]]) for j, name in enumerate(metric_sums)}
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        grad_norm = None
        if self.tcfg.max_grad_norm:
            trainable = [p for p in self.model.parameters() if p.requires_grad]
            grad_norm = torch.nn.utils.clip_grad_norm_(trainable, self.tcfg.max_grad_norm)
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss_sum, metrics, totals, inputs, grad_norm

    @torch.no_grad()
    def evaluate(self) -> tuple[float | None, dict]:
        """The eval split's loss (each term over its own count) and the objective's metrics (per main unit)."""
        if not self.eval_data:
            return None, {}
        self.model.eval()
        term_sums, metric_sums, metric_units, count_sums = {}, {}, {}, {}
        kwargs = {**self.plan.batch_kwargs(), "seed": 0, "shuffle": False, "rank": 0, "world_size": 1}
        for rows in self.objective.epoch_rows(self.eval_data, epoch=0, **kwargs):
            batch = self.objective.collate([[self.eval_data[i] for i in row] for row in rows], pad_id=self.pad_id,
                                           packing=self.cfg.data.packing, max_width=self.plan.max_seq_length)
            self.objective.begin_step(self.model, [batch])
            counts = unit_counts(self.objective, batch)
            if not counts[next(iter(counts))]:
                continue
            terms, metrics = self._loss(batch)
            for name, value in terms.items():
                term_sums[name] = term_sums.get(name, 0.0) + float(value)
            for name, value in metrics.items():
                value, metric_units[name] = value if isinstance(value, tuple) else (value, next(iter(counts)))
                metric_sums[name] = metric_sums.get(name, 0.0) + float(value)
            for name, n in counts.items():
                count_sums[name] = count_sums.get(name, 0) + n
        self.model.train()
        self._evaluated_at = self.state.step
        if not count_sums:
            return None, {}
        loss = sum(total / max(1, count_sums.get(unit, 0)) for unit, total in term_sums.items())
        return loss, {name: total / max(1, count_sums.get(metric_units[name], 0))
                      for name, total in metric_sums.items()}

    # ---- the run ---------------------------------------------------------------------------------------
    def run(self) -> TrainResult:
        resume_from = self.plan.output.resume_from
        if resume_from is not None:
            self.state = self.dist.load_checkpoint(resume_from, self.model, self.optimizer, self.scheduler,
                                                   self.scaler, objective=self.objective)
            log.info("resumed from %s (step %d)", resume_from, self.state.step)
        self.objective.start(self.model, RunContext(
            config=self.cfg, device=self.device, autocast=self._autocast, out_dir=self.out_dir,
            resumed=resume_from is not None, dist=self.dist, train=self.train_data, eval=self.eval_data,
            pad_id=self.pad_id))
        metrics = MetricsLog(self.out_dir, self.tcfg.report_to, self.cfg.to_dict(), enabled=self.dist.is_main,
                             resume_step=self.state.step if resume_from is not None else None)
        progress = Progress(self.total_steps, self.state.step, enabled=self.tcfg.progress and self.dist.is_main,
                            unit=self.objective.unit_name)
        self.model.train()
        result = TrainResult(self.out_dir, self.state.step, None, None, metrics_path=metrics.path,
                             data_stats=self.plan.data.stats.as_dict(), params=self.params)
        self.events.emit("start", self.state.step, self.total_steps)
        if self.objective.evaluates_before_training and resume_from is None:
            self._eval_and_log(metrics, result)
            result.eval_before = dict(result.eval_metrics)
            progress.restart_clock()
        self._boundary_rng = rng_state()
        self._boundary_kept = self.objective.state_dict()  # what the objective keeps, as the checkpoint saves it
        try:
            with self.dist.graceful_stop():
                self._train_steps(metrics, progress, result)
        except KeyboardInterrupt:
            # Parameters and optimizer only change at step boundaries: the state of the last finished step,
            # with the RNG as it was then, resumes exactly as if nothing had happened.
            self.optimizer.zero_grad(set_to_none=True)
            self._read(metrics, progress, result)  # a non-finite loss not read yet: no checkpoint of it
            result.checkpoint = self._save()
            log.warning("stopped at step %d: checkpoint written to %s; continue with train.resume=true",
                        self.state.step, result.checkpoint)
            result.interrupted = True
            self.events.emit("stopped", self.state.step, self.total_steps, path=result.checkpoint)
        finally:
            progress.close()
            metrics.close()
        result.steps = self.state.step
        result.input_tokens_per_second, result.tokens_per_second = progress.rates()
        if not result.interrupted:
            self._finish(result)
            self.events.emit("finished", self.state.step, self.total_steps,
                             {"loss": result.final_loss, "eval_loss": result.eval_loss},
                             path=result.adapter_dir or result.model_dir)
        return result

    def _train_steps(self, metrics: MetricsLog, progress: Progress, result: TrainResult):
        stream = self._step_batches()
        self._start = time.perf_counter()
        while self.state.step < self.total_steps:
            # A signal on any rank, or a stop request, stops all ranks at this step boundary.
            if self.dist.stop_requested(self.stop_asked()):
                raise KeyboardInterrupt
            micro = next(stream)
            lr = self.scheduler.get_last_lr()[0]  # the rate this step uses: the scheduler moves after it
            loss, step_metrics, counts, inputs, grad_norm = self._step(micro)
            self.state.step += 1
            self.state.epoch, self.state.batch_in_epoch = micro[-1][0], micro[-1][1]
            self.state.rows_in_epoch = self.state.batch_in_epoch * self.tcfg.batch_size
            trained = counts.get("token", next(iter(counts.values())))  # trained tokens where counted
            self.state.tokens_seen += trained
            progress.update(inputs, trained, lr)
            log_step = self.state.step % self.tcfg.log_every == 0 or self.state.step == self.total_steps
            record = {"step": self.state.step, "lr": lr, "tokens": trained, "input_tokens": inputs,
                      "tokens_seen": self.state.tokens_seen, "epoch": self.state.epoch}
            record.update({name: n for name, n in counts.items() if name != "token"})
            self._unread.append((loss, grad_norm, step_metrics, record, log_step))
            if log_step:
                self._read(metrics, progress, result)
            if self.tcfg.eval_every and self.state.step % self.tcfg.eval_every == 0:
                self._eval_and_log(metrics, result)
            self._boundary_rng = rng_state()
            # Taken here, not when saving: a Ctrl-C inside the next step saves this boundary's state, and that step
            # may already have used up (or replaced) what the objective kept.
            self._boundary_kept = self.objective.state_dict()
            if self.tcfg.save_every and self.state.step % self.tcfg.save_every == 0:
                self._read(metrics, progress, result)  # never a checkpoint of a step with a non-finite loss
                result.checkpoint = self._save()
                self.events.emit("checkpoint", self.state.step, self.total_steps, path=result.checkpoint)
        if (self.eval_data or self.objective.evaluates_before_training) and self._evaluated_at != self.state.step:
            self._eval_and_log(metrics, result)

    def _read(self, metrics: MetricsLog, progress: Progress, result: TrainResult):
        """Reads the losses and gradient norms of the steps not read yet (one device synchronisation), stops the
        run at the first non-finite loss, and writes the logging steps' metrics."""
        if not self._unread:
            return
        nan = torch.tensor(float("nan"), device=self.device)
        values = [torch.stack([loss.float(), (norm if norm is not None else nan).float(), *named.values()]).tolist()
                  for loss, norm, named, _, _ in self._unread]
        entries, self._unread = self._unread, []
        input_rate, target_rate = progress.rates()
        for (loss, norm, *named_values), (_, norm_tensor, named, record, log_step) in zip(values, entries):
            if not is_finite(loss):
                self._stop_on_nonfinite(loss, record["step"])
            result.final_loss = loss
            result.losses.append(loss)
            if log_step:
                record = {**record, "loss": loss, **dict(zip(named, named_values)),
                          "grad_norm": norm if norm_tensor is not None else None,
                          "target_tokens_per_s": target_rate, "input_tokens_per_s": input_rate,
                          "elapsed_s": round(time.perf_counter() - self._start, 3)}
                metrics.write(record)
                self.events.emit("step", record["step"], self.total_steps, record)
        progress.show_loss(result.final_loss)

    def _stop_on_nonfinite(self, loss: float, step: int):
        self.optimizer.zero_grad(set_to_none=True)
        last = list_checkpoints(self.out_dir)
        kept = f"the last good checkpoint is {last[-1]}" if last else "no checkpoint had been written yet"
        raise TrainingError(f"loss is {loss} at step {step}: training stopped; {kept}. "
                            f"Try a lower train.lr, train.precision=fp32 or bf16, or check the data.")

    def _eval_and_log(self, metrics, result):
        """The eval split's loss and the objective's metrics (its extra ones too: an embedder's retrieval metrics),
        written, sent to the callbacks and logged; nothing when there is neither."""
        eval_loss, eval_metrics = self.evaluate()
        eval_metrics = {**eval_metrics, **self._extra_eval()}
        if eval_loss is None and not eval_metrics:
            return
        values = {f"eval_{name}": v for name, v in eval_metrics.items()}
        shown = ", ".join(f"{name} {v:.4f}" for name, v in eval_metrics.items())
        if eval_loss is not None:
            result.eval_loss = eval_loss
            values = {"eval_loss": eval_loss, **values}
            shown = f"eval loss {eval_loss:.4f}" + (f", {shown}" if shown else "")
        result.eval_metrics = values
        metrics.write({"step": self.state.step, **values})
        self.events.emit("eval", self.state.step, self.total_steps, values)
        log.info("step %d: %s", self.state.step, shown)

    def _extra_eval(self) -> dict:
        """The objective's metrics beyond the eval loss (retrieval metrics of an embedder), measured on the main
        process in eval mode."""
        self._evaluated_at = self.state.step
        if not self.dist.is_main:
            return {}
        self.model.eval()
        try:
            with torch.no_grad():
                return self.objective.extra_eval(self.model, self.tokenizer)
        finally:
            self.model.train()

    def _save(self) -> Path:
        return self.dist.save_checkpoint(self.out_dir, self.state, self.model, self.optimizer, self.scheduler,
                                         self.scaler, self.tcfg.keep_last, rng=self._boundary_rng,
                                         objective_state=self._boundary_kept)

    def _finish(self, result: TrainResult):
        last = self.out_dir / "checkpoints" / f"step-{self.state.step:06d}"
        if self.tcfg.save_every and not self.dist.on_main(last.exists):
            result.checkpoint = self._save()
            self.events.emit("checkpoint", self.state.step, self.total_steps, path=result.checkpoint)
        lora = self.cfg.finetune.method == "lora"
        with self.dist.full_model(self.model, trainable_only=lora) as model:
            written = self.dist.on_main(self._write_outputs, model, lora) or {}
        result.adapter_dir, result.model_dir = written.get("adapter_dir"), written.get("model_dir")

    def _write_outputs(self, model, lora: bool) -> dict:
        """The objective's outputs (the adapter with the tokenizer, or the whole model), with the chat template the
        data was rendered with, so that chat, serve and export use the format the model learned."""
        template = self.plan.data.template
        with tokenizer_template(self.tokenizer, template.text if template else None) as tokenizer:
            return self.objective.write_outputs(model, tokenizer, self.out_dir, lora)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")
