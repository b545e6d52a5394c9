"""Training jobs of the Studio: each run is a directory under the Studio's runs/ and, while it trains, a process
of its own (job_runner.py), so that the server never blocks on training and a crashed job cannot take the
server down.

A run's state is read from its directory, not kept in memory: the job's pid file tells whether it still runs,
and its events.jsonl what it did. So the Studio can restart while a job trains and find it again.

    created -> running -> finished | stopped (checkpoint written; resumable) | failed | interrupted
"""
from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

from ..errors import VelotuneError
from ..models.checkpoint import process_alive as pid_alive
from .job_runner import CONFIG, EVENTS, PID, READY, STOP_REQUEST

log = logging.getLogger("velotune")

RUNNING, FINISHED, STOPPED, FAILED, INTERRUPTED, CREATED = (
    "running", "finished", "stopped", "failed", "interrupted", "created")
ENDING_EVENTS = {"finished": FINISHED, "outputs": FINISHED, "stopped": STOPPED, "failed": FAILED}
LOG = "job.log"


class JobError(VelotuneError):
    """A run or export cannot be done as asked (a 400)."""


class NoSuchRun(JobError):
    """No run has this id (a 404)."""


class JobBusy(JobError):
    """The run, or the Studio, is busy with another job (a 409)."""


class EventTail:
    """Reads events.jsonl from event `after` on, then only what was appended since the last read: a page watching
    a long run costs a few bytes per poll, not a re-read of the whole file."""

    def __init__(self, run_dir: Path, after: int = 0):
        self.path = Path(run_dir) / EVENTS
        self.next_id, self.offset, self.skip = 0, 0, max(0, after)

    def read(self) -> list[dict]:
        if not self.path.is_file():
            return []
        events = []
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            for raw in f:
                if not raw.endswith(b"\n"):   # a line still being written: read it next time
                    break
                self.offset += len(raw)
                number, self.next_id = self.next_id, self.next_id + 1
                if number < self.skip:
                    continue
                try:
                    events.append({"id": number, **json.loads(raw)})
                except ValueError:
                    events.append({"id": number, "kind": "unreadable"})
        return events


def read_events(run_dir: Path, after: int = 0) -> list[dict]:
    """The events from line `after` on (a line still being written is left for the next read)."""
    return EventTail(run_dir, after).read()


