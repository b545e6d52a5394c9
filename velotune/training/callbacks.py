"""What a running training job tells the outside (events to callbacks) and how the outside stops it (a stop
request), the same in one process as under torchrun.

    def on_event(event: TrainEvent): ...           # "start", "step", "eval", "checkpoint", "finished", "stopped"
    stop = threading.Event()                        # or any callable returning True to stop
    vt.train(cfg, callbacks=[on_event], stop=stop)  # stop.set() from another thread: the run ends after the
                                                    # current step with a checkpoint, and resumes with train.resume
Only the main process (rank 0) calls the callbacks; a stop asked on any rank stops them all at the same step.
A callback that raises is logged and dropped, never the run's end.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

log = logging.getLogger("velotune")

EVENT_KINDS = ("start", "step", "eval", "checkpoint", "finished", "stopped")


@dataclass
class TrainEvent:
    kind: str                        # one of EVENT_KINDS
    step: int                        # optimizer steps done
    total_steps: int
    metrics: dict = field(default_factory=dict)   # "step": what metrics.jsonl gets; "eval": eval_loss
    path: Path | None = None         # "checkpoint": the checkpoint; "finished": the adapter or model directory


class Callbacks:
    """The registered callbacks, called in order; `enabled=False` (ranks other than 0) calls none."""

    def __init__(self, callbacks=(), enabled: bool = True):
        for cb in callbacks or ():
            if not callable(cb):
                raise TypeError(f"callbacks: {cb!r} is not callable (a function taking a TrainEvent)")
        self._callbacks = list(callbacks or ()) if enabled else []

    def emit(self, kind: str, step: int, total_steps: int, metrics: dict | None = None, path=None):
        if not self._callbacks:
            return
        event = TrainEvent(kind, step, total_steps, dict(metrics or {}), Path(path) if path is not None else None)
        for cb in list(self._callbacks):
            try:
                cb(event)
            except Exception as exc:  # a broken observer must not cost the run
                log.warning("training callback %r failed on %s (%s: %s); it is dropped", cb, kind,
                            type(exc).__name__, exc)
                self._callbacks.remove(cb)


def stop_check(stop) -> Callable[[], bool]:
    """A function telling whether `stop` asks to stop: a threading.Event (or anything with is_set), a callable
    returning a bool, or None (never)."""
    if stop is None:
        return lambda: False
    if hasattr(stop, "is_set"):
        return stop.is_set
    if callable(stop):
        return lambda: bool(stop())
    raise TypeError(f"stop: expected a threading.Event or a callable returning True to stop, got {stop!r}")
