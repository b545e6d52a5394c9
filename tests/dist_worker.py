"""Run by tests/test_distributed.py under `torchrun --nproc_per_node 2`: several training jobs in one launch.

Usage: dist_worker.py SPEC.json OUT_DIR. SPEC holds {"cli": [velotune arguments]?, "jobs": [{"name", "config",
"overrides"?, "interrupt_at"?, "poison_after"?, "quantize"?}]}. The "cli" run goes through the `velotune train`
command as `torchrun -m velotune train cfg.yaml` does (the trainer joins and leaves the process group itself).
For the jobs the worker joins the process group itself, so `vt.train` uses it and leaves it open between jobs;
each job writes OUT_DIR/<name>.rank<r>.pt with its losses and the whole trainable parameters as this rank holds
them (FSDP2 shards gathered), for the test to compare across ranks and with one-process runs.
"""
import importlib
import json
import os
import sys
import traceback
from pathlib import Path

import torch
import torch.distributed as dist
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

import velotune as vt
from velotune.training.trainer import train  # not vt.train: importing velotune.training.* shadows it


def whole(p: torch.Tensor) -> torch.Tensor:
    return (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().cpu().clone()


def step_hooks(job: dict, record: dict):
    """Keeps the whole gradients of the first optimizer step; raises KeyboardInterrupt at step `interrupt_at`
    (on every rank at the same step, as a graceful stop does); fills the parameters of rank 1 only with NaN
    after step `poison_after` (rank 0 must still learn of it through the global loss)."""
    calls = {"n": 0, "post": 0}

    def poison(optimizer, args, kwargs):
        calls["post"] += 1
        if calls["post"] == job.get("poison_after") and record["rank"] == 1:
            with torch.no_grad():
                for p in optimizer.param_groups[0]["params"]:
                    p.fill_(float("nan"))

    def hook(optimizer, args, kwargs):
        calls["n"] += 1
        if calls["n"] == 1:
            names = {id(p): n for n, p in record["model"].named_parameters()}
            record["grads"] = {names[id(p)]: whole(p.grad) for g in optimizer.param_groups for p in g["params"]}
        if calls["n"] == job.get("interrupt_at"):
            raise KeyboardInterrupt
    return [register_optimizer_step_pre_hook(hook), register_optimizer_step_post_hook(poison)]


def run_job(job: dict, out_dir: Path, rank: int):
    cfg = job["config"]
    if job.get("objective_module"):  # a test's own objective, registered when its module is imported
        importlib.import_module(job["objective_module"])
    if job.get("embedder"):
        model, tok = vt.load_embedder(cfg["model"]["path"], dtype="float32", device="cpu")
    else:
        model, tok = vt.load(cfg["model"]["path"], dtype="float32", device="cpu", quantize=job.get("quantize"))
    record = {"rank": rank, "model": model}
    handles = step_hooks(job, record)
    try:
        result = train(cfg, job.get("overrides"), model=model, tokenizer=tok)
        record.update(losses=result.losses, steps=result.steps, interrupted=result.interrupted,
                      adapter_dir=str(result.adapter_dir), model_dir=str(result.model_dir))
    except Exception as exc:  # reported to the test, which decides whether it was expected
        record.update(error=f"{type(exc).__name__}: {exc}", traceback=traceback.format_exc())
    finally:
        for handle in handles:
            handle.remove()
    del record["model"]
    record["params"] = {n: whole(p) for n, p in model.named_parameters() if p.requires_grad}
    torch.save(record, out_dir / f"{job['name']}.rank{rank}.pt")


def main():
    spec = json.loads(Path(sys.argv[1]).read_text())
    out_dir = Path(sys.argv[2])
    torch.set_num_threads(1)
    if spec.get("cli"):  # first, before any process group exists: `velotune train` joins and leaves its own
        from velotune.cli import main as velotune_main
        code = velotune_main(spec["cli"])
        (out_dir / f"cli.rank{os.environ['RANK']}.json").write_text(json.dumps({"exit_code": code}))
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    try:
        for job in spec["jobs"]:
            run_job(job, out_dir, rank)
            dist.barrier()
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
