"""Checkpoints of sharded (FSDP2) runs, and whole parameters gathered for the final adapter / model files.

A sharded checkpoint is `checkpoints/step-000123/` holding `sharded/` (torch.distributed.checkpoint: each rank
writes its shards of the trainable parameters and their optimizer state, keyed by parameter name), `trainer.pt`
(scheduler, loss scaler, every rank's RNG) and `state.json`. Because the shards are saved by name with their
global shapes, the same checkpoint loads on any number of processes, in one process, or under DDP.
Like the usual checkpoint it is written under a temporary name (all ranks write into it) and renamed by rank 0.
"""
from __future__ import annotations

import json
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from ..errors import CheckpointError
from ..models.checkpoint import atomic_dir
from .state import CHECKPOINTS, TrainState, prune_checkpoints, read_checkpoint_files, set_rng_state

SHARDED_DIR = "sharded"
TRAINER_FILE = "trainer.pt"


def is_sharded_checkpoint(path) -> bool:
    return (Path(path) / SHARDED_DIR).is_dir()


def _options(ignore_frozen: bool = True, **kw):
    from torch.distributed.checkpoint.state_dict import StateDictOptions
    # Checkpoints hold the trainable part only: frozen base weights live in the model files.
    return StateDictOptions(ignore_frozen_params=ignore_frozen, **kw)


def save_sharded_checkpoint(ctx, out_dir, state: TrainState, model, optimizer, scheduler, scaler, keep_last: int,
                            rng: dict) -> Path:
    """All ranks call. Rank 0 opens the temporary directory, every rank writes its shards into it (a failure
    there is raised on every rank by torch.distributed.checkpoint), then rank 0 adds the rest and renames it."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict
    final = Path(out_dir) / CHECKPOINTS / f"step-{state.step:06d}"
    pending = atomic_dir(final, overwrite=True) if ctx.is_main else None
    tmp = Path(ctx.on_main(lambda: str(pending.__enter__())))
    try:
        model_state, optim_state = get_state_dict(model, optimizer, options=_options())
        dcp.save({"model": model_state, "optimizer": optim_state}, checkpoint_id=str(tmp / SHARDED_DIR))
    except BaseException as exc:
        if pending is not None:
            pending.__exit__(type(exc), exc, None)  # removes the temporary directory
        raise

    def finish():
        try:
            torch.save({"scheduler": scheduler.state_dict(),
                        "scaler": scaler.state_dict() if scaler is not None else None, "rng": rng},
                       tmp / TRAINER_FILE)
            (tmp / "state.json").write_text(json.dumps(state.to_json(), indent=2), encoding="utf-8")
        except BaseException as exc:
            pending.__exit__(type(exc), exc, None)
            raise
        pending.__exit__(None, None, None)  # the rename into place
        prune_checkpoints(out_dir, keep_last)
    ctx.on_main(finish)
    return final


def load_sharded_checkpoint(path, model, optimizer, scheduler, scaler=None) -> TrainState:
    """Loads a sharded checkpoint into a sharded, DDP or plain model (no process group needed for one)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    path = Path(path)
    model_state, optim_state = get_state_dict(model, optimizer, options=_options())
    target = {"model": model_state, "optimizer": optim_state}
    try:
        with warnings.catch_warnings():  # loading in one process is intended, not a mistake worth a warning
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load(target, checkpoint_id=str(path / SHARDED_DIR))
        extra = torch.load(path / TRAINER_FILE, map_location="cpu", weights_only=False)
        state = TrainState(**json.loads((path / "state.json").read_text(encoding="utf-8")))
    except (Exception, dcp.CheckpointException) as exc:  # the latter is a BaseException
        raise CheckpointError(f"{path}: cannot read sharded checkpoint; was it written with different "
                              f"lora/finetune settings? ({_last_line(exc)})") from None
    # Not strict: the checkpoint holds the trainable part only (dcp.load above already failed on a missing key).
    set_state_dict(model, optimizer, model_state_dict=target["model"], optim_state_dict=target["optimizer"],
                   options=_options(strict=False))
    _load_trainer_extra(extra, scheduler, scaler)
    return state


def load_full_checkpoint_sharded(path, model, optimizer, scheduler, scaler=None) -> TrainState:
    """Loads a usual (one-process or DDP) checkpoint into a sharded model: each rank keeps its shards."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict
    path = Path(path)
    tensors, extra, state = read_checkpoint_files(path)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    wrong = sorted(set(tensors) ^ trainable)
    if wrong:
        raise CheckpointError(f"{path}: checkpoint tensors do not match the model's trainable parameters "
                              f"(e.g. {wrong[0]}); was it written with different lora/finetune settings?")
    set_model_state_dict(model, tensors, options=_options(full_state_dict=True, strict=False))
    set_optimizer_state_dict(model, optimizer, _optimizer_state_by_name(model, optimizer, extra["optimizer"], path),
                             options=_options(full_state_dict=True))
    _load_trainer_extra(extra, scheduler, scaler)
    return state


def _optimizer_state_by_name(model, optimizer, saved: dict, path) -> dict:
    """A torch optimizer state dict numbers parameters in the order of its groups; the sharded loader wants
    names. Our optimizer is built the same way in every run, so position i is the same parameter."""
    names = {id(p): n for n, p in model.named_parameters()}
    current = [names[id(p)] for group in optimizer.param_groups for p in group["params"]]
    saved_ids = [i for group in saved["param_groups"] for i in group["params"]]
    if len(saved_ids) != len(current):
        raise CheckpointError(f"{path}: the optimizer state holds {len(saved_ids)} parameters, the model trains "
                              f"{len(current)}")
    by_id = dict(zip(saved_ids, current))
    return {"state": {by_id[i]: s for i, s in saved["state"].items()},
            "param_groups": [{**g, "params": [by_id[i] for i in g["params"]]} for g in saved["param_groups"]]}


def _load_trainer_extra(extra: dict, scheduler, scaler):
    scheduler.load_state_dict(extra["scheduler"])
    if scaler is not None and extra.get("scaler"):
        scaler.load_state_dict(extra["scaler"])
    set_rng_state(extra["rng"])


def _last_line(exc) -> str:
    """The root cause: a CheckpointException carries each rank's traceback, its error on the last line."""
    lines = [line for line in str(exc).strip().splitlines() if line.strip()]
    return lines[-1].strip() if lines else type(exc).__name__


@contextmanager
def gathered_parameters(model: nn.Module, trainable_only: bool):
    """Every rank takes part in gathering; on rank 0 the sharded parameters are swapped for whole CPU tensors
    (fp32 master weights, not the bf16 compute copies) until the block ends, so the usual writers work."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict
    full = get_model_state_dict(model, options=_options(trainable_only, full_state_dict=True, cpu_offload=True))
    swapped = []
    for name, tensor in full.items():
        owner, _, leaf = name.rpartition(".")
        module = model.get_submodule(owner) if owner else model
        old = module._parameters.get(leaf)
        if old is None:  # a buffer: never sharded
            continue
        module._parameters[leaf] = nn.Parameter(tensor, requires_grad=old.requires_grad)
        swapped.append((module, leaf, old))
    try:
        yield
    finally:
        for module, leaf, old in swapped:
            module._parameters[leaf] = old
