"""Checkpoints of sharded (FSDP2) runs, and whole parameters gathered for the final adapter / model files.

A sharded checkpoint is `checkpoints/step-000123/` holding `sharded/`: every rank writes its pieces of the trainable
parameters and of their optimizer state to `rank-00000.safetensors`, `rank-00001.safetensors`, ..., and rank 0
writes `index.json`: the state's structure (state_codec) and, for every tensor, its global shape and the rows of
dim 0 (the dim FSDP2 shards) each rank's file holds. `trainer.json` + `trainer.safetensors` hold the scheduler,
loss scaler and every rank's RNG, and `state.json` the TrainState. Nothing in it is pickled. Because each rank
reads only the rows it keeps (safetensors slices), the same checkpoint loads on any number of processes, in one
process or under DDP. Like the usual checkpoint it is written under a temporary name (all ranks write into it)
and renamed by rank 0.
"""
from __future__ import annotations

import json
from contextlib import ExitStack, contextmanager
from pathlib import Path

import torch
from torch import nn

from ..errors import CheckpointError, UnsupportedError
from ..models.checkpoint import atomic_dir
from .state import (CHECKPOINTS, TrainState, load_checkpoint, prune_checkpoints, read_train_state,
                    refuse_old_format, restore, trainer_extra, write_objective_state, write_train_state)
from .state_checks import SETTINGS_HINT, check_optimizer_groups, check_trainable_tensors, optimizer_param_names
from .state_codec import decode, encode, read_json, read_state, write_state

SHARDED_DIR = "sharded"
INDEX_FILE = "index.json"
INDEX_FORMAT = "velotune-sharded-1"
TRAINER_STEM = "trainer"  # trainer.json + trainer.safetensors


def is_sharded_checkpoint(path) -> bool:
    return (Path(path) / SHARDED_DIR).is_dir()


def rank_file(rank: int) -> str:
    return f"rank-{rank:05d}.safetensors"


