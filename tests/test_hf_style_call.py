"""Loops written for transformers run fast: `model(input_ids=ids, labels=ids)` takes the fused loss and builds no
logits, and the method names such loops call exist."""
import pytest
import torch
import torch.nn.functional as F

import velotune as vt
from hf_reference import make_checkpoint


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    path, hf = make_checkpoint(tmp_path_factory.mktemp("hfstyle"), "llama")
    ours, _ = vt.load(path, dtype="float32", device="cpu")
    return ours, hf


def _ids(config, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, config.vocab_size, (2, 12), generator=g)


def test_labels_with_gradients_build_no_logits(pair):
    ours, hf = pair
    ids = _ids(hf.config)
    labels = ids.clone()
    labels[:, :3] = -100
    out = ours(input_ids=ids, labels=labels)
    assert out.logits is None  # the fused chunked loss, never [batch, seq, vocab]
    assert type(out.loss.grad_fn).__name__ in ("DivBackward0", "ChunkedLinearCrossEntropyBackward")
    expected = hf(input_ids=ids, labels=labels).loss
    assert abs(out.loss.item() - expected.item()) <= 1e-5 * expected.item()
    asked = ours(input_ids=ids, labels=labels, return_logits=True)
    assert asked.logits.shape == (2, 12, hf.config.vocab_size)
    assert abs(asked.loss.item() - expected.item()) <= 1e-5 * expected.item()
    with torch.no_grad():  # evaluation loops read logits next to the loss
        assert ours(input_ids=ids, labels=labels).logits is not None
        assert ours(input_ids=ids).logits.shape == (2, 12, hf.config.vocab_size)


def test_loss_from_logits_does_not_copy_them(pair, monkeypatch):
    """The logits path hands the whole logits to cross_entropy with ignore_index: no boolean-index copy."""
    ours, hf = pair
    ids = _ids(hf.config, seed=1)
    seen = []
    real = F.cross_entropy
    monkeypatch.setattr(F, "cross_entropy", lambda x, *a, **k: seen.append(x.shape) or real(x, *a, **k))
    out = ours(input_ids=ids, labels=ids, return_logits=True)
    assert seen == [(2 * 12, hf.config.vocab_size)]
    assert torch.isfinite(out.loss)


def test_transformers_method_names(pair):
    ours, hf = pair
    assert ours.num_parameters() == hf.num_parameters()
    assert ours.num_parameters(exclude_embeddings=True) == hf.num_parameters(exclude_embeddings=True)
    ours.gradient_checkpointing_enable()
    assert ours.is_gradient_checkpointing and ours.model.gradient_checkpointing is True
    ours.gradient_checkpointing_enable({"offload": True})
    assert ours.model.gradient_checkpointing == "offload"
    ours.gradient_checkpointing_disable()
    assert not ours.is_gradient_checkpointing
    assert ours.enable_input_require_grads() is None
    vt.add_lora(ours, r=2, alpha=4, targets=["q_proj"])
    try:
        trainable = sum(p.numel() for p in ours.parameters() if p.requires_grad)
        assert ours.num_parameters(only_trainable=True) == trainable > 0
    finally:
        from velotune.lora import remove_lora
        remove_lora(ours)
