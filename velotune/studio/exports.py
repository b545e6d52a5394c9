"""Exports of a finished run (merged checkpoint, PEFT adapter, GGUF), each written by `velotune export` in a
process of its own into the run's exports/ directory, so that the server never blocks on it.

Each export is exports/NAME (the output) with NAME.log (what the command printed) and NAME.json (its state:
running, done or failed, with the exit status), so the list survives a Studio restart.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

from .jobs import JobBusy, JobError

FORMATS = ("merged", "adapter", "gguf")
GGUF_QUANTS = ("f16", "bf16", "f32", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1")


def export_name(fmt: str, quant: str | None) -> str:
    if fmt not in FORMATS:
        raise JobError(f"format: {fmt!r} is not one of {', '.join(FORMATS)}")
    if fmt != "gguf":
        if quant:
            raise JobError("quant: applies to the gguf format only")
        return fmt
    quant = quant or "f16"
    if quant not in GGUF_QUANTS:
        raise JobError(f"quant: {quant!r} is not one of {', '.join(GGUF_QUANTS)}")
    return f"gguf-{quant}"


def _write_state(path: Path, state: dict):
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(state), encoding="utf-8")
    os.replace(tmp, path)


def start_export(run_dir: Path, base_model: Path, adapter_dir: Path | None, fmt: str, quant: str | None) -> dict:
    """Starts `velotune export` for this run's output (`adapter_dir` over `base_model`, or `base_model` alone
    when the run trained the whole model); returns the export's state."""
    name = export_name(fmt, quant)
    if fmt == "adapter" and adapter_dir is None:
        raise JobError("format adapter: this run trained the whole model; export it merged or as GGUF")
    exports = run_dir / "exports"
    exports.mkdir(exist_ok=True)
    state_path = exports / f"{name}.json"
    if state_path.is_file() and json.loads(state_path.read_text()).get("status") == "running":
        raise JobBusy(f"the {name} export of this run is already running")
    out = exports / (f"{name}/model-{quant or 'f16'}.gguf" if fmt == "gguf" else name)
    command = [sys.executable, "-m", "velotune", "export", str(base_model), "--format", fmt, "--out", str(out),
               "--overwrite"]
    if adapter_dir is not None:
        command += ["--adapter", str(adapter_dir)]
    if fmt == "gguf":
        command += ["--quant", quant or "f16"]
    state = {"name": name, "format": fmt, "quant": quant, "status": "running", "started": time.time(),
             "output": str(out.relative_to(run_dir))}
    _write_state(state_path, state)
    with open(exports / f"{name}.log", "wb") as log_file:
        process = subprocess.Popen(command, cwd=run_dir, stdout=log_file, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, start_new_session=True)

    def watch():
        code = process.wait()
        _write_state(state_path, {**state, "status": "done" if code == 0 else "failed", "returncode": code,
                                  "ended": time.time()})
    threading.Thread(target=watch, daemon=True, name=f"studio-export-{name}").start()
    return state


def list_exports(run_dir: Path) -> list[dict]:
    exports = run_dir / "exports"
    if not exports.is_dir():
        return []
    found = []
    for path in sorted(exports.glob("*.json")):
        try:
            state = json.loads(path.read_text(encoding="utf-8"))
        except ValueError:
            continue
        log = exports / f"{state.get('name')}.log"
        if state.get("status") == "failed" and log.is_file():
            state["log_tail"] = log.read_text(encoding="utf-8", errors="replace").splitlines()[-5:]
        found.append(state)
    return found