def dim0_rows(tensor) -> tuple[int, int] | None:
    """Rows [start, stop) of dim 0 that this rank holds of a DTensor sharded as FSDP2 shards (torch.chunk's way:
    pieces of ceil(rows / ranks) rows, the last ones shorter or empty); None for a tensor held whole."""
    from torch.distributed.tensor import DTensor, Replicate, Shard
    if not isinstance(tensor, DTensor) or all(isinstance(p, Replicate) for p in tensor.placements):
        return None
    mesh, placement = tensor.device_mesh, tensor.placements[0]
    if mesh.ndim != 1 or not (isinstance(placement, Shard) and placement.dim == 0):
        raise UnsupportedError(f"sharded checkpoint: a tensor placed as {tuple(tensor.placements)} on a "
                               f"{mesh.ndim}-D mesh; only dim-0 sharding over one mesh dimension (FSDP2) is supported")
    rows = tensor.shape[0]
    chunk = -(-rows // mesh.size())
    start = min(mesh.get_coordinate()[0] * chunk, rows)
    stop = min(start + chunk, rows)
    if tensor.to_local().shape[0] != stop - start:
        raise UnsupportedError(f"sharded checkpoint: a shard of {tensor.to_local().shape[0]} rows where dim-0 "
                               f"chunking gives {stop - start} (rows {start}:{stop} of {rows})")
    return start, stop


# ---- saving --------------------------------------------------------------------------------------------------
def save_sharded_checkpoint(ctx, out_dir, state: TrainState, model, optimizer, scheduler, scaler, keep_last: int,
                            rng: dict, objective_states: list | None = None) -> Path:
    """All ranks call. Rank 0 opens the temporary directory, every rank writes its shards into it (a failure on
    any rank is raised on every rank), then rank 0 adds the index and the rest and renames it."""
    final = Path(out_dir) / CHECKPOINTS / f"step-{state.step:06d}"
    pending = atomic_dir(final, overwrite=True) if ctx.is_main else None
    tmp = Path(ctx.on_main(_open_pending, pending))
    try:
        try:
            tree, layout = _write_rank_file(tmp / SHARDED_DIR, ctx.rank, model, optimizer)
            report = {"layout": layout}
        except Exception as exc:  # every rank must reach the gather below, or the others would wait forever
            tree, report = None, {"error": f"{type(exc).__name__}: {exc}"}
        reports = ctx.gather_objects(report)
        failed = [(rank, r["error"]) for rank, r in enumerate(reports) if "error" in r]
        if failed:
            raise CheckpointError(f"{final}: rank {failed[0][0]} could not write its shards ({failed[0][1]})")
    except BaseException as exc:
        if pending is not None:
            pending.__exit__(type(exc), exc, None)  # removes the temporary directory
        raise

    def finish():
        try:
            index = _index(tree, [r["layout"] for r in reports])
            (tmp / SHARDED_DIR / INDEX_FILE).write_text(json.dumps(index, allow_nan=False), encoding="utf-8")
            write_state(tmp, TRAINER_STEM, trainer_extra(scheduler, scaler, rng))
            write_train_state(tmp, state)
            write_objective_state(tmp, objective_states)  # each rank's Objective.state_dict(), if any
        except BaseException as exc:
            pending.__exit__(type(exc), exc, None)
            raise
        pending.__exit__(None, None, None)  # the rename into place
        prune_checkpoints(out_dir, keep_last)
    ctx.on_main(finish)
    return final


def _open_pending(pending) -> str:
    tmp = pending.__enter__()
    try:
        (tmp / SHARDED_DIR).mkdir()
    except BaseException as exc:
        pending.__exit__(type(exc), exc, None)
        raise
    return str(tmp)


def _write_rank_file(directory: Path, rank: int, model, optimizer):
    """Writes this rank's rows of the trainable parameters and their optimizer state; returns the state's
    structure and {tensor key: {"shape": global shape, "rows": rows held here or None when held whole}}."""
    from safetensors.torch import save_file
    from torch.distributed.tensor import DTensor
    layout = {}

    def store(key: str, tensor: torch.Tensor) -> torch.Tensor:
        layout[key] = {"shape": list(tensor.shape), "rows": dim0_rows(tensor)}
        local = tensor.to_local() if isinstance(tensor, DTensor) else tensor
        return local.detach().cpu().contiguous()

    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    tree, tensors = encode({"params": trainable, "optimizer": _optimizer_state_by_name(model, optimizer),
                            "optimizer_class": type(optimizer).__name__}, store_tensor=store)

    def written_here(key: str) -> bool:  # whole tensors by rank 0, non-empty pieces by their rank
        rows = layout[key]["rows"]
        return rank == 0 if rows is None else rows[1] > rows[0]
    save_file({k: t for k, t in tensors.items() if written_here(k)}, str(directory / rank_file(rank)))
    return tree, layout


def _optimizer_state_by_name(model, optimizer) -> dict:
    """A torch optimizer state dict numbers parameters in the order of its groups; the checkpoint names them,
    so that a run with another layout (sharded or not) finds each parameter's state."""
    saved = optimizer.state_dict()
    ids = [i for group in saved["param_groups"] for i in group["params"]]
    name_of = dict(zip(ids, optimizer_param_names(model, optimizer)))
    return {"state": {name_of[i]: s for i, s in saved["state"].items()},
            "param_groups": [{**g, "params": [name_of[i] for i in g["params"]]} for g in saved["param_groups"]]}


def _index(tree, layouts: list[dict]) -> dict:
    tensors = {}
    for key, first in layouts[0].items():
        if first["rows"] is None:
            pieces = [{"rank": 0}]
        else:
            pieces = sorted(({"rank": rank, "rows": list(layout[key]["rows"])} for rank, layout in enumerate(layouts)
                             if layout[key]["rows"][1] > layout[key]["rows"][0]), key=lambda p: p["rows"][0])
        tensors[key] = {"shape": first["shape"], "pieces": pieces}
    return {"format": INDEX_FORMAT, "ranks": len(layouts), "tensors": tensors, "state": tree}


# ---- loading -------------------------------------------------------------------------------------------------
def load_sharded_checkpoint(path, model, optimizer, scheduler, scaler=None, rank: int = 0) -> TrainState:
    """Loads a sharded checkpoint into a sharded or plain model (no process group needed for one); each rank
    reads only the rows it keeps (and, by `rank`, its own RNG states). Everything is checked against the run
    before anything is copied."""
    path = Path(path)
    refuse_old_format(path)
    state = read_train_state(path)
    extra = read_state(path, TRAINER_STEM)
    if type(extra) is not dict or not {"scheduler", "scaler", "rng"} <= set(extra):
        raise CheckpointError(f"{path / (TRAINER_STEM + '.json')}: expected the keys scheduler, scaler, rng")
    with ShardedFiles(path / SHARDED_DIR) as files:
        saved, index_file = files.state, str(files.index_path)
        check_trainable_tensors(index_file, saved["params"], model)
        by_position = _optimizer_state_by_position(index_file, saved["optimizer"], optimizer,
                                                   optimizer_param_names(model, optimizer))
        restore(model, optimizer, scheduler, scaler, saved["params"],
                {**extra, "optimizer": by_position, "optimizer_class": saved["optimizer_class"]},
                tensors_file=index_file, optimizer_file=index_file,
                trainer_file=str(path / f"{TRAINER_STEM}.json"), local_piece=_local_piece(files.read),
                rank=rank)
    return state


def load_full_checkpoint_sharded(path, model, optimizer, scheduler, scaler=None, rank: int = 0) -> TrainState:
    """Loads a usual (one-process or DDP) checkpoint into a sharded model: each rank keeps its rows."""
    def read(value: torch.Tensor, rows):
        return value if rows is None else value[rows[0]:rows[1]]
    return load_checkpoint(path, model, optimizer, scheduler, scaler, local_piece=_local_piece(read), rank=rank)


def _local_piece(read):
    """`restore`'s local_piece: the rows of a checkpoint tensor this rank keeps for a (sharded) parameter, as a
    DTensor laid out like it; `read(value, rows)` reads rows [start, stop) of dim 0 (None: all of it)."""
    from torch.distributed.tensor import DTensor

    def piece(value, like):
        rows = dim0_rows(like) if like is not None else None
        local = read(value, rows)
        if not isinstance(like, DTensor):
            return local
        return DTensor.from_local(local, like.device_mesh, like.placements, run_check=False, shape=like.shape,
                                  stride=like.stride())
    return piece


def _optimizer_state_by_position(source: str, saved, optimizer, names: list[str]) -> dict:
    """The name-keyed optimizer state of a sharded checkpoint as a torch state dict of this run's optimizer."""
    groups, saved_groups = check_optimizer_groups(source, saved, optimizer)
    position = {name: i for i, name in enumerate(names)}
    out_groups, first = [], 0
    for i, (group, saved_group) in enumerate(zip(groups, saved_groups)):
        current = names[first:first + len(group["params"])]
        first += len(current)
        listed = saved_group.get("params") if type(saved_group) is dict else None
        if type(listed) is not list or any(type(n) is not str for n in listed) or sorted(listed) != sorted(current):
            differ = sorted(set(listed or []) ^ set(current)) if type(listed) is list else ["(no 'params' list)"]
            raise CheckpointError(f"{source}: optimizer.param_groups.{i}: the checkpoint's parameters differ from "
                                  f"this run's (e.g. {differ[0] if differ else 'a repeated name'}); {SETTINGS_HINT}")
        out_groups.append({**saved_group, "params": [position[n] for n in current]})
    unknown = sorted(set(saved["state"]) - set(position))
    if unknown:
        raise CheckpointError(f"{source}: optimizer.state: {unknown[0]} is not a parameter of this run; "
                              f"{SETTINGS_HINT}")
    return {"state": {position[n]: s for n, s in saved["state"].items()}, "param_groups": out_groups}


class ShardedFiles:
    """The `sharded/` directory of a checkpoint: its index, decoded with shape-only stand-ins (meta tensors) for
    the tensors, and `read(stand_in, rows)` to read rows of one from the rank files that hold them."""

    def __init__(self, directory: Path):
        self.directory = Path(directory)
        self.index_path = self.directory / INDEX_FILE
        index = read_json(self.index_path)
        if type(index) is not dict or index.get("format") != INDEX_FORMAT or type(index.get("tensors")) is not dict \
                or type(index.get("ranks")) is not int or "state" not in index:
            raise CheckpointError(f"{self.index_path}: not a velotune sharded-checkpoint index "
                                  f"(expected format {INDEX_FORMAT!r})")
        self.layout = {key: self._checked_entry(key, entry, index["ranks"]) for key, entry in index["tensors"].items()}
        stand_ins = {key: torch.empty(entry["shape"], device="meta") for key, entry in self.layout.items()}
        self._key_of = {id(t): key for key, t in stand_ins.items()}
        self.state = decode(index["state"], stand_ins, source=str(self.index_path), tensor_source=INDEX_FILE)
        if type(self.state) is not dict or not {"params", "optimizer", "optimizer_class"} <= set(self.state) \
                or type(self.state["params"]) is not dict:
            raise CheckpointError(f"{self.index_path}: state: expected params, optimizer and optimizer_class")
        self._files = ExitStack()
        self._open: dict[int, object] = {}
        self._dtypes: dict[str, str] = {}
        try:  # every piece is where the index says, with its shape and one dtype (headers only: cheap)
            for key, entry in self.layout.items():
                for piece in entry["pieces"]:
                    rows = piece.get("rows")
                    shape = entry["shape"] if rows is None else [rows[1] - rows[0], *entry["shape"][1:]]
                    self._slice(piece["rank"], key, shape)
        except BaseException:
            self._files.close()
            raise

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._files.close()
        return False

    def _checked_entry(self, key: str, entry, ranks: int) -> dict:
        def bad(what: str):
            return CheckpointError(f"{self.index_path}: tensors.{key}: {what}")
        if type(entry) is not dict or type(entry.get("shape")) is not list or type(entry.get("pieces")) is not list \
                or any(type(n) is not int or n < 0 for n in entry["shape"]):
            raise bad("expected a shape (list of sizes) and a list of pieces")
        shape, pieces = entry["shape"], entry["pieces"]
        if any(type(p) is not dict or type(p.get("rank")) is not int or not 0 <= p["rank"] < ranks for p in pieces):
            raise bad(f"every piece needs a rank between 0 and {ranks - 1}")
        if len(pieces) == 1 and "rows" not in pieces[0]:
            return entry  # held whole by one rank
        covered = 0
        for p in pieces:
            rows = p.get("rows")
            if not shape or type(rows) is not list or len(rows) != 2 or rows[0] != covered or \
                    type(rows[1]) is not int or rows[1] <= rows[0]:
                raise bad(f"pieces must hold consecutive rows from {covered}")
            covered = rows[1]
        if not shape or covered != shape[0]:
            raise bad(f"pieces cover {covered} rows of {shape[0] if shape else 'a scalar'}")
        return entry

    def read(self, stand_in: torch.Tensor, rows: tuple[int, int] | None) -> torch.Tensor:
        """Rows [start, stop) of dim 0 of the tensor `stand_in` stands for (None: all of it)."""
        key = self._key_of[id(stand_in)]
        shape, pieces = self.layout[key]["shape"], self.layout[key]["pieces"]
        if not pieces:  # no rows at all
            return torch.empty(shape)
        if "rows" not in pieces[0]:  # held whole by one rank
            stored = self._slice(pieces[0]["rank"], key, shape)
            return stored[rows[0]:rows[1]] if rows is not None else self._whole(pieces[0]["rank"], key)
        start, stop = rows if rows is not None else (0, shape[0])
        parts = [self._slice(p["rank"], key, [b - a, *shape[1:]])[max(start, a) - a:min(stop, b) - a]
                 for p in pieces for a, b in [p["rows"]] if max(start, a) < min(stop, b)]
        if not parts:  # this rank keeps no rows (more ranks than rows): an empty piece of the stored dtype
            a, b = pieces[0]["rows"]
            parts = [self._slice(pieces[0]["rank"], key, [b - a, *shape[1:]])[0:0]]
        return torch.cat(parts) if len(parts) > 1 else parts[0]

    def _whole(self, rank: int, key: str) -> torch.Tensor:
        try:
            return self._handle(rank).get_tensor(key)
        except Exception as exc:
            raise CheckpointError(f"{self.directory / rank_file(rank)}: {key}: cannot read "
                                  f"({type(exc).__name__}: {exc})") from None

    def _handle(self, rank: int):
        if rank not in self._open:
            from safetensors import safe_open
            path = self.directory / rank_file(rank)
            try:
                self._open[rank] = self._files.enter_context(safe_open(str(path), framework="pt"))
            except Exception as exc:  # missing, truncated or not safetensors at all
                raise CheckpointError(f"{path}: cannot read tensors ({type(exc).__name__}: {exc})") from None
        return self._open[rank]

    def _slice(self, rank: int, key: str, shape: list[int]):
        """A lazy slice of `key` in rank `rank`'s file, after checking it holds the shape the index says."""
        path = self.directory / rank_file(rank)
        try:
            stored = self._handle(rank).get_slice(key)
            stored_shape, dtype = list(stored.get_shape()), stored.get_dtype()
        except CheckpointError:
            raise
        except Exception as exc:
            raise CheckpointError(f"{path}: {key}: cannot read ({type(exc).__name__}: {exc})") from None
        if stored_shape != shape:
            raise CheckpointError(f"{path}: {key} holds {dtype} {stored_shape}, where {INDEX_FILE} expects "
                                  f"shape {shape}")
        if self._dtypes.setdefault(key, dtype) != dtype:
            raise CheckpointError(f"{path}: {key} holds {dtype}, its other pieces {self._dtypes[key]}")
        return stored


# ---- whole parameters for the final files --------------------------------------------------------------------
def _options(ignore_frozen: bool = True, **kw):
    from torch.distributed.checkpoint.state_dict import StateDictOptions
    # The trainable part only: frozen base weights live in the model files.
    return StateDictOptions(ignore_frozen_params=ignore_frozen, **kw)


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
