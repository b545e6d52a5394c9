"""One training job on several processes launched by torchrun: DDP or FSDP2, rank-aware data, rank-0 output.

torchrun sets RANK / LOCAL_RANK / WORLD_SIZE (and MASTER_ADDR / MASTER_PORT) for each process; `setup` reads them,
joins the process group (nccl on CUDA, gloo on the CPU) and returns a `Distributed` that the trainer asks
everything rank-dependent: which batches are this rank's, how to scale the loss so that the averaged gradient is
the single-process one, who writes files, and how checkpoints are written (see sharded.py for FSDP2's).
Without torchrun it is a no-op object (`mode == "none"`, one process).
"""
from __future__ import annotations

import logging
import os
import signal
import sys
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import CheckpointError, ConfigError, UnsupportedError

log = logging.getLogger("velotune")
MODES = ("none", "ddp", "fsdp2")


def torchrun_env() -> tuple[int, int, int] | None:
    """(rank, local_rank, world_size) when this process was started by torchrun, else None."""
    if "WORLD_SIZE" not in os.environ or "RANK" not in os.environ:
        return None
    return int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", 0)), int(os.environ["WORLD_SIZE"])


@dataclass
class Distributed:
    """This process's place in the job, and the rank-dependent steps of training (no-ops in one process)."""
    mode: str = "none"
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    owns_group: bool = False
    _stop_asked: bool = False
    _log_level: int | None = None

    @property
    def active(self) -> bool:
        return self.mode != "none"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def grad_scale(self) -> float:
        # DDP and FSDP2 average gradients over ranks; each rank's loss is already divided by the *global* token
        # count, so multiplying by the world size turns that mean into the sum: the single-process gradient.
        return float(self.world_size)

    # ---- collectives (no-ops in one process) ------------------------------------------------------------
    def all_sum(self, *values: float) -> list[float] | float:
        """Sums numbers over ranks (float64: token counts stay exact)."""
        if not self.active:
            return list(values) if len(values) > 1 else values[0]
        import torch.distributed as dist
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        out = t.tolist()
        return out if len(out) > 1 else out[0]

    def all_sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sums a tensor over ranks in place, on its device: no host synchronisation (the loss of a step stays
        on the GPU until a logging step reads it)."""
        if self.active:
            import torch.distributed as dist
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def on_main(self, fn, *args, **kwargs):
        """Runs `fn` on rank 0 only and gives every rank its result, or raises its error on every rank, so that
        ranks take the same branch (file-system checks, writes) and none is left waiting in a collective."""
        if not self.active:
            return fn(*args, **kwargs)
        import torch.distributed as dist
        payload = [None]
        if self.is_main:
            try:
                payload = [("ok", fn(*args, **kwargs))]
            except Exception as exc:  # handed to every rank, raised below on all of them
                payload = [("error", exc)]
        dist.broadcast_object_list(payload, src=0, device=self._object_device())
        kind, value = payload[0]
        if kind == "error":
            raise value
        return value

    def gather_objects(self, obj) -> list:
        if not self.active:
            return [obj]
        import torch.distributed as dist
        out = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def _object_device(self):
        return self.device if self.device.type == "cuda" else None

    # ---- data -------------------------------------------------------------------------------------------
    def data_kwargs(self) -> dict:
        """Keyword arguments for batch_iterator / num_batches: this rank's share of every epoch."""
        return {"rank": self.rank, "world_size": self.world_size} if self.active else {}

    def batches_to_skip(self, state, batch_size: int) -> int:
        """This rank's batches already done in the epoch of `state`. The position is kept in rows over all
        ranks, so a run resumes with another number of processes (and batch size) at the same sample."""
        done, per_batch = (state.rows_in_epoch, batch_size * self.world_size) if state.rows_in_epoch \
            else (state.batch_in_epoch, self.world_size)
        if done % per_batch:
            log.warning("resume: the checkpoint stopped %d row(s) into a batch of %d processes x %d rows; those "
                        "rows are trained on again", done % per_batch, self.world_size, batch_size)
        return done // per_batch

    # ---- model ------------------------------------------------------------------------------------------
    def wrap(self, model: nn.Module, precision: str = "auto") -> nn.Module:
        if not self.active:
            return model
        return wrap_model(model, self.mode, precision=precision, device=self.device)

    def gradient_sync(self, model: nn.Module, last: bool):
        """DDP all-reduces only on the last micro-batch of a step; FSDP2 reduce-scatters every micro-batch,
        which keeps gradients sharded (memory) and still sums to the same gradient."""
        if self.mode == "ddp" and not last:
            return model.no_sync()
        return nullcontext()

    def seed_rank(self, seed: int):
        """Gives every rank but 0 its own random stream (dropout), once the model is built identically on all."""
        if self.rank > 0:
            torch.manual_seed(int(seed) * 1_000_003 + self.rank)

    # ---- stopping ---------------------------------------------------------------------------------------
    @contextmanager
    def graceful_stop(self):
        """Ctrl-C / SIGTERM reach the ranks at different moments; a rank that raised at once would leave the
        others waiting in a collective. So a signal only sets a flag, and `stop_requested` (all ranks, at a step
        boundary) turns it into a KeyboardInterrupt everywhere at the same step. A second Ctrl-C aborts."""
        if not self.active:
            yield
            return
        previous = {}

        def ask_stop(signum, frame):
            if self._stop_asked and signum == signal.SIGINT:
                raise KeyboardInterrupt
            self._stop_asked = True
            log.warning("stop asked (signal %d): stopping after this step (Ctrl-C again to abort)", signum)
        try:
            for sig in (signal.SIGINT, signal.SIGTERM):
                previous[sig] = signal.signal(sig, ask_stop)
        except ValueError:  # not the main thread: keep the default handlers
            pass
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def stop_requested(self, asked_here: bool = False) -> bool:
        """Whether any rank was asked to stop (a signal, or `asked_here`: this rank's stop request): all ranks
        get the same answer at the same step boundary."""
        if not self.active:
            return asked_here
        return self.all_sum(1.0 if self._stop_asked or asked_here else 0.0) > 0

    # ---- checkpoints and outputs ------------------------------------------------------------------------
    def save_checkpoint(self, out_dir, state, model, optimizer, scheduler, scaler, keep_last, rng,
                        objective_state: dict | None = None):
        """`objective_state`: this rank's Objective.state_dict() at the step boundary; every rank's is saved (each
        rank's objective keeps its own batches, as each keeps its own RNG)."""
        from . import state as train_state
        per_rank = [objective_state or {}]
        if self.active:  # both in the one gather the RNG states already needed
            gathered = self.gather_objects((rng, objective_state or {}))
            rng = {**rng, "per_rank": [g[0] for g in gathered]}
            per_rank = [g[1] for g in gathered]
        if self.mode == "fsdp2":
            from .sharded import save_sharded_checkpoint
            return save_sharded_checkpoint(self, out_dir, state, model, optimizer, scheduler, scaler, keep_last,
                                           rng, objective_states=per_rank)
        # DDP: parameters and optimizer state are the same on every rank, so rank 0 writes the usual checkpoint.
        return self.on_main(train_state.save_checkpoint, out_dir, state, unwrap(model), optimizer, scheduler,
                            scaler, keep_last, rng=rng, objective_states=per_rank)

    def load_checkpoint(self, path, model, optimizer, scheduler, scaler, objective=None):
        """Every rank reads the checkpoint itself (its own rows of a sharded one); if any rank fails, all raise,
        so that none goes on training alone and waits forever in a collective. `objective`: takes back its kept
        state (this rank's), when the checkpoint has some."""
        from . import sharded
        from .state import load_checkpoint, load_objective_state
        failure = None
        try:
            if objective is not None:  # checked and taken first: the model is untouched if it does not fit
                load_objective_state(path, objective, rank=self.rank, world_size=self.world_size)
            if sharded.is_sharded_checkpoint(path):  # into a sharded, DDP or plain model: each rank reads its rows
                state = sharded.load_sharded_checkpoint(path, unwrap(model), optimizer, scheduler, scaler,
                                                        rank=self.rank)
            elif self.mode == "fsdp2":
                state = sharded.load_full_checkpoint_sharded(path, model, optimizer, scheduler, scaler, rank=self.rank)
            else:
                state = load_checkpoint(path, unwrap(model), optimizer, scheduler, scaler, rank=self.rank)
        except Exception as exc:
            failure = exc
        if self.active and self.all_sum(1.0 if failure is not None else 0.0) > 0 and failure is None:
            raise CheckpointError(f"{path}: another rank could not load this checkpoint (its error is in its log)")
        if failure is not None:
            raise failure
        return state

    @contextmanager
    def full_model(self, model: nn.Module, trainable_only: bool):
        """The plain model with whole parameters on rank 0, for writing the adapter or model (all ranks call)."""
        if self.mode != "fsdp2":
            yield unwrap(model)
            return
        from .sharded import gathered_parameters
        with gathered_parameters(model, trainable_only):
            yield model

    def close(self):
        if self._log_level is not None:
            log.setLevel(self._log_level)
            self._log_level = None
        if self.owns_group:
            import gc

            import torch.distributed as dist
            if dist.is_initialized():
                # The DDP wrapper of the finished run sits in reference cycles; its reducer holds the group's
                # pending work. Freed now, not during interpreter teardown, where gloo can abort the process.
                gc.collect()
                dist.destroy_process_group()
            self.owns_group = False


