"""The run's output directory: what a run writes there, what it may replace, and the checks made before any
weights load.

A run replaces only what a velotune run wrote: the outputs its run.json lists (and inside the adapter / model
directories, what atomic_dir's manifest lists). It never removes the user's files, never writes into or over its
own input model, and refuses a non-empty directory that holds no run unless train.overwrite is set.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ConfigError
from .state import CHECKPOINTS, REFERENCE_CACHE, list_checkpoints

log = logging.getLogger("velotune")

RUN_FILE = "run.json"
METRICS_FILE = "metrics.jsonl"
TENSORBOARD = "tensorboard"
TENSORBOARD_EVENTS = "events.out.tfevents.*"


def output_names(cfg, objective=None) -> list[str]:
    """The entries of output_dir this run writes, as run.json lists them (the objective names its own outputs)."""
    lora = cfg.finetune.method == "lora"
    own = objective.output_names(lora) if objective is not None else ["adapter" if lora else "model"]
    names = [RUN_FILE, METRICS_FILE, CHECKPOINTS, *own]
    return names + [TENSORBOARD] if TENSORBOARD in (cfg.train.report_to or []) else names


@dataclass
class OutputDir:
    path: Path
    outputs: list[str]                                  # what this run writes there
    resume_from: Path | None = None                     # the checkpoint this run continues from
    replaces: list[str] = field(default_factory=list)   # a previous run's outputs that this run replaces
    status: str = "new"                                 # new | resume | replace | beside (the user's files)

    def describe(self) -> str:
        return {"new": f"{self.path} (new)",
                "resume": f"{self.path} (continues from {self.resume_from})",
                "replace": f"{self.path} (replaces the previous run there)",
                "beside": f"{self.path} (beside files velotune did not write: kept)"}[self.status]


# ---- checks (nothing is written) -------------------------------------------------------------------------------

def check_not_input_model(model_dir, out_dir: Path, outputs: list[str]):
    """Refuses an output_dir that is, or is inside, the input model directory, and a model directory that is one
    of the run's outputs (or inside one): the run would write into or over its own input."""
    if model_dir is None:
        return
    model, out = Path(model_dir).resolve(), Path(out_dir).resolve()
    if out == model or model in out.parents:
        raise ConfigError(f"train.output_dir: {out_dir} is inside the base model directory {model_dir} "
                          f"(model.path): choose an output_dir outside it")
    for name in outputs:
        output = out / name
        if model == output or output in model.parents:
            raise ConfigError(f"model.path: {model_dir} is this run's output {output}: training would write over "
                              f"its own input model; choose another train.output_dir")


