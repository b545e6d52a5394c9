"""Parity of every architecture file with transformers: logits and every parameter gradient, fp32.

Also: packed rows (document_ids) and left-padded batches give each sample the logits it has alone; position_ids
alone are plain positions.
`python tests/hf_reference.py` prints the measured errors per case.
"""
import json

import pytest
import torch

import velotune as vt
from hf_reference import SHRUNK, make_checkpoint
from velotune.errors import UnsupportedError
from velotune.models.registry import supported_model_types

CASES = [c for c in SHRUNK if c.split("_")[0] in supported_model_types()]


def rel_err(a, b):
    return ((a - b).norm() / b.norm().clamp(min=1e-30)).item()


def _inputs(config, batch=2, seq=19):
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(0, config.vocab_size, (batch, seq), generator=g)
    pad = getattr(config, "pad_token_id", None)
    if isinstance(pad, int) and 0 <= pad < config.vocab_size:
        ids[:, 5] = pad  # transformers gives the pad row no gradient: so must we
    labels = ids.clone()
    labels[:, :4] = -100  # a masked prompt
    return ids, labels


def test_every_architecture_has_cases():
    families = {c.split("_")[0] for c in SHRUNK}
    assert families == {"llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi3"}
    # the newer families have parity files of their own (test_gemma3_parity, test_olmo2_granite_parity,
    # test_moe_parity, test_gpt_oss_parity): every supported type is covered by one or the other
    own_files = {"gemma3_text", "olmo2", "granite", "mixtral", "qwen3_moe", "gpt_oss"}
    assert set(supported_model_types()) == families | own_files


@pytest.mark.parametrize("case", CASES)
def test_logits_and_gradients_match_transformers(tmp_path, case):
    path, hf = make_checkpoint(tmp_path, case)
    ours, tok = vt.load(path, dtype="float32", device="cpu")
    assert tok is None
    ids, labels = _inputs(hf.config)

    hf_out = hf(input_ids=ids, labels=labels)
    our_out = ours(ids, labels=labels, return_logits=True)  # with gradients on, logits only when asked
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


def test_longrope_short_sequence_uses_short_factors(tmp_path):
    # 10 positions fit in original_max_position_embeddings (12): the short factors apply, as in transformers.
    path, hf = make_checkpoint(tmp_path, "phi3_longrope")
    ours, _ = vt.load(path, dtype="float32", device="cpu")
    ids, _ = _inputs(hf.config, seq=10)
    with torch.no_grad():
        assert rel_err(ours(ids).logits, hf(input_ids=ids).logits) <= 1e-5
        long_ids, _ = _inputs(hf.config, seq=19)
        assert rel_err(ours(long_ids).logits[:, :10], ours(long_ids[:, :10]).logits) > 1e-3  # the switch is real


def test_unsupported_rope_type_is_refused_at_load(tmp_path):
    path, _ = make_checkpoint(tmp_path, "llama_tied")
    config = json.loads((path / "config.json").read_text())
    config["rope_parameters"] = {"rope_type": "mrope", "rope_theta": 10000.0, "mrope_section": [2, 2, 4]}
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedError, match=r"'mrope'.*supported: default, linear, dynamic, llama3, yarn"):
        vt.load(path, dtype="float32", device="cpu")


def _two_samples(vocab, lengths=(11, 12)):
    g = torch.Generator().manual_seed(11)
    return [torch.randint(0, vocab, (1, n), generator=g) for n in lengths]


