"""The training loop, shared by LoRA, QLoRA and full fine-tuning (and continued pre-training on text).

The loss of an optimizer step is normalised by the number of real target tokens across all its micro-batches,
so 1 x 8 and 8 x 1 give the same update. The state that moves (step, data position, RNG) lives in TrainState.
"""
from __future__ import annotations

import json
import logging
import math
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..config import Config, load_config
from ..data import count_target_tokens
from ..errors import ConfigError, TrainingError
from . import distributed
from .metrics import MetricsLog, Progress, is_finite
from .optim import build_optimizer, build_scheduler
from .setup import autocast_dtype, load_model, prepare_for_training
from .state import TrainState, list_checkpoints, rng_state

log = logging.getLogger("velotune")
RUN_FILE = "run.json"


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
    data_stats: dict = field(default_factory=dict)
    params: dict = field(default_factory=dict)
    tokens_per_second: float = 0.0
    losses: list = field(default_factory=list)


def train(config, overrides=None, *, model=None, tokenizer=None) -> TrainResult:
    """Runs a training job from a YAML path, a dict or a Config (`vt.train`).

    `model`/`tokenizer` may be passed to train an already loaded model (the config's model section is then
    used only for its settings). Under torchrun with `train.distributed` ddp / fsdp2 every process calls this;
    fsdp2 shards a passed model in place.
    """
    cfg = load_config(config, overrides)
    dist = distributed.setup(cfg)
    try:
        return _train(cfg, dist, model, tokenizer)
    finally:
        dist.close()  # leaves the process group if it joined it, on errors too


def _train(cfg: Config, dist, model, tokenizer) -> TrainResult:
    out_dir = Path(cfg.train.output_dir)
    resume_from = dist.on_main(_check_output_dir, out_dir, cfg.train)
    torch.manual_seed(cfg.train.seed)
    if model is None:
        model, tokenizer = load_model(cfg)
    if tokenizer is None:
        raise ConfigError("training needs a tokenizer: the model directory has no tokenizer files")
    params = prepare_for_training(model, cfg)
    log.info("trainable parameters: %s of %s (%.2f%%)", f"{params['trainable_params']:,}",
             f"{params['total_params']:,}", 100 * params["trainable_params"] / max(1, params["total_params"]))
    dist.seed_rank(cfg.train.seed)
    model = dist.wrap(model, cfg.train.precision)
    loop = _Loop(cfg, model, tokenizer, out_dir, params, dist)
    return loop.run(resume_from)


def _check_output_dir(out_dir: Path, tcfg) -> Path | None:
    """Refuses to mix two runs in one directory; returns the checkpoint to resume from, if any."""
    holds_run = (out_dir / RUN_FILE).is_file() or bool(list_checkpoints(out_dir))
    if tcfg.resume:
        found = list_checkpoints(out_dir)
        if not found:
            log.warning("train.resume: no checkpoint in %s; starting from the beginning", out_dir)
        return found[-1] if found else None
    if holds_run and not tcfg.overwrite:
        raise ConfigError(f"train.output_dir: {out_dir} holds another run; set train.resume=true to continue it "
                          f"or train.overwrite=true to replace it")
    if holds_run:
        import shutil
        for name in ("checkpoints", "adapter", "model", "metrics.jsonl", RUN_FILE, "tensorboard"):
            target = out_dir / name
            shutil.rmtree(target, ignore_errors=True) if target.is_dir() else target.unlink(missing_ok=True)
    return None