def inspect_output_dir(out_dir: Path, tcfg, outputs: list[str]) -> OutputDir:
    """What this run will do with output_dir: start, continue, replace a previous run, or write beside the user's
    files (train.overwrite). Refuses what would mix runs or touch files velotune did not write."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"train.output_dir: {out_dir} is a file, not a directory")
    entries = sorted(p.name for p in out_dir.iterdir()) if out_dir.is_dir() else []
    run, checkpoints = read_run_file(out_dir), list_checkpoints(out_dir)
    plan = OutputDir(out_dir, outputs)
    if tcfg.resume and checkpoints:
        plan.resume_from, plan.status = checkpoints[-1], "resume"
        return plan
    if tcfg.resume:
        log.warning("train.resume: no checkpoint in %s; starting from the beginning", out_dir)
    if not entries:
        return plan
    if run is not None or checkpoints:
        if not (tcfg.overwrite or tcfg.resume):
            raise ConfigError(f"train.output_dir: {out_dir} holds another run; set train.resume=true to continue "
                              f"it or train.overwrite=true to replace it")
        plan.replaces = list(run.get("outputs") or outputs) if run is not None else [CHECKPOINTS]
        plan.status = "replace"
    elif not tcfg.overwrite:
        raise ConfigError(f"train.output_dir: {out_dir} is not empty and holds no velotune run "
                          f"({_few(entries)}); choose another directory, or set train.overwrite=true to write the "
                          f"run there (files velotune did not write are kept)")
    else:
        plan.status = "beside"
    _refuse_users_files(out_dir, outputs, plan.replaces)
    return plan


def _refuse_users_files(out_dir: Path, outputs: list[str], ours: list[str]):
    """A file under one of the run's file names that no run wrote is the user's: never replaced. Directories
    are fine: the run writes only its own entries in them."""
    for name in outputs:
        path = out_dir / name
        if name in ours or not os.path.lexists(path):
            continue
        if name in (RUN_FILE, METRICS_FILE) or not path.is_dir():
            raise ConfigError(f"train.output_dir: {path} is not written by a velotune run and the run would "
                              f"replace it; move it away or choose another output_dir")


def _few(names: list[str], n: int = 4) -> str:
    return ", ".join(names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "")


def probe_writable(out_dir: Path):
    """Creates output_dir (and its parents) and a file in it, then removes what it made: a directory that
    cannot be written is reported before any weights load, and the check leaves nothing behind."""
    out_dir = Path(out_dir)
    missing = [d for d in (out_dir, *out_dir.parents) if not d.exists()]
    created = []
    try:
        for directory in reversed(missing):
            directory.mkdir()
            created.append(directory)
        probe = out_dir / f".velotune-probe-{os.getpid()}"
        probe.write_bytes(b"probe")
        probe.unlink()
    except OSError as exc:
        raise ConfigError(f"train.output_dir: cannot write to {out_dir} ({exc.strerror or exc}); choose a "
                          f"directory you can write to") from None
    finally:
        for directory in reversed(created):
            directory.rmdir()


# ---- changes (rank 0, once every check passed) -----------------------------------------------------------------

def prepare_output_dir(plan: OutputDir, run_info: dict):
    """Creates output_dir, removes what killed writers left and the previous run's outputs this run replaces,
    and writes run.json (the list of this run's outputs) before anything else."""
    from ..models.checkpoint import remove_stale_temporaries
    plan.path.mkdir(parents=True, exist_ok=True)
    for directory in (plan.path, plan.path / CHECKPOINTS):
        remove_stale_temporaries(directory)
    for name in plan.replaces:
        _remove_previous(plan.path, name, plan.outputs)
    write_run_file(plan.path, run_info)


def _remove_previous(out_dir: Path, name: str, outputs: list[str]):
    path = out_dir / name
    if name == METRICS_FILE:
        path.unlink(missing_ok=True)
    elif name == CHECKPOINTS:
        for checkpoint in list_checkpoints(out_dir):
            shutil.rmtree(checkpoint)
        (path / REFERENCE_CACHE).unlink(missing_ok=True)
        _remove_if_empty(path)
    elif name == TENSORBOARD and path.is_dir():
        for events in path.glob(TENSORBOARD_EVENTS):
            events.unlink()
        _remove_if_empty(path)
    elif name in ("adapter", "model") and name not in outputs and path.exists():
        log.warning("%s: the previous run's %s is kept (this run writes no %s); remove it if it is not wanted",
                    path, name, name)


def _remove_if_empty(path: Path):
    if path.is_dir() and not any(path.iterdir()):
        path.rmdir()


def read_run_file(out_dir: Path) -> dict | None:
    """run.json when a velotune run wrote it (a JSON object with its config), else None."""
    try:
        info = json.loads((Path(out_dir) / RUN_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) and isinstance(info.get("config"), dict) else None


def write_run_file(out_dir: Path, info: dict):
    """run.json, written under a temporary name and renamed: never half a file."""
    tmp = Path(out_dir) / f".{RUN_FILE}.tmp-{os.getpid()}-w"
    tmp.write_text(json.dumps(info, indent=2, default=str), encoding="utf-8")
    os.replace(tmp, Path(out_dir) / RUN_FILE)


@contextmanager
def tokenizer_template(tokenizer, template: str | None):
    """The tokenizer with `template` as its chat template for the time of a save, then as it was: the outputs
    carry the template the data was rendered with, and the caller's tokenizer is left unchanged."""
    if template is None:
        yield tokenizer
        return
    previous = tokenizer.chat_template
    tokenizer.chat_template = template
    try:
        yield tokenizer
    finally:
        tokenizer.chat_template = previous
