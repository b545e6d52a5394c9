"""Parity of every architecture file with transformers: logits and every parameter gradient, fp32."""
import pytest
import torch

import velotune as vt
from hf_reference import SHRUNK, make_checkpoint
from velotune.models.registry import supported_model_types

CASES = [c for c in SHRUNK if c.split("_")[0] in supported_model_types()]


def rel_err(a, b):
    return ((a - b).norm() / b.norm().clamp(min=1e-30)).item()


def _inputs(vocab, batch=2, seq=19):
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(0, vocab, (batch, seq), generator=g)
    labels = ids.clone()
    labels[:, :4] = -100  # a masked prompt
    return ids, labels


@pytest.mark.parametrize("case", CASES)
def test_logits_and_gradients_match_transformers(tmp_path, case):
    path, hf = make_checkpoint(tmp_path, case)
    ours, tok = vt.load(path, dtype="float32", device="cpu")
    assert tok is None
    ids, labels = _inputs(hf.config.vocab_size)

    hf_out = hf(input_ids=ids, labels=labels)
    our_out = ours(ids, labels=labels)
    assert our_out.logits.shape == hf_out.logits.shape
    assert rel_err(our_out.logits, hf_out.logits) <= 1e-5
    assert abs(our_out.loss.item() - hf_out.loss.item()) <= 1e-5 * abs(hf_out.loss.item())

    hf_out.loss.backward()
    our_out.loss.backward()
    hf_params = dict(hf.named_parameters())
    ours_params = dict(ours.named_parameters())
    assert set(ours_params) == set(hf_params)
    for name, p in ours_params.items():
        ref = hf_params[name].grad
        assert p.grad is not None, name
        assert rel_err(p.grad, ref) <= 1e-4, (name, rel_err(p.grad, ref))
