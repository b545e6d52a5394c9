"""What a user sees and keeps: a progress bar (loss, lr, tokens/s through the model and trained tokens/s, ETA) and
metrics.jsonl, plus TensorBoard / Weights & Biases when installed and asked for."""
from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path

log = logging.getLogger("velotune")


class MetricsLog:
    def __init__(self, out_dir: Path, report_to=(), config: dict | None = None, resume_step: int | None = None,
                 enabled: bool = True):
        """`resume_step`: a resumed run keeps the lines of the steps up to its checkpoint's (the steps after it
        are trained again); otherwise the file starts empty. `enabled=False` (ranks other than 0): writes nothing."""
        self.path = Path(out_dir) / "metrics.jsonl"
        self._file = self._tb = self._wandb = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is not None:
            keep_steps_up_to(self.path, resume_step)
        self._file = open(self.path, "a" if resume_step is not None else "w", encoding="utf-8")
        for name in report_to or ():
            if name == "tensorboard":
                self._tb = _tensorboard_writer(Path(out_dir) / "tensorboard")
            elif name == "wandb":
                self._wandb = _wandb_run(config)
            else:
                log.warning("train.report_to: unknown target %r (known: tensorboard, wandb)", name)

    def write(self, record: dict):
        if self._file is None:
            return
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        step = record.get("step", 0)
        for key, value in record.items():
            if key == "step" or not isinstance(value, (int, float)) or isinstance(value, bool):
                continue
            if self._tb is not None:
                self._tb.add_scalar(key, value, step)
        if self._wandb is not None:
            self._wandb.log({k: v for k, v in record.items() if k != "step"}, step=step)

    def close(self):
        if self._file is not None:
            self._file.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


def keep_steps_up_to(path: Path, step: int):
    """Rewrites metrics.jsonl with the lines of steps <= `step` only (a line cut short by a kill is dropped)."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] <= step:
            kept.append(line + "\n")
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-w")
    tmp.write_text("".join(kept), encoding="utf-8")
    os.replace(tmp, path)


def _tensorboard_writer(path: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
        return SummaryWriter(str(path))
    except ImportError:
        log.warning("train.report_to has 'tensorboard' but the tensorboard package is not installed: skipped")
        return None


def _wandb_run(config):
    try:
        import wandb
        return wandb.init(project="velotune", config=config or {})
    except ImportError:
        log.warning("train.report_to has 'wandb' but the wandb package is not installed: skipped")
        return None


class Progress:
    """A tqdm bar over optimizer steps with loss, the lr the step used, and two rates measured over this session's
    steps: tokens through the model (padding excluded) and trained (target) tokens, or the objective's own unit
    (pairs for an embedder) where it counts no trained tokens."""

    def __init__(self, total_steps: int, start_step: int, enabled: bool = True, unit: str = "token"):
        self.start_time = time.perf_counter()
        self.trained_label = "trained tok/s" if unit == "token" else f"{unit}s/s"
        self.input_tokens = self.target_tokens = 0
        self.loss, self.lr = None, 0.0
        self.bar = None
        if enabled:
            from tqdm.auto import tqdm
            self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True,
                            desc="train")

    def restart_clock(self):
        """Rates count from now (work before the first step, such as an evaluation, is not training)."""
        self.start_time = time.perf_counter()

    def rates(self) -> tuple[float, float]:
        """(tokens/s through the model, trained tokens/s)."""
        elapsed = time.perf_counter() - self.start_time
        if elapsed <= 0:
            return 0.0, 0.0
        return self.input_tokens / elapsed, self.target_tokens / elapsed

    def update(self, input_tokens: int, target_tokens: int, lr: float):
        """One step done; the loss shown is the last one read (losses are read once per logging step)."""
        self.input_tokens += input_tokens
        self.target_tokens += target_tokens
        self.lr = lr
        if self.bar is not None:
            self._show()
            self.bar.update(1)

    def show_loss(self, loss: float | None):
        self.loss = loss
        if self.bar is not None:
            self._show()
            self.bar.refresh()

    def _show(self):
        through, trained = self.rates()
        loss = f"loss {self.loss:.4f}, " if self.loss is not None else ""
        self.bar.set_postfix_str(f"{loss}lr {self.lr:.2e}, {through:.0f} tok/s, {trained:.0f} {self.trained_label}",
                                 refresh=False)

    def close(self):
        if self.bar is not None:
            self.bar.close()


def is_finite(value: float) -> bool:
    return not (math.isnan(value) or math.isinf(value))
