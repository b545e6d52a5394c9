"""What a user sees and keeps: a progress bar (loss, lr, real tokens/s, ETA) and metrics.jsonl, plus
TensorBoard / Weights & Biases when installed and asked for."""
from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path

log = logging.getLogger("velotune")


class MetricsLog:
    def __init__(self, out_dir: Path, report_to=(), config: dict | None = None, append: bool = False,
                 enabled: bool = True):
        """`enabled=False` (ranks other than 0 of a multi-process run): writes nothing."""
        self.path = Path(out_dir) / "metrics.jsonl"
        self._file = self._tb = self._wandb = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a" if append else "w", encoding="utf-8")
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
    """A tqdm bar over optimizer steps; real tokens/s is measured over the steps of this session only."""

    def __init__(self, total_steps: int, start_step: int, enabled: bool = True):
        self.start_time = time.perf_counter()
        self.start_step = start_step
        self.tokens = 0
        self.bar = None
        if enabled:
            from tqdm.auto import tqdm
            self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True,
                            desc="train")

    def tokens_per_second(self) -> float:
        elapsed = time.perf_counter() - self.start_time
        return self.tokens / elapsed if elapsed > 0 else 0.0

    def update(self, tokens: int, loss: float, lr: float):
        self.tokens += tokens
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{self.tokens_per_second():.0f}",
                                 refresh=False)
            self.bar.update(1)

    def close(self):
        if self.bar is not None:
            self.bar.close()


def is_finite(value: float) -> bool:
    return not (math.isnan(value) or math.isinf(value))
