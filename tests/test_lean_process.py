"""A training process carries only what it runs: no torch compiler stack, no sympy, no triton on the CPU.

torch's optimizers import torch._dynamo (with torch._inductor, torch.fx, ...) on first use, torch.nn.utils.skip_init
and torch.autograd.grad with an output gradient import the symbolic-shape module (sympy), and importing triton to
ask whether it exists costs ~75 MB: together ~150 MB resident in a LoRA run of the demo model (maxrss 514 -> 360 MB,
measured on torch 2.13). velotune's AdamW is torch's own update without the import (training/lean_optim.py); these
tests hold it to torch's numbers and the process to its diet.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from velotune.training.lean_optim import AdamW, lean

ROOT = Path(__file__).resolve().parents[1]

# LoRA on every linear of the demo's "test"-size Llama (fp32: the gated MLP's adapter backward), 4 steps with a
# checkpoint at 2 and 4, then a resumed run to step 6: every optimizer method the loop calls (construction, step,
# zero_grad, state_dict, load_state_dict), the scheduler and clipping.
TRAIN_SCRIPT = r"""
import json, sys, tempfile
from pathlib import Path
import torch
import velotune as vt
from velotune.demo.dataset import DATASET_PATH, corpus_texts, load_dataset
from velotune.demo.tiny_model import build_demo_checkpoint
from velotune.demo.tokenizer import train_demo_tokenizer

torch.set_num_threads(1)
with tempfile.TemporaryDirectory() as tmp:
    tokenizer = train_demo_tokenizer(corpus_texts(load_dataset(DATASET_PATH)))
    base = build_demo_checkpoint(Path(tmp) / "base", tokenizer, seed=0, size="test")
    heavy_before = sorted(m for m in ("torch._dynamo", "sympy", "triton") if m in sys.modules)
    config = {"model": {"path": str(base), "dtype": "float32", "device": "cpu"},
              "lora": {"r": 4, "alpha": 8, "targets": "all-linear"},
              "data": {"path": str(DATASET_PATH), "format": "messages", "max_seq_length": 64},
              "train": {"output_dir": str(Path(tmp) / "run"), "max_steps": 4, "batch_size": 4, "lr": 1e-3,
                        "seed": 0, "progress": False, "save_every": 2, "log_every": 1}}
    vt.train(config)
    config["train"].update(max_steps=6, resume=True)
    vt.train(config)
print(json.dumps({"before": heavy_before,
                  "after": sorted(m for m in ("torch._dynamo", "sympy", "triton") if m in sys.modules)}))
"""


def test_a_lora_run_with_resume_imports_no_compiler_stack():
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VELOTUNE_", "TRITON_"))}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-c", TRAIN_SCRIPT], env=env, capture_output=True, text=True,
                          cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    loaded = json.loads(proc.stdout.strip().splitlines()[-1])
    assert loaded == {"before": [], "after": []}, loaded


BNB_IMPORT_SCRIPT = r"""
import json, sys
import torch
from velotune.models.bitsandbytes_import import require_bitsandbytes
real = torch.compile
bnb = require_bitsandbytes()
print(json.dumps({"compile_restored": torch.compile is real, "again": require_bitsandbytes() is bnb,
                  "compiler": sorted(m for m in ("torch._dynamo", "torch._inductor") if m in sys.modules)}))
"""


def test_bitsandbytes_is_imported_without_compiling():
    """bitsandbytes' default backend calls torch.compile on import (~117 MB of compiler modules for fallbacks the CPU
    and CUDA never run): velotune imports it with compile left out, and gives torch.compile back."""
    pytest.importorskip("bitsandbytes")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VELOTUNE_", "TRITON_"))}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-c", BNB_IMPORT_SCRIPT], env=env, capture_output=True, text=True,
                          cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == {"compile_restored": True, "again": True,
                                                                 "compiler": []}


def _params(seed: int):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(shape, generator=g)) for shape in ((7, 5), (5,), (3, 4, 2))]


def _run(optimizer_class, steps: int = 5, **kwargs):
    params = _params(0)
    groups = [{"params": params[::2], "weight_decay": 0.1}, {"params": params[1:2], "weight_decay": 0.0}]
    optimizer = optimizer_class(groups, lr=1e-2, betas=(0.9, 0.95), **kwargs)
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=g)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return params, optimizer


@pytest.mark.parametrize("impl", [{"fused": True}, {"foreach": True}, {"foreach": False}])
def test_adamw_is_torchs_adamw_to_the_bit(impl):
    ours, our_optimizer = _run(AdamW, **impl)
    theirs, their_optimizer = _run(torch.optim.AdamW, **impl)
    assert all(torch.equal(a, b) for a, b in zip(ours, theirs))
    assert type(our_optimizer).__name__ == "AdamW" and isinstance(our_optimizer, torch.optim.AdamW)
    mine, reference = our_optimizer.state_dict(), their_optimizer.state_dict()
    assert mine["param_groups"] == reference["param_groups"]
    assert mine["state"].keys() == reference["state"].keys()
    for index, state in reference["state"].items():
        assert all(torch.equal(mine["state"][index][k], v) for k, v in state.items())


def test_adamw_resumes_from_its_state_dict_as_torch_does():
    """Five steps, state_dict, a fresh optimizer loading it, five more: the same as ten steps in one."""
    params, optimizer = _run(AdamW, steps=5, fused=True)
    saved = optimizer.state_dict()
    fresh = AdamW([{"params": params[::2], "weight_decay": 0.1}, {"params": params[1:2], "weight_decay": 0.0}],
                  lr=1e-2, betas=(0.9, 0.95), fused=True)
    fresh.load_state_dict(saved)
    g = torch.Generator().manual_seed(1)
    for _ in range(5):  # the run's gradients after its first five steps
        for p in params:
            torch.randn(p.shape, generator=g)
    for _ in range(5):
        for p in params:
            p.grad = torch.randn(p.shape, generator=g)
        fresh.step()
        fresh.zero_grad()
    straight, _ = _run(torch.optim.AdamW, steps=10, fused=True)
    assert all(torch.equal(a, b) for a, b in zip(params, straight))


def test_lean_8bit_adamw_is_bitsandbytes_own():
    bnb = pytest.importorskip("bitsandbytes")
    # bitsandbytes keeps 8-bit state only for tensors of 4096 elements or more: one such tensor, one smaller.
    def run(optimizer_class):
        g = torch.Generator().manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(64, 80, generator=g)), torch.nn.Parameter(torch.randn(9, generator=g))]
        optimizer = optimizer_class(params, lr=1e-2)
        for _ in range(4):
            for p in params:
                p.grad = torch.randn(p.shape, generator=g)
            optimizer.step()
            optimizer.zero_grad()
        return params, optimizer

    ours, our_optimizer = run(lean(bnb.optim.AdamW8bit))
    theirs, _ = run(bnb.optim.AdamW8bit)
    assert all(torch.equal(a, b) for a, b in zip(ours, theirs))
    assert type(our_optimizer).__name__ == "AdamW8bit" and isinstance(our_optimizer, bnb.optim.AdamW8bit)
    assert our_optimizer.state_dict()["state"].keys() == {0, 1}