@pytest.mark.parametrize("case", ["llama", "gemma2"])
def test_packed_row_matches_separate_samples(tmp_path, case):
    # gemma2: both samples are longer than its sliding window (8), so windows and document edges both count.
    path, hf = make_checkpoint(tmp_path, case)
    ours, _ = vt.load(path, dtype="float32", device="cpu")
    a, b = _two_samples(hf.config.vocab_size)
    packed = torch.cat([a, b], dim=1)
    documents = torch.tensor([[0] * a.shape[1] + [1] * b.shape[1]])
    positions = torch.cat([torch.arange(a.shape[1]), torch.arange(b.shape[1])])[None]
    labels = packed.clone()
    labels[0, a.shape[1]] = -100  # the last token of `a` must not learn to predict the first of `b`
    with torch.no_grad():
        out = ours(packed, labels=labels, document_ids=documents, reduction="sum")
        alone_a, alone_b = ours(a, labels=a, reduction="sum"), ours(b, labels=b, reduction="sum")
        hf_a, hf_b = hf(input_ids=a).logits, hf(input_ids=b).logits
        # transformers packs when given restarting positions, no attention mask and no cache: the same numbers
        hf_packed = hf(input_ids=packed, position_ids=positions, use_cache=False).logits
    n = a.shape[1]
    assert rel_err(out.logits[:, :n], alone_a.logits) <= 1e-5
    assert rel_err(out.logits[:, n:], alone_b.logits) <= 1e-5
    assert rel_err(out.logits[:, :n], hf_a) <= 1e-5 and rel_err(out.logits[:, n:], hf_b) <= 1e-5
    assert rel_err(out.logits, hf_packed) <= 1e-5
    assert out.num_tokens.item() == alone_a.num_tokens.item() + alone_b.num_tokens.item()
    assert out.loss.item() == pytest.approx(alone_a.loss.item() + alone_b.loss.item(), rel=1e-5)
    with torch.no_grad():
        # positions restarting per document are the default with document_ids
        assert torch.equal(ours(packed, document_ids=documents, position_ids=positions).logits, out.logits)
        # without document_ids the row is one document: the second sample's logits change
        assert rel_err(ours(packed).logits[:, n:], alone_b.logits) > 1e-3


@pytest.mark.parametrize("case", ["llama", "gemma2"])
def test_position_ids_alone_are_plain_positions(tmp_path, case):
    """position_ids without document_ids place the tokens (RoPE) and nothing else: the row stays one document.
    transformers reads the same call differently (restarting positions and no mask: it packs), so the reference
    is transformers given an all-ones attention_mask, which turns its packing inference off."""
    path, hf = make_checkpoint(tmp_path, case)
    ours, _ = vt.load(path, dtype="float32", device="cpu")
    a, b = _two_samples(hf.config.vocab_size)
    row = torch.cat([a, b], dim=1)
    positions = torch.cat([torch.arange(a.shape[1]), torch.arange(b.shape[1])])[None]
    with torch.no_grad():
        plain = ours(row, position_ids=positions).logits
        reference = hf(input_ids=row, position_ids=positions, attention_mask=torch.ones_like(row)).logits
        packed = ours(row, document_ids=torch.tensor([[0] * a.shape[1] + [1] * b.shape[1]])).logits
    assert rel_err(plain, reference) <= 1e-5
    n = a.shape[1]
    assert rel_err(plain[:, n:], packed[:, n:]) > 1e-3  # the second sample sees the first
    assert rel_err(plain[:, :n], packed[:, :n]) <= 1e-5  # (the first sees nothing new either way)


@pytest.mark.parametrize("case", ["llama", "gemma2", "qwen2", "phi3"])
def test_left_padded_batch_matches_unpadded_rows(tmp_path, case):
    path, hf = make_checkpoint(tmp_path, case)
    ours, _ = vt.load(path, dtype="float32", device="cpu")
    long, short = _two_samples(hf.config.vocab_size, lengths=(19, 13))
    pad = 19 - 13
    batch = torch.cat([long, torch.cat([torch.zeros(1, pad, dtype=torch.long), short], dim=1)])
    mask = torch.ones_like(batch)
    mask[1, :pad] = 0
    with torch.no_grad():
        padded = ours(batch, attention_mask=mask).logits
        assert rel_err(padded[0:1], ours(long).logits) <= 1e-5
        assert rel_err(padded[1:2, pad:], ours(short).logits) <= 1e-5
        assert rel_err(padded[1:2, pad:], hf(input_ids=short).logits) <= 1e-5
        assert torch.isfinite(padded).all()  # padded queries attend to themselves: no NaN rows


@pytest.mark.parametrize("case", ["llama_tied", "gemma2", "phi3"])
def test_loss_without_logits_matches_transformers(tmp_path, case):
    # return_logits=False takes the fused linear + cross-entropy path (gemma2: with the final soft-cap inside).
    path, hf = make_checkpoint(tmp_path, case)
    ours, _ = vt.load(path, dtype="float32", device="cpu")
    ids, labels = _inputs(hf.config)
    hf_loss = hf(input_ids=ids, labels=labels).loss
    out = ours(ids, labels=labels, return_logits=False)
    assert out.logits is None
    assert abs(out.loss.item() - hf_loss.item()) <= 1e-5 * hf_loss.item()
    hf_loss.backward()
    out.loss.backward()
    ref = dict(hf.named_parameters())
    for name, p in ours.named_parameters():
        assert rel_err(p.grad, ref[name].grad) <= 1e-4, name
