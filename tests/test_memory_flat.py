"""Memory stays flat after warm-up: a run meets few distinct tensor shapes (kernels/shape_buckets.py).

On the CPU, bf16 matmuls and attention keep compiled kernels per shape (oneDNN); before bucketing, every new
batch width, sample length and target count added to the peak RSS for hundreds of steps (issue 11, item 8;
benchmarks/memory_growth.py). The end-to-end check trains in a fresh process; the others pin the pieces: batch
widths, per-sample attention slices and loss rows at bucket lengths, with unchanged numbers.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kernel_checks import rel_err
from test_memory import tiny_model
from velotune.data import Encoded, collate
from velotune.kernels import cross_entropy, varlen
from velotune.kernels.shape_buckets import bucket_length
from velotune.models.attention import AttentionMask

ROOT = Path(__file__).resolve().parents[1]

# Trains the demo's "test"-size Llama (bf16, LoRA, packing, the bundled chat data) and prints the peak RSS after
# step 20 and after step 120, in MiB.
TRAIN_SCRIPT = r"""
import json, sys, tempfile
from pathlib import Path
import torch
from torch.optim.optimizer import register_optimizer_step_post_hook
import velotune as vt
from velotune.demo.dataset import DATASET_PATH, corpus_texts, load_dataset
from velotune.demo.tiny_model import build_demo_checkpoint
from velotune.demo.tokenizer import train_demo_tokenizer

torch.set_num_threads(1)
peaks = {}

def peak_mib():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024

def after_step(optimizer, *_):
    peaks[len(peaks) + 1] = peak_mib()

register_optimizer_step_post_hook(after_step)
with tempfile.TemporaryDirectory() as tmp:
    tokenizer = train_demo_tokenizer(corpus_texts(load_dataset(DATASET_PATH)))
    base = build_demo_checkpoint(Path(tmp) / "base", tokenizer, seed=0, size="test")
    vt.train({"model": {"path": str(base), "dtype": "bfloat16", "device": "cpu"}, "lora": {"r": 8, "alpha": 16},
              "data": {"path": str(DATASET_PATH), "format": "messages", "max_seq_length": 256, "packing": True},
              "train": {"output_dir": str(Path(tmp) / "run"), "max_steps": 120, "batch_size": 4, "lr": 1e-3,
                        "seed": 0, "progress": False}})
