"""TrainState and checkpoints.

A checkpoint is a directory `checkpoints/step-000123/` holding the trainable tensors (safetensors), the optimizer,
scheduler and RNG states, and `state.json`. It is written under a temporary name and renamed into place, so a crash
at any moment leaves either the previous checkpoint or the new one, never half of one.
"""
from __future__ import annotations

import json
import random
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..errors import CheckpointError
from ..models.checkpoint import atomic_dir

CHECKPOINTS = "checkpoints"


@dataclass
class TrainState:
    step: int = 0                 # optimizer steps done
    epoch: int = 0                # data epoch the next batch comes from
    batch_in_epoch: int = 0       # micro-batches of that epoch already consumed
    rows_in_epoch: int = 0        # rows of that epoch consumed by all processes: resumes with another batch size
                                  # or number of processes (distributed.py)
    tokens_seen: int = 0          # real target tokens trained on
    best_eval_loss: float | None = None
    history: list = field(default_factory=list)

    def to_json(self) -> dict:
        return asdict(self)


def trainable_state(model) -> dict:
    return {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict):
    per_rank = state.get("per_rank")
    if per_rank:  # a multi-process run keeps every rank's RNG; a rank it did not have keeps its own seeding
        from .distributed import current_rank
        rank = current_rank()
        if rank >= len(per_rank):
            return
        state = per_rank[rank]
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(out_dir: Path, state: TrainState, model, optimizer, scheduler, scaler=None,
                    keep_last: int = 2, rng: dict | None = None) -> Path:
    """`rng`: the RNG states at the step boundary `state` describes (default: now)."""
    from safetensors.torch import save_file
    final = Path(out_dir) / CHECKPOINTS / f"step-{state.step:06d}"
    with atomic_dir(final, overwrite=True) as tmp:
        save_file(trainable_state(model), str(tmp / "trainable.safetensors"))
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                    "scaler": scaler.state_dict() if scaler is not None else None,
                    "rng": rng if rng is not None else rng_state()},
                   tmp / "optimizer.pt")
        (tmp / "state.json").write_text(json.dumps(state.to_json(), indent=2), encoding="utf-8")
    prune_checkpoints(out_dir, keep_last)
    return final


def list_checkpoints(out_dir: Path) -> list[Path]:
    root = Path(out_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-")
                  and (p / "state.json").is_file())


def prune_checkpoints(out_dir: Path, keep_last: int):
    for old in list_checkpoints(out_dir)[:-max(1, keep_last)]:
        shutil.rmtree(old, ignore_errors=True)


def read_checkpoint_files(path: Path):
    """(trainable tensors, optimizer/scheduler/RNG states, TrainState) of a one-process or DDP checkpoint."""
    from safetensors.torch import load_file
    try:
        tensors = load_file(str(path / "trainable.safetensors"))
        extra = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=False)
        state = TrainState(**json.loads((path / "state.json").read_text(encoding="utf-8")))
    except Exception as exc:
        raise CheckpointError(f"{path}: cannot read checkpoint ({type(exc).__name__}: {exc})") from None
    return tensors, extra, state


def load_checkpoint(path: Path, model, optimizer, scheduler, scaler=None) -> TrainState:
    """Restores trainable tensors, optimizer, scheduler and RNG states; returns the TrainState."""
    path = Path(path)
    tensors, extra, state = read_checkpoint_files(path)
    params = dict(model.named_parameters())
    wrong = sorted(set(tensors) ^ {n for n, p in params.items() if p.requires_grad})
    if wrong:
        raise CheckpointError(f"{path}: checkpoint tensors do not match the model's trainable parameters "
                              f"(e.g. {wrong[0]}); was it written with different lora/finetune settings?")
    with torch.no_grad():
        for name, tensor in tensors.items():
            params[name].copy_(tensor)
    optimizer.load_state_dict(extra["optimizer"])
    scheduler.load_state_dict(extra["scheduler"])
    if scaler is not None and extra.get("scaler"):
        scaler.load_state_dict(extra["scaler"])
    set_rng_state(extra["rng"])
    return state
