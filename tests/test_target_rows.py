"""The training forward runs its last block only at the positions that carry a target (no other output of that block
is read): the loss and every gradient equal the full forward's, for each family's block, with padding, packed
documents, a sliding window, checkpointing and every reduction."""
import pytest
import torch

import velotune as vt
from hf_reference import make_checkpoint

VOCAB = 211


def _batch(packed: bool):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, VOCAB, (3, 21), generator=g)
    labels = ids.clone()
    labels[:, :12] = -100
    labels[1, :19] = -100            # a row with one target
    extra = {}
    if packed:                       # two documents in row 0, targets in both
        extra["document_ids"] = torch.zeros_like(ids)
        extra["document_ids"][0, 9:] = 1
        labels[0, 5:8] = ids[0, 5:8]
    else:
        extra["attention_mask"] = torch.ones_like(ids)
        extra["attention_mask"][2, 16:] = 0
        labels[2, 16:] = -100
    return ids, labels, extra


def _loss_and_grads(model, ids, labels, extra, reduction, full: bool):
    model.zero_grad()
    out = model(ids, labels=labels, return_logits=full, reduction=reduction, **extra)
    (out.loss.sum() if reduction == "none" else out.loss).backward()
    return out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("family, overrides", [("llama", {}), ("mistral", {"sliding_window": 4}), ("qwen3", {}),
                                               ("phi3", {}), ("gemma", {})])
@pytest.mark.parametrize("packed", [False, True])
def test_the_last_block_at_target_rows_gives_the_full_loss_and_gradients(tmp_path, family, overrides, packed):
    path, _ = make_checkpoint(tmp_path, family, vocab_size=VOCAB, num_hidden_layers=3, **overrides)
    model, _ = vt.load(path, dtype="float32")
    vt.add_lora(model, r=4, alpha=8)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    model.set_gradient_checkpointing(packed)   # checkpointing on for half the cases
    model.train()
    ids, labels, extra = _batch(packed)
    for reduction in ("sum", "mean", "none"):
        fast, fast_grads = _loss_and_grads(model, ids, labels, extra, reduction, full=False)
        full, full_grads = _loss_and_grads(model, ids, labels, extra, reduction, full=True)
        assert (fast - full).abs().max() <= 1e-5 * max(1.0, float(full.abs().max()))
        assert fast_grads.keys() == full_grads.keys()
        for name in full_grads:
            assert (fast_grads[name] - full_grads[name]).abs().max() <= 1e-5, name