print(json.dumps({"warm": peaks[20], "end": peaks[120]}))
"""


def test_peak_rss_stays_flat_after_warm_up():
    """Peak RSS after 120 steps against after 20. Measured on a 2-core AMX Xeon, torch 2.13: before bucketing
    +200 MiB or more; with it 15-40 MiB (the last new buckets: short tail paddings, an epoch's last batch)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VELOTUNE_", "ONEDNN_", "LRU_CACHE", "MALLOC_"))}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-c", TRAIN_SCRIPT], env=env, capture_output=True, text=True,
                          cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    peaks = json.loads(proc.stdout.strip().splitlines()[-1])
    assert peaks["end"] - peaks["warm"] < 80, peaks


def test_bucket_lengths():
    assert [bucket_length(n) for n in (1, 7, 8, 9, 13, 33, 40, 65, 100, 129, 255, 257, 1000, 2049)] == \
        [1, 7, 8, 10, 14, 40, 40, 80, 112, 160, 256, 320, 1024, 2112]
    assert len({bucket_length(n) for n in range(1, 2049)}) == 56  # lengths up to 2048 take 56 shapes
    assert bucket_length(98, cap=100) == 100 and bucket_length(90, cap=100) == 96 and bucket_length(101, cap=100) == 101


def _example(n, first=5):
    ids = torch.arange(first, first + n)
    return Encoded(input_ids=ids, labels=ids.clone())


@pytest.mark.parametrize("packing", [True, False])
def test_batch_width_is_a_bucket_length_capped_at_max_seq_length(packing):
    rows = [[_example(20), _example(13)], [_example(9)]] if packing else [[_example(33)], [_example(9)]]
    batch = collate(rows, pad_id=0, packing=packing)
    assert batch["input_ids"].shape == (2, 40)  # 33 tokens -> 40
    assert collate(rows, pad_id=0, packing=packing, max_width=36)["input_ids"].shape == (2, 36)
    assert batch["labels"][0, 33:].eq(-100).all() and batch["input_ids"][0, 33:].eq(0).all()
    if packing:  # the tail padding is a document of its own: positions restart at 0
        assert batch["position_ids"][0, 33:].tolist() == list(range(7))
        assert batch["document_ids"][0].tolist() == [0] * 20 + [1] * 13 + [2] * 7
    else:
        assert batch["attention_mask"].sum(1).tolist() == [33, 9]


# Two packed rows of 40: samples of 9, 13, 17 and a 1-token tail padding; one sample of 40.
DOCS = torch.tensor([[0] * 9 + [1] * 13 + [2] * 17 + [3], [0] * 40])
IDS = torch.randint(0, 101, DOCS.shape, generator=torch.Generator().manual_seed(3))


def _logits_and_grads(model):
    model.zero_grad(set_to_none=True)
    out = model(IDS, labels=IDS, document_ids=DOCS, return_logits=True)
    (out.loss + out.logits.float().square().mean()).backward()
    return out.logits.detach().float(), {n: p.grad.float() for n, p in model.named_parameters() if p.grad is not None}


def _sdpa_lengths(monkeypatch):
    calls, real = [], varlen.F.scaled_dot_product_attention
    monkeypatch.setattr(varlen.F, "scaled_dot_product_attention",
                        lambda *a, **kw: calls.append(a[0].shape[2]) or real(*a, **kw))
    return calls


def test_bucketed_segments_give_the_dense_paths_numbers(monkeypatch):
    """Each sample's attention (samples one by one: varlen.WINDOW_TOKENS 0) runs at a bucket length, padded with
    zero positions (9 -> 10, 13 -> 14, 17 -> 20). fp32 with
    bucketing forced: the dense mask's logits and gradients to 1e-6 / 1e-5."""
    model = tiny_model(layers=2).train()
    monkeypatch.setenv("VELOTUNE_ATTENTION", "dense")
    logits, grads = _logits_and_grads(model)
    monkeypatch.delenv("VELOTUNE_ATTENTION")
    monkeypatch.setattr(varlen, "WINDOW_TOKENS", 0)
    monkeypatch.setattr(varlen, "shape_keyed_kernels", lambda device, dtype: True)
    calls = _sdpa_lengths(monkeypatch)
    with monkeypatch.context() as patch:
        patch.setattr(AttentionMask, "_build", lambda *a: pytest.fail("a dense mask was built"))
        seg_logits, seg_grads = _logits_and_grads(model)
    assert calls == [10, 14, 20, 1, 40] * 2
    assert rel_err(seg_logits, logits) < 1e-6 and seg_grads.keys() == grads.keys()
    for name in grads:
        assert rel_err(seg_grads[name], grads[name]) < 1e-5, name


def test_bf16_segments_run_at_bucket_lengths_within_bf16_error(monkeypatch):
    """bf16 on the CPU buckets by itself; its error against fp32 stays within twice the dense bf16 path's."""
    reference, _ = _logits_and_grads(tiny_model(layers=2).train())
    model = tiny_model(layers=2).to(torch.bfloat16).train()
    monkeypatch.setenv("VELOTUNE_ATTENTION", "dense")
    dense, _ = _logits_and_grads(model)
    monkeypatch.delenv("VELOTUNE_ATTENTION")
    for limit, lengths in ((0, [10, 14, 20, 1, 40]), (256, [40, 40])):  # one by one; row 0's samples together
        monkeypatch.setattr(varlen, "WINDOW_TOKENS", limit)
        calls = _sdpa_lengths(monkeypatch)
        segments, _ = _logits_and_grads(model)
        assert calls == lengths * 2
        assert rel_err(segments, reference) < 2 * rel_err(dense, reference) + 1e-3


@pytest.mark.parametrize("reduction", ["sum", "mean", "none"])
def test_bf16_loss_rows_padded_to_a_bucket_give_the_same_loss_and_gradient(monkeypatch, reduction):
    """37 target rows run as 40 (3 ignored rows): the loss and d loss / d hidden of the 37 rows unchanged."""
    gen = torch.Generator().manual_seed(1)
    weight = torch.randn(300, 64, generator=gen).to(torch.bfloat16)
    targets = torch.randint(0, 300, (37,), generator=gen)
    targets[5] = -100
    seen = []
    real = cross_entropy.chunked_linear_cross_entropy
    monkeypatch.setattr(cross_entropy, "chunked_linear_cross_entropy",
                        lambda h, *a, **kw: seen.append(h.shape[0]) or real(h, *a, **kw))

    def run(fn):
        hidden = torch.randn(37, 64, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
        hidden.requires_grad_(True)
        loss = fn(hidden, weight, targets, reduction=reduction)
        loss.float().square().sum().backward()
        return loss.detach().float(), hidden.grad.float()

    loss, grad = run(cross_entropy.linear_cross_entropy)
    assert seen == [40]
    plain_loss, plain_grad = run(real)
    assert loss.shape == plain_loss.shape and grad.shape == (37, 64)
    assert torch.allclose(loss, plain_loss, rtol=1e-6) and torch.allclose(grad, plain_grad, rtol=1e-6)
