"""TrainState and checkpoints.

A checkpoint is a directory `checkpoints/step-000123/` holding the trainable tensors (`trainable.safetensors`), the
optimizer, scheduler, loss-scaler and RNG states (`optimizer.json` + `optimizer.safetensors`, see state_codec),
`state.json`, and what the objective keeps between steps when it keeps anything (`objective.json` +
`objective.safetensors`: GRPO's batch of samples for its next num_iterations steps). Nothing in it is pickled, so
reading a checkpoint cannot run code. It is written under a temporary name and renamed into place, so a crash at
any moment leaves either the previous checkpoint or the new one.
A resume checks every tensor and state against the run before it changes anything (state_checks).
"""
from __future__ import annotations

import json
import logging
import random
import shutil
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch

from ..errors import CheckpointError
from ..models.checkpoint import atomic_dir
from .state_checks import (check_like, check_optimizer_state, check_rng_state, check_trainable_tensors,
                           optimizer_param_names)
from .state_codec import read_json, read_safetensors, read_state, write_state

log = logging.getLogger("velotune")
CHECKPOINTS = "checkpoints"
# Beside the step-NNNNNN checkpoints, what a run computed before step 1 and must read back on resume (preference
# objectives' precomputed reference log-probs).
REFERENCE_CACHE = "reference_logps.safetensors"
TRAINABLE_FILE = "trainable.safetensors"
OPTIMIZER_STEM = "optimizer"  # optimizer.json + optimizer.safetensors
STATE_FILE = "state.json"
OBJECTIVE_STEM = "objective"  # objective.json + objective.safetensors: {"per_rank": [each rank's state_dict()]}
IMPLEMENTATION_FLAGS = ("fused", "foreach", "capturable", "differentiable")  # torch optimizer group keys
# Files of older velotune checkpoints (pickles: reading one could run code) -> the file that replaced each.
OLD_FORMAT_FILES = {"optimizer.pt": "optimizer.json", "trainer.pt": "trainer.json",
                    "sharded/.metadata": "sharded/index.json"}


@dataclass
class TrainState:
    step: int = 0                 # optimizer steps done
    epoch: int = 0                # data epoch the next batch comes from
    batch_in_epoch: int = 0       # micro-batches of that epoch already consumed
    rows_in_epoch: int = 0        # rows of that epoch consumed by all processes: resumes with another batch size
                                  # or number of processes (distributed.py)
    tokens_seen: int = 0          # real target tokens trained on

    def to_json(self) -> dict:
        return asdict(self)


def trainable_state(model) -> dict:
    return {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict, rank: int = 0):
    """Restores the RNG states; `rank`: this process's rank, which picks its own states from a multi-process
    checkpoint."""
    per_rank = state.get("per_rank")
    if per_rank:  # a multi-process run keeps every rank's RNG; a rank it did not have keeps its own seeding
        if rank >= len(per_rank):
            return
        state = per_rank[rank]
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(out_dir: Path, state: TrainState, model, optimizer, scheduler, scaler=None,
                    keep_last: int = 2, rng: dict | None = None, objective_states: list | None = None) -> Path:
    """`rng`: the RNG states at the step boundary `state` describes (default: now). `objective_states`: each
    rank's Objective.state_dict() at that boundary (nothing written when all are empty)."""
    from safetensors.torch import save_file
    final = Path(out_dir) / CHECKPOINTS / f"step-{state.step:06d}"
    with atomic_dir(final, overwrite=True) as tmp:
        save_file(trainable_state(model), str(tmp / TRAINABLE_FILE))
        write_state(tmp, OPTIMIZER_STEM, {
            "optimizer": optimizer.state_dict(), "optimizer_class": type(optimizer).__name__,
            **trainer_extra(scheduler, scaler, rng if rng is not None else rng_state())})
        write_train_state(tmp, state)
        write_objective_state(tmp, objective_states)
    prune_checkpoints(out_dir, keep_last)
    return final


def write_objective_state(directory: Path, per_rank: list | None):
    """The objective's kept state of every rank, inside the checkpoint's temporary directory (so atomic with it)."""
    if per_rank and any(per_rank):
        write_state(directory, OBJECTIVE_STEM, {"per_rank": list(per_rank)})


def load_objective_state(path: Path, objective, *, rank: int = 0, world_size: int = 1) -> None:
    """Hands this rank's kept state of checkpoint `path` to `objective.load_state_dict`; nothing when the checkpoint
    has none. Another number of processes splits the data otherwise: the state is then left out (with a warning),
    and the objective starts afresh (GRPO samples those batches again)."""
    path = Path(path)
    source = path / f"{OBJECTIVE_STEM}.json"
    if not source.is_file():
        return
    data = read_state(path, OBJECTIVE_STEM)
    if type(data) is not dict or set(data) != {"per_rank"} or type(data["per_rank"]) is not list \
            or not all(type(s) is dict for s in data["per_rank"]):
        raise CheckpointError(f"{source}: expected {{'per_rank': [one state per process]}}")
    per_rank = data["per_rank"]
    if len(per_rank) != world_size:
        log.warning("resume: %s holds the objective's state of %d process(es), this run has %d; it is not used "
                    "(what it kept is computed again)", source, len(per_rank), world_size)
        return
    objective.load_state_dict(per_rank[rank], source=str(source))


def trainer_extra(scheduler, scaler, rng: dict) -> dict:
    """The scheduler, loss-scaler and RNG part of a checkpoint (shared with sharded checkpoints)."""
    return {"scheduler": scheduler.state_dict(), "scaler": scaler.state_dict() if scaler is not None else None,
            "rng": rng}


def write_train_state(directory: Path, state: TrainState):
    (Path(directory) / STATE_FILE).write_text(json.dumps(state.to_json(), indent=2), encoding="utf-8")