def exit_worker(code: int):
    """Ends a torchrun worker whose work is done and written, skipping the interpreter's teardown.

    gloo's C++ threads can abort a process at teardown ("terminate called without an active exception", a rare
    race in torch.distributed seen on CPU jobs), and torchrun then reports a finished job as failed with signal 6.
    Logs and standard streams are flushed first; nothing else is left to run at that point.
    """
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def setup(cfg) -> Distributed:
    """Joins torchrun's process group per `cfg.train.distributed`; a plain one-process Distributed otherwise."""
    mode = cfg.train.distributed
    env = torchrun_env()
    if env is None:
        if mode != "none":
            log.info("train.distributed=%s but this process was not started by torchrun: training in one process",
                     mode)
        return Distributed()
    rank, local_rank, world_size = env
    if mode == "none":
        if world_size > 1:
            raise ConfigError(f"train.distributed: 'none', but torchrun started {world_size} processes; set "
                              f"train.distributed=ddp or fsdp2 (each process would otherwise train alone)")
        return Distributed()
    _check_supported(cfg, mode, world_size)
    device = _rank_device(cfg.model.device, local_rank)
    ctx = Distributed(mode=mode, rank=rank, local_rank=local_rank, world_size=world_size, device=device)
    import torch.distributed as dist
    if not dist.is_initialized():
        _join_group(device, rank, world_size)
        ctx.owns_group = True
    elif dist.get_world_size() != world_size:
        raise ConfigError(f"train.distributed: the process group has {dist.get_world_size()} ranks but "
                          f"WORLD_SIZE is {world_size}")
    if not ctx.is_main:  # one log for the job: the other ranks report errors only
        ctx._log_level = log.level
        log.setLevel(max(logging.ERROR, log.getEffectiveLevel()))
    log.info("distributed: %s over %d processes (%s)", mode, world_size, dist.get_backend())
    return ctx