class _Loop:
    def __init__(self, cfg: Config, model, tokenizer, out_dir: Path, params: dict, dist=None):
        from ..data import build_datasets
        self.cfg, self.model, self.tokenizer, self.out_dir, self.params = cfg, model, tokenizer, out_dir, params
        self.dist = dist or distributed.Distributed()
        self.tcfg = cfg.train
        self.device = next(model.parameters()).device
        self.max_len = cfg.data.max_seq_length or getattr(model, "max_seq_length", None) or 2048
        self.train_data, self.eval_data, stats = build_datasets(cfg.data, tokenizer, max_seq_length=self.max_len,
                                                                seed=self.tcfg.seed)
        self.data_stats = stats.as_dict()
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.batches_per_epoch = self._num_batches()
        self.total_steps = self._total_steps()
        self.optimizer = build_optimizer(model.parameters(), self.tcfg)
        self.scheduler = build_scheduler(self.optimizer, self.tcfg, self.total_steps)
        model_dtype = next(p for p in model.parameters() if p.is_floating_point()).dtype
        self.amp_dtype = autocast_dtype(self.tcfg.precision, self.device, model_dtype)
        self.scaler = torch.amp.GradScaler(self.device.type) if self.amp_dtype == torch.float16 else None
        self.state = TrainState()

    # ---- data ------------------------------------------------------------------------------------------
    def _batch_kwargs(self, with_pad=True):
        kwargs = dict(batch_size=self.tcfg.batch_size, max_seq_length=self.max_len, packing=self.cfg.data.packing,
                      seed=self.tcfg.seed)
        return {**kwargs, "pad_id": self.pad_id} if with_pad else kwargs

    def _num_batches(self) -> int:
        from ..data import num_batches
        return num_batches(self.train_data, **self._batch_kwargs(with_pad=False), **self.dist.data_kwargs())

    def _total_steps(self) -> int:
        if self.tcfg.max_steps:
            return self.tcfg.max_steps
        steps = math.ceil(self.tcfg.epochs * self.batches_per_epoch / self.tcfg.grad_accum)
        return max(1, steps)

    def _micro_batches(self):
        """Endless stream of (epoch, batches_done_in_epoch, batch), starting at the saved data position.

        Positions count the batches of all ranks, so a checkpoint resumes on another number of processes."""
        from ..data import batch_iterator
        ranks = self.dist.world_size
        epoch, skip = self.state.epoch, self.dist.batches_to_skip(self.state, self.tcfg.batch_size)
        while True:
            for i, batch in enumerate(batch_iterator(self.train_data, epoch=epoch, start_batch=skip,
                                                     **self._batch_kwargs(), **self.dist.data_kwargs()),
                                      start=skip):
                yield epoch, (i + 1) * ranks, batch
            epoch, skip = epoch + 1, 0

    # ---- steps -----------------------------------------------------------------------------------------
    def _forward_loss(self, batch):
        batch = {k: v.to(self.device) for k, v in batch.items()}
        ctx = torch.autocast(self.device.type, dtype=self.amp_dtype) if self.amp_dtype else nullcontext()
        with ctx:
            out = self.model(batch["input_ids"], labels=batch["labels"], position_ids=batch.get("position_ids"),
                             attention_mask=batch.get("attention_mask"), return_logits=False, reduction="sum")
        return out.loss

    def _step(self, micro) -> tuple[float, int, float | None]:
        targets = [count_target_tokens(b) for _, _, b in micro]
        total = int(self.dist.all_sum(sum(targets)))  # the step's real target tokens over all ranks
        if total == 0:
            return float("nan"), 0, None
        loss_sum = 0.0
        for i, ((_, _, batch), n) in enumerate(zip(micro, targets)):
            if n == 0 and not self.dist.active:  # ranks must run the same backward passes (collectives)
                continue
            with self.dist.gradient_sync(self.model, last=i == len(micro) - 1):
                loss = self._forward_loss(batch) / total
                scaled = loss * self.dist.grad_scale if self.dist.active else loss
                (self.scaler.scale(scaled) if self.scaler else scaled).backward()
            loss_sum += loss.item()
        loss_sum = self.dist.all_sum(loss_sum)  # the global loss, the same on every rank
        if not is_finite(loss_sum):
            return loss_sum, total, None
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        grad_norm = None
        if self.tcfg.max_grad_norm:
            trainable = [p for p in self.model.parameters() if p.requires_grad]
            grad_norm = float(torch.nn.utils.clip_grad_norm_(trainable, self.tcfg.max_grad_norm))
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss_sum, total, grad_norm

    @torch.no_grad()
    def evaluate(self) -> float | None:
        if not self.eval_data:
            return None
        from ..data import batch_iterator
        self.model.eval()
        loss, tokens = 0.0, 0
        kwargs = {**self._batch_kwargs(), "seed": 0}
        for batch in batch_iterator(self.eval_data, epoch=0, shuffle=False, **kwargs):
            n = count_target_tokens(batch)
            if n:
                loss += self._forward_loss(batch).item()
                tokens += n
        self.model.train()
        return loss / max(1, tokens)

    # ---- the run ---------------------------------------------------------------------------------------
    def run(self, resume_from) -> TrainResult:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        if resume_from is not None:
            self.state = self.dist.load_checkpoint(resume_from, self.model, self.optimizer, self.scheduler,
                                                   self.scaler)
            log.info("resumed from %s (step %d)", resume_from, self.state.step)
        self.dist.on_main(self._write_run_file)
        metrics = MetricsLog(self.out_dir, self.tcfg.report_to, self.cfg.to_dict(), append=resume_from is not None,
                             enabled=self.dist.is_main)
        progress = Progress(self.total_steps, self.state.step, enabled=self.tcfg.progress and self.dist.is_main)
        self.model.train()
        self._boundary_rng = rng_state()
        result = TrainResult(self.out_dir, self.state.step, None, None, metrics_path=metrics.path,
                             data_stats=self.data_stats, params=self.params)
        try:
            with self.dist.graceful_stop():
                self._train_steps(metrics, progress, result)
        except KeyboardInterrupt:
            # Parameters and optimizer only change at step boundaries: the state of the last finished step,
            # with the RNG as it was then, resumes exactly as if nothing had happened.
            self.optimizer.zero_grad(set_to_none=True)
            path = self._save()
            log.warning("interrupted: checkpoint written to %s; continue with train.resume=true", path)
            result.interrupted = True
        finally:
            progress.close()
            metrics.close()
        result.steps, result.tokens_per_second = self.state.step, progress.tokens_per_second()
        if not result.interrupted:
            self._finish(result)
        return result

    def _train_steps(self, metrics: MetricsLog, progress: Progress, result: TrainResult):
        stream = self._micro_batches()
        start = time.perf_counter()
        while self.state.step < self.total_steps:
            if self.dist.stop_requested():  # a signal on any rank stops all of them at this step boundary
                raise KeyboardInterrupt
            micro = [next(stream) for _ in range(self.tcfg.grad_accum)]
            loss, tokens, grad_norm = self._step(micro)
            if not is_finite(loss):
                self.optimizer.zero_grad(set_to_none=True)
                last = list_checkpoints(self.out_dir)
                kept = f"the last good checkpoint is {last[-1]}" if last else "no checkpoint had been written yet"
                raise TrainingError(f"loss is {loss} at step {self.state.step + 1}: training stopped; {kept}. "
                                    f"Try a lower train.lr, train.precision=fp32 or bf16, or check the data.")
            self.state.step += 1
            self.state.epoch, self.state.batch_in_epoch = micro[-1][0], micro[-1][1]
            self.state.rows_in_epoch = self.state.batch_in_epoch * self.tcfg.batch_size
            self.state.tokens_seen += tokens
            lr = self.scheduler.get_last_lr()[0]
            progress.update(tokens, loss, lr)
            result.final_loss = loss
            result.losses.append(loss)
            if self.state.step % self.tcfg.log_every == 0 or self.state.step == self.total_steps:
                metrics.write({"step": self.state.step, "loss": loss, "lr": lr, "grad_norm": grad_norm,
                               "tokens": tokens, "tokens_seen": self.state.tokens_seen,
                               "tokens_per_s": progress.tokens_per_second(), "epoch": self.state.epoch,
                               "elapsed_s": round(time.perf_counter() - start, 3)})
            if self.tcfg.eval_every and self.state.step % self.tcfg.eval_every == 0:
                self._eval_and_log(metrics, result)
            self._boundary_rng = rng_state()
            if self.tcfg.save_every and self.state.step % self.tcfg.save_every == 0:
                self._save()
        if self.eval_data:
            self._eval_and_log(metrics, result)

    def _eval_and_log(self, metrics, result):
        eval_loss = self.evaluate()
        if eval_loss is not None:
            result.eval_loss = eval_loss
            metrics.write({"step": self.state.step, "eval_loss": eval_loss})
            log.info("step %d: eval loss %.4f", self.state.step, eval_loss)

    def _save(self) -> Path:
        return self.dist.save_checkpoint(self.out_dir, self.state, self.model, self.optimizer, self.scheduler,
                                         self.scaler, self.tcfg.keep_last, rng=self._boundary_rng)

    def _finish(self, result: TrainResult):
        last = self.out_dir / "checkpoints" / f"step-{self.state.step:06d}"
        if self.tcfg.save_every and not self.dist.on_main(last.exists):
            self._save()
        lora = self.cfg.finetune.method == "lora"
        with self.dist.full_model(self.model, trainable_only=lora) as model:
            written = self.dist.on_main(self._write_outputs, model, lora)
        if lora:
            result.adapter_dir = written
        else:
            result.model_dir = written

    def _write_outputs(self, model, lora: bool) -> Path:
        if lora:
            from ..lora import save_adapter
            adapter_dir = Path(save_adapter(model, self.out_dir / "adapter", overwrite=True))
            if self.tokenizer is not None:
                self.tokenizer.save_pretrained(str(adapter_dir))
            return adapter_dir
        from ..models.loader import save
        return save(model, self.tokenizer, self.out_dir / "model", overwrite=True)

    def _write_run_file(self):
        info = {"config": self.cfg.to_dict(), "data": self.data_stats, "params": self.params,
                "total_steps": self.total_steps, "batches_per_epoch": self.batches_per_epoch,
                "processes": self.dist.world_size}
        (self.out_dir / RUN_FILE).write_text(json.dumps(info, indent=2, default=str), encoding="utf-8")