class Jobs:
    """Starts, stops and watches the job processes of the runs in `runs_dir`."""

    def __init__(self, runs_dir: Path, store, max_running: int = 1):
        self.runs_dir, self.store, self.max_running = Path(runs_dir), store, max_running
        self.processes: dict[str, subprocess.Popen] = {}
        self._lock = threading.Lock()

    def run_dir(self, run_id: str) -> Path:
        if not run_id or "/" in run_id or run_id.startswith(".") or self.store.run(run_id) is None:
            raise NoSuchRun(f"no run {run_id!r}")
        return self.runs_dir / run_id

    def create(self, name: str, model_ref: str, data_ref: str, config_yaml: str) -> str:
        run_id = self.store.add_run(name, model_ref, data_ref, config_yaml)
        run_dir = self.runs_dir / run_id
        run_dir.mkdir(parents=True)
        tmp = run_dir / f".{CONFIG}.tmp"
        tmp.write_text(config_yaml, encoding="utf-8")
        os.replace(tmp, run_dir / CONFIG)
        return run_id

    def start(self, run_id: str, resume: bool = False):
        run_dir = self.run_dir(run_id)
        with self._lock:
            if self.status(run_id) == RUNNING:
                raise JobBusy(f"run {run_id} is already running")
            if resume and not self.resumable(run_id):
                raise JobError(f"run {run_id} has no checkpoint to resume from")
            running = [r["id"] for r in self.store.runs() if r["id"] != run_id and self.status(r["id"]) == RUNNING]
            if len(running) >= self.max_running:
                raise JobBusy(f"run {running[0]} is training: this Studio trains {self.max_running} job(s) at once "
                               "(--max-jobs); stop it or wait for it to finish")
            for name in (PID, READY, STOP_REQUEST):   # the last process's
                (run_dir / name).unlink(missing_ok=True)
            log_file = open(run_dir / LOG, "ab")
            env = {**os.environ, "PYTHONUNBUFFERED": "1"}
            command = [sys.executable, "-m", "velotune.studio.job_runner", str(run_dir)] + (["--resume"] if resume
                                                                                          else [])
            process = subprocess.Popen(command, cwd=run_dir, stdout=log_file, stderr=subprocess.STDOUT,
                                       stdin=subprocess.DEVNULL, env=env, start_new_session=True)
            log_file.close()
            (run_dir / PID).write_text(str(process.pid))
            self.processes[run_id] = process
            self.store.update_run(run_id, status=RUNNING)
        threading.Thread(target=self._watch, args=(run_id, process), daemon=True,
                         name=f"studio-job-{run_id}").start()

    def _watch(self, run_id: str, process: subprocess.Popen):
        process.wait()
        with self._lock:
            if self.processes.get(run_id) is process:
                del self.processes[run_id]
        self.store.update_run(run_id, status=self.status(run_id), summary=self.summary(run_id))

    def stop(self, run_id: str):
        """Asks the job to stop after its current step (it writes a checkpoint first). A job still starting reads
        the request itself once it can stop cleanly (job_runner's docstring)."""
        run_dir = self.run_dir(run_id)
        pid = self._pid(run_id)
        if pid is None or not pid_alive(pid):
            raise JobBusy(f"run {run_id} is not running")
        (run_dir / STOP_REQUEST).write_text("")
        if (run_dir / READY).exists():
            os.kill(pid, signal.SIGTERM)

    def _pid(self, run_id: str) -> int | None:
        process = self.processes.get(run_id)
        if process is not None:
            return process.pid if process.poll() is None else None
        try:
            return int((self.runs_dir / run_id / PID).read_text())
        except (OSError, ValueError):
            return None

    def status(self, run_id: str) -> str:
        run_dir = self.runs_dir / run_id
        pid = self._pid(run_id)
        if pid is not None and pid_alive(pid) and (self.processes.get(run_id) is not None
                                                   or _is_job_of(pid, run_dir)):
            return RUNNING
        events = read_events(run_dir)
        for event in reversed(events):
            if event["kind"] in ENDING_EVENTS:
                return ENDING_EVENTS[event["kind"]]
            if event["kind"] == "launched":
                return INTERRUPTED   # launched, never ended: killed or crashed hard
        return CREATED

    def checkpoints(self, run_id: str) -> list[Path]:
        ckpt = self.runs_dir / run_id / "out" / "checkpoints"
        return sorted(p for p in ckpt.glob("step-*") if p.is_dir()) if ckpt.is_dir() else []

    def resumable(self, run_id: str) -> bool:
        return self.status(run_id) in (STOPPED, INTERRUPTED, FAILED) and bool(self.checkpoints(run_id))

    def summary(self, run_id: str) -> dict:
        """The last metrics, steps and outputs of a run (for the runs list)."""
        summary: dict = {}
        for event in read_events(self.runs_dir / run_id):
            kind = event["kind"]
            if kind == "step":
                summary.update(step=event["step"], total_steps=event["total_steps"],
                               loss=event["metrics"].get("loss"))
            elif kind == "start":
                summary.update(step=event["step"], total_steps=event["total_steps"])
            elif kind == "eval":
                summary.update({k: v for k, v in event["metrics"].items()})
            elif kind == "outputs":
                summary.update(adapter_dir=event.get("adapter_dir"), model_dir=event.get("model_dir"),
                               final_loss=event.get("final_loss"))
            elif kind == "failed":
                summary["error"] = event.get("error")
        return summary

    def close(self):
        """Running jobs go on when the Studio stops; they are found again by their pid files."""
        self.processes.clear()


def _is_job_of(pid: int, run_dir: Path) -> bool:
    """Whether `pid` is this run's job (a pid left in a file may have been reused by another process)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return True   # no /proc to ask: trust the pid file
    return b"velotune.studio.job_runner" in cmdline and str(run_dir).encode() in cmdline