_groups_joined = 0


def _join_group(device: torch.device, rank: int, world_size: int):
    """Joins torchrun's job (env://: MASTER_ADDR / MASTER_PORT). A process that trains twice (a sweep, a
    notebook) joins a second group after leaving the first: its keys get a fresh prefix, because torchrun's store
    still holds the first group's addresses, and a group that read those would wait forever."""
    global _groups_joined
    import torch.distributed as dist
    from torch.distributed.rendezvous import rendezvous
    store, _, _ = next(rendezvous("env://", rank, world_size))
    store = dist.PrefixStore(f"velotune_{_groups_joined}", store)
    _groups_joined += 1
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, store=store, rank=rank, world_size=world_size,
                            device_id=device if device.type == "cuda" else None)


def _check_supported(cfg, mode: str, world_size: int):
    if mode == "fsdp2" and cfg.model.quantize:
        raise ConfigError("train.distributed: 'fsdp2' cannot shard a quantized base (model.quantize is set); "
                          "use train.distributed=ddp for QLoRA")
    if mode == "fsdp2" and cfg.train.precision == "fp16":
        raise ConfigError("train.distributed: 'fsdp2' with train.precision=fp16 is not supported (the loss "
                          "scaler would need sharded overflow checks); use bf16")
    if mode == "fsdp2" and cfg.train.optimizer == "adamw8bit":
        raise ConfigError("train.optimizer: 'adamw8bit' cannot update sharded (fsdp2) parameters (bitsandbytes "
                          "has no sharded kernels); use adamw, or train.distributed=ddp")
    device = cfg.model.device or ""
    if world_size > 1 and device.startswith("cuda:"):
        raise ConfigError(f"model.device: {device!r} puts every process on one GPU; leave it unset or 'cuda' "
                          f"under torchrun (each process takes the GPU of its LOCAL_RANK)")


def _rank_device(configured: str | None, local_rank: int) -> torch.device:
    wants_cuda = configured.startswith("cuda") if configured else torch.cuda.is_available()
    if not wants_cuda:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ConfigError(f"model.device: {configured!r} but CUDA is not available")
    torch.cuda.set_device(local_rank)  # "cuda" without an index now means this rank's GPU, for the loader too
    return torch.device("cuda", local_rank)


def wrap_model(model: nn.Module, mode: str, *, precision: str = "auto", device=None) -> nn.Module:
    """DDP wraps the model; FSDP2 shards each of `model.blocks()`, then the root (embeddings, final norm, lm_head),
    in place. The optimizer must be built after this (FSDP2 replaces the parameters by sharded ones)."""
    if mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel
        device = torch.device(device) if device is not None else next(model.parameters()).device
        ids = [device.index if device.index is not None else torch.cuda.current_device()] \
            if device.type == "cuda" else None
        # Every trainable parameter takes part in each forward (LoRA: frozen ones are skipped by DDP anyway).
        return DistributedDataParallel(model, device_ids=ids, find_unused_parameters=False,
                                       gradient_as_bucket_view=True)
    if mode == "fsdp2":
        try:
            from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
        except ImportError:  # torch < 2.6 kept FSDP2 under its first name
            from torch.distributed._composable.fsdp import MixedPrecisionPolicy, fully_shard
        if model.quantization:
            raise UnsupportedError("fsdp2 cannot shard a quantized (bitsandbytes) base model; use ddp")
        policy = MixedPrecisionPolicy()
        if precision == "bf16":  # compute in bf16, keep fp32 master weights, reduce gradients in fp32
            policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        for block in model.blocks():
            fully_shard(block, mp_policy=policy)
        fully_shard(model, mp_policy=policy)
        return model
    if mode == "none":
        return model
    raise ConfigError(f"train.distributed: unknown mode {mode!r} (known: {', '.join(MODES)})")