def read_train_state(path: Path) -> TrainState:
    """`state.json` of a checkpoint, its fields checked by name and kind."""
    file = Path(path) / STATE_FILE
    data = read_json(file)
    if type(data) is not dict:
        raise CheckpointError(f"{file}: expected a JSON object of training-state fields")
    known = {f.name for f in fields(TrainState)}
    for key, value in data.items():
        if key not in known:
            raise CheckpointError(f"{file}: unknown field {key!r} (known: {', '.join(sorted(known))})")
        if not (type(value) is int and value >= 0):
            raise CheckpointError(f"{file}: {key}: unexpected value {value!r}")
    return TrainState(**data)


def list_checkpoints(out_dir: Path) -> list[Path]:
    root = Path(out_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-")
                  and (p / STATE_FILE).is_file())


def prune_checkpoints(out_dir: Path, keep_last: int):
    for old in list_checkpoints(out_dir)[:-max(1, keep_last)]:
        shutil.rmtree(old, ignore_errors=True)


def refuse_old_format(path: Path):
    """Older checkpoints pickled their states; unpickling can run any code, so they are never read."""
    for old, new in OLD_FORMAT_FILES.items():
        if (Path(path) / old).exists() and not (Path(path) / new).exists():
            raise CheckpointError(f"{Path(path) / old}: written by an older velotune in a format that can run "
                                  f"code; not read (start the run again, or train on from its adapter / model)")


def read_checkpoint_files(path: Path):
    """(trainable tensors, optimizer/scheduler/scaler/RNG states, TrainState) of a one-process or DDP checkpoint."""
    path = Path(path)
    refuse_old_format(path)
    tensors = read_safetensors(path / TRAINABLE_FILE)
    extra = read_state(path, OPTIMIZER_STEM)
    source = path / f"{OPTIMIZER_STEM}.json"
    if type(extra) is not dict or not {"optimizer", "optimizer_class", "scheduler", "scaler", "rng"} <= set(extra):
        raise CheckpointError(f"{source}: expected the keys optimizer, optimizer_class, scheduler, scaler, rng")
    return tensors, extra, read_train_state(path)


def load_checkpoint(path: Path, model, optimizer, scheduler, scaler=None, *, local_piece=None,
                    rank: int = 0) -> TrainState:
    """Restores trainable tensors, optimizer, scheduler and RNG states; returns the TrainState.
    `local_piece`, `rank`: see `restore`."""
    path = Path(path)
    tensors, extra, state = read_checkpoint_files(path)
    optimizer_file = str(path / f"{OPTIMIZER_STEM}.json")
    restore(model, optimizer, scheduler, scaler, tensors, extra, tensors_file=str(path / TRAINABLE_FILE),
            optimizer_file=optimizer_file, trainer_file=optimizer_file, local_piece=local_piece, rank=rank)
    return state


def restore(model, optimizer, scheduler, scaler, tensors: dict, extra: dict, *, tensors_file: str,
            optimizer_file: str, trainer_file: str, local_piece=None, rank: int = 0):
    """Checks every checkpoint tensor and state against the run, then copies them in: a checkpoint that does not
    fit changes nothing. The *_file names (of the trainable tensors, the optimizer state, the scheduler / scaler /
    RNG states) go into the errors. `local_piece(value, like)` gives the part of checkpoint tensor `value` this
    process keeps for parameter `like` (None: the whole tensor); by default the tensor itself (no sharding).
    `rank`: this process's rank in the job, whose RNG states it takes."""
    params = check_trainable_tensors(tensors_file, tensors, model)
    check_optimizer_state(optimizer_file, extra["optimizer"], extra["optimizer_class"], optimizer,
                          optimizer_param_names(model, optimizer))
    check_like(extra["scheduler"], scheduler.state_dict(), f"{trainer_file}: scheduler")
    if scaler is not None and extra["scaler"] is not None:
        check_like(extra["scaler"], scaler.state_dict(), f"{trainer_file}: scaler")
    check_rng_state(extra["rng"], f"{trainer_file}: rng")
    piece = local_piece or (lambda value, like: value)
    values = {name: piece(tensors[name], param) for name, param in params.items()}
    optimizer_state = _local_optimizer_state(extra["optimizer"], optimizer, piece)
    with torch.no_grad():
        for name, value in values.items():
            params[name].copy_(value)
    optimizer.load_state_dict(optimizer_state)
    scheduler.load_state_dict(extra["scheduler"])
    if scaler is not None and extra["scaler"] is not None:
        scaler.load_state_dict(extra["scaler"])
    set_rng_state(extra["rng"], rank)


def _local_optimizer_state(saved: dict, optimizer, piece) -> dict:
    """The saved optimizer state with each tensor shaped like its parameter replaced by this process's part."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    ids = [i for group in saved["param_groups"] for i in group["params"]]
    param_of = dict(zip(ids, params))

    def local(value, param):
        if isinstance(value, torch.Tensor):
            shaped_like = value.dim() > 0 and value.shape == param.shape
            return piece(value, param if shaped_like else None)
        if type(value) is dict:
            return {k: local(v, param) for k, v in value.items()}
        return value
    # How the update runs (fused kernel or per-tensor loop) follows this run's tensors (DTensors or plain), not the
    # run that saved: torch's load_state_dict would otherwise take the saved flags.
    groups = [{**saved_group, **{k: group[k] for k in IMPLEMENTATION_FLAGS if k in group}}
              for saved_group, group in zip(saved["param_groups"], optimizer.param_groups)]
    return {"state": {pid: local(entry, param_of[pid]) for pid, entry in saved["state"].items()},
            "param_groups": groups}
