"""One Studio training job, in its own process: `python -m velotune.studio.job_runner RUN_DIR [--resume]`.

The run directory holds `config.yaml` (written by the Studio); the job trains with it and appends each event of
the loop (start, step metrics, eval, checkpoint, finished, stopped, failed) as one JSON line to `events.jsonl`,
which the Studio reads to draw the chart (and reads again after a page reload or its own restart). SIGTERM asks
for a clean stop: the loop ends after the current step with a checkpoint, and `--resume` continues it.

A stop asked while the process is still starting must not kill it (SIGTERM's default action, before the handler is
installed) nor be lost: the Studio writes `stop.request` first and signals only once the job has written `job.ready`
(after installing its handler); the job reads `stop.request` after writing `job.ready`. Whichever order the two
sides run in, one of them sees the other's file.

The job writes only inside its run directory: the config's train.output_dir must lie inside it (the Studio sets
it to RUN_DIR/out), and the process runs with the run directory as its working directory.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time
import traceback
from pathlib import Path

EVENTS = "events.jsonl"
CONFIG = "config.yaml"
PID = "job.pid"
READY, STOP_REQUEST = "job.ready", "stop.request"   # see the module docstring
STOPPED, FAILED = 130, 1     # exit statuses (0: finished), as `velotune train` gives them


class EventFile:
    """events.jsonl, one flushed line per event, numbered so a reader can continue where it stopped."""

    def __init__(self, path: Path):
        self.file = open(path, "a", encoding="utf-8")

    def write(self, kind: str, **fields):
        record = {"kind": kind, "time": time.time(), **fields}
        self.file.write(json.dumps(record, default=str) + "\n")
        self.file.flush()

    def on_event(self, event):
        self.write(event.kind, step=event.step, total_steps=event.total_steps, metrics=event.metrics,
                   path=str(event.path) if event.path else None)


def output_inside(config_path: Path, run_dir: Path) -> Path:
    """The config's output directory, refused unless it lies inside the run directory."""
    from ..config import load_config
    from ..errors import ConfigError
    cfg = load_config(str(config_path))
    out = (run_dir / cfg.train.output_dir).resolve()
    if out != run_dir and run_dir not in out.parents:
        raise ConfigError(f"{config_path}: train.output_dir {cfg.train.output_dir!r} lies outside the run "
                          f"directory {run_dir}; a Studio job writes only inside its run directory")
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="velotune.studio.job_runner")
    parser.add_argument("run_dir")
    parser.add_argument("--resume", action="store_true")
    ns = parser.parse_args(argv)
    run_dir = Path(ns.run_dir).resolve()
    os.chdir(run_dir)
    (run_dir / PID).write_text(str(os.getpid()))
    events = EventFile(run_dir / EVENTS)
    stop = threading.Event()

    def ask_stop(signum, frame):
        stop.set()
    signal.signal(signal.SIGTERM, ask_stop)
    signal.signal(signal.SIGINT, ask_stop)
    (run_dir / READY).write_text(str(os.getpid()))
    if (run_dir / STOP_REQUEST).exists():   # asked before the handler was there
        stop.set()
    try:
        output_inside(run_dir / CONFIG, run_dir)
        from ..training.trainer import train
        events.write("launched", resume=ns.resume)
        overrides = ["train.resume=true"] if ns.resume else []
        result = train(str(run_dir / CONFIG), overrides=overrides, callbacks=[events.on_event], stop=stop)
    except BaseException as exc:   # every end is recorded: the page shows why a job ended
        from ..errors import VelotuneError
        message = str(exc) if isinstance(exc, VelotuneError) else f"{type(exc).__name__}: {exc}"
        if not isinstance(exc, VelotuneError):
            traceback.print_exc()
        events.write("failed", error=message)
        return FAILED
    if result.interrupted:
        return STOPPED
    events.write("outputs", adapter_dir=str(result.adapter_dir) if result.adapter_dir else None,
                 model_dir=str(result.model_dir) if result.model_dir else None,
                 final_loss=result.final_loss, eval_loss=result.eval_loss,
                 tokens_per_second=result.tokens_per_second)
    return 0


if __name__ == "__main__":
    sys.exit(main())
