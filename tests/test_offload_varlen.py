"""Activation checkpointing with offload (kernels/offload.py) and padding-free attention over packed rows
(kernels/varlen.py): the same numbers as the plain paths."""
import warnings

import pytest
import torch

from kernel_checks import rel_err
from test_kernels_lora import kernels, randomize_b
from test_memory import tiny_model
from velotune.errors import UnsupportedError
from velotune.kernels import varlen
from velotune.kernels.varlen import document_bounds, packed_backend
from velotune.lora import add_lora
from velotune.models.attention import AttentionMask, document_positions

pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")

# two packed rows: samples of 10 + 13 tokens, and 5 + 11 + 7
DOCS = torch.tensor([[0] * 10 + [1] * 13, [0] * 5 + [1] * 11 + [2] * 7])
IDS = torch.randint(0, 101, DOCS.shape, generator=torch.Generator().manual_seed(5))


def loss_and_grads(model, checkpointing, seed=9):
    model.set_gradient_checkpointing(checkpointing)
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)  # the LoRA dropout masks
    with kernels("auto"):
        loss = model(IDS, labels=IDS, document_ids=DOCS, return_logits=False).loss
        loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("checkpointing", ["offload", True])
@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_checkpointing_gives_the_same_gradients(dropout, checkpointing):
    """dropout 0: the fused LoRA path inside each recomputed block; 0.1: the plain path, and the dropout masks
    of the recomputation must be those of the forward (the random state is restored)."""
    model = tiny_model(layers=2, dropout=dropout).train()
    loss, grads = loss_and_grads(model, False)
    loss_off, grads_off = loss_and_grads(model, checkpointing)
    assert len(grads) == 2 * 7 * 2 and grads.keys() == grads_off.keys()
    assert loss_off == loss
    for name in grads:
        assert rel_err(grads_off[name], grads[name]) < 1e-6, name
    if dropout:  # a different seed gives other masks: the agreement above is not an accident
        assert loss_and_grads(model, False, seed=10)[0] != loss


def test_offload_applies_only_when_training_with_autograd():
    model = tiny_model(layers=1)
    model.set_gradient_checkpointing("offload")
    model.train()
    out = model(IDS, document_ids=DOCS)
    nodes = {type(n).__name__ for n in _graph_nodes(out.logits.grad_fn)}
    assert "OffloadedCheckpointBackward" in nodes
    model.eval()
    out = model(IDS, document_ids=DOCS)
    assert "OffloadedCheckpointBackward" not in {type(n).__name__ for n in _graph_nodes(out.logits.grad_fn)}
    with pytest.raises(ValueError, match="'offload'"):
        model.set_gradient_checkpointing("cpu")


def _graph_nodes(fn, seen=None):
    seen = set() if seen is None else seen
    if fn is not None and fn not in seen:
        seen.add(fn)
        for child, _ in fn.next_functions:
            _graph_nodes(child, seen)
    return seen


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the pinned host copy on a side stream needs CUDA")
def test_offload_on_cuda_copies_to_pinned_host_memory():
    model = tiny_model(layers=2).cuda().train()
    ids, docs = IDS.cuda(), DOCS.cuda()
    model.set_gradient_checkpointing("offload")
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        loss = model(ids, labels=ids, document_ids=docs, return_logits=False).loss
    hosts = [t for t in saved if t.device.type == "cpu" and t.shape == (2, 23, 64)]
    assert len(hosts) == 2 and all(t.is_pinned() for t in hosts)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.set_gradient_checkpointing(False)
    model.zero_grad()
    model(ids, labels=ids, document_ids=docs, return_logits=False).loss.backward()
    for n, p in model.named_parameters():
        if p.grad is not None:
            assert rel_err(grads[n], p.grad) < 1e-5, n


# ---------------------------------------------------------------- packed rows without a dense mask

def test_document_bounds_and_positions():
    cu, longest = document_bounds(DOCS)
    assert cu.tolist() == [0, 10, 23, 28, 39, 46] and cu.dtype == torch.int32 and longest == 13
    # ids are compared with their neighbours only: each row starts a document whatever its first id
    cu, longest = document_bounds(torch.tensor([[5, 5, 6, 6], [6, 6, 6, 7]]))
    assert cu.tolist() == [0, 2, 4, 7, 8] and longest == 3
    assert document_positions(DOCS).tolist() == [list(range(10)) + list(range(13)),
                                                 list(range(5)) + list(range(11)) + list(range(7))]


def _gemma2():
    from velotune.models.gemma2 import Args, Model
    args = Args(vocab_size=101, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16, sliding_window=6,
                attn_logit_softcapping=5.0, final_logit_softcapping=30.0)
    args.validate()
    torch.manual_seed(0)
    return randomize_b(add_lora(Model(args), r=4, alpha=8, seed=1))


@pytest.mark.parametrize("family", ["llama_window", "gemma2_softcap"])
def test_flex_document_mask_matches_the_dense_mask(monkeypatch, family):
    """GQA, a sliding window (every layer for llama, alternate layers for Gemma 2), attention soft-capping
    (Gemma 2): logits through flex_attention's document mask equal the dense block mask's, and no [T, T] mask
    is built. flex runs eagerly here (the CPU), the same mask_mod and score_mod a GPU compiles."""
    model = (tiny_model(layers=2, sliding_window=6) if family == "llama_window" else _gemma2()).eval()
    with torch.no_grad():
        monkeypatch.setenv("VELOTUNE_ATTENTION", "dense")
        dense = model(IDS, document_ids=DOCS).logits
        monkeypatch.setenv("VELOTUNE_ATTENTION", "flex")
        with monkeypatch.context() as patch:
            patch.setattr(AttentionMask, "_build", lambda *a: pytest.fail("a dense mask was built"))
            flex = model(IDS, document_ids=DOCS).logits
    assert rel_err(flex, dense) < 1e-6
    # and the packing matters: without the document mask the logits differ
    with torch.no_grad():
        unpacked = model(IDS).logits
    assert rel_err(unpacked, dense) > 1e-2


def test_backend_choice(monkeypatch):
    q = torch.zeros(1, 2, 4, 8)
    monkeypatch.delenv("VELOTUNE_ATTENTION", raising=False)
    assert packed_backend(q) == packed_backend(q, needs_grad=True) == "segments"  # the CPU: SDPA per sample
    monkeypatch.setenv("VELOTUNE_ATTENTION", "dense")
    assert packed_backend(q) == "dense"
    monkeypatch.setenv("VELOTUNE_ATTENTION", "flex")
    assert packed_backend(q) == "flex"
    assert packed_backend(q, needs_grad=True) == "dense"  # flex_attention has no CPU backward
    monkeypatch.setenv("VELOTUNE_KERNELS", "reference")
    assert packed_backend(q) == "dense"
    monkeypatch.delenv("VELOTUNE_KERNELS")
    monkeypatch.setenv("VELOTUNE_ATTENTION", "flash")
    monkeypatch.setattr(varlen, "flash_attn_available", lambda: False)
    with pytest.raises(UnsupportedError, match="flash-attn"):
        packed_backend(q)
    monkeypatch.setenv("VELOTUNE_ATTENTION", "fast")
    with pytest.raises(ValueError, match="VELOTUNE_ATTENTION"):
        packed_backend(q)


def test_training_with_flex_forced_on_the_cpu_takes_the_dense_path(monkeypatch):
    model = tiny_model(layers=1).train()
    monkeypatch.setenv("VELOTUNE_ATTENTION", "flex")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no eager-flex warning: flex did not run
        loss_flex, grads_flex = loss_and_grads(model, False)
    monkeypatch.setenv("VELOTUNE_ATTENTION", "dense")
    loss, grads = loss_and_grads(model, False)
    assert loss_flex == loss and all(torch.equal(grads[n], grads_flex[n]) for n in grads)


# a row of three samples (7 + 6 + 5) and tail padding (a document of its own, no labels), and a row holding one
# sample
SEG_DOCS = torch.tensor([[0] * 7 + [1] * 6 + [2] * 5 + [3] * 6, [0] * 24])
SEG_IDS = torch.randint(0, 101, SEG_DOCS.shape, generator=torch.Generator().manual_seed(6))
SEG_LABELS = SEG_IDS.clone()
SEG_LABELS[0, 18:] = -100


def _logits_and_grads(model, documents):
    model.zero_grad(set_to_none=True)
    out = model(SEG_IDS, labels=SEG_LABELS, document_ids=documents, return_logits=True)
    (out.loss + out.logits.square().mean()).backward()  # every logit gets a gradient, padding included
    return out.logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("window", [None, 24])
@pytest.mark.parametrize("single", [False, True], ids=["packed", "one_sample_per_row"])
@pytest.mark.parametrize("limit", [0, 256], ids=["sample_by_sample", "short_samples_together"])
def test_cpu_segments_path_matches_the_dense_mask(monkeypatch, window, single, limit):
    """The CPU default for packed rows: SDPA per slice (no [T, T] mask built), the dense path's logits and
    gradients. Each sample alone (limit 0), or short neighbours in one slice with a small block-diagonal mask
    (the default). A window no shorter than any sample changes nothing."""
    model = tiny_model(layers=2, sliding_window=window).train()
    documents = torch.zeros(2, 24, dtype=torch.long) if single else SEG_DOCS
    monkeypatch.setenv("VELOTUNE_ATTENTION", "dense")
    logits, grads = _logits_and_grads(model, documents)
    monkeypatch.delenv("VELOTUNE_ATTENTION")
    monkeypatch.setattr(varlen, "WINDOW_TOKENS", limit)
    calls = []
    real_sdpa = varlen.F.scaled_dot_product_attention
    monkeypatch.setattr(varlen.F, "scaled_dot_product_attention",
                        lambda *a, **kw: calls.append(a[0].shape[2]) or real_sdpa(*a, **kw))
    with monkeypatch.context() as patch:
        patch.setattr(AttentionMask, "_build", lambda *a: pytest.fail("a dense mask was built"))
        seg_logits, seg_grads = _logits_and_grads(model, documents)
    # per layer: one call on the whole batch, or one per slice (each sample, or row 0's four samples together)
    assert calls == ([24] * 2 if single else ([24, 24] if limit else [7, 6, 5, 6, 24]) * 2)
    assert rel_err(seg_logits, logits) < 1e-6 and grads.keys() == seg_grads.keys() and len(grads) == 28
    for name in grads:
        assert rel_err(seg_grads[name], grads[name]) < 1e-5, name


def test_slice_plan_puts_short_neighbours_together_and_long_samples_alone():
    docs = torch.tensor([[0] * 100 + [1] * 120 + [2] * 30 + [3] * 300 + [4] * 20 + [5] * 10])
    assert varlen.slice_plan(docs, 256) == [(0, 0, 250, 3), (0, 250, 550, 1), (0, 550, 580, 2)]
    assert varlen.slice_plan(docs, 0) == [(0, s, e, 1) for s, e in varlen.row_segments(docs)[0]]


@pytest.mark.parametrize("bucketed", [False, True], ids=["exact_lengths", "bucket_lengths"])
def test_slices_of_several_samples_give_the_dense_paths_numbers(monkeypatch, bucketed):
    """Windows of 256 tokens: rows of 580 tokens in three slices (100 + 120 + 30 together, 300 alone, 20 + 10
    together): the dense mask's logits and every gradient, also when the slices run at bucket lengths, padded with
    zero positions (250 -> 256, 300 -> 320, 30 -> 32)."""
    docs = torch.tensor([[0] * 100 + [1] * 120 + [2] * 30 + [3] * 300 + [4] * 20 + [5] * 10] * 2)
    ids = torch.randint(0, 101, docs.shape, generator=torch.Generator().manual_seed(7))
    model = tiny_model(layers=2).train()

    def run():
        model.zero_grad(set_to_none=True)
        out = model(ids, labels=ids, document_ids=docs, return_logits=True)
        (out.loss + out.logits.square().mean()).backward()
        return out.logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    monkeypatch.setenv("VELOTUNE_ATTENTION", "dense")
    logits, grads = run()
    monkeypatch.delenv("VELOTUNE_ATTENTION")
    monkeypatch.setattr(varlen, "WINDOW_TOKENS", 256)
    if bucketed:
        monkeypatch.setattr(varlen, "shape_keyed_kernels", lambda device, dtype: True)
    calls = []
    real_sdpa = varlen.F.scaled_dot_product_attention
    monkeypatch.setattr(varlen.F, "scaled_dot_product_attention",
                        lambda *a, **kw: calls.append((a[0].shape[2], kw.get("attn_mask") is not None))
                        or real_sdpa(*a, **kw))
    with monkeypatch.context() as patch:
        patch.setattr(AttentionMask, "_build", lambda *a: pytest.fail("a dense mask was built"))
        seg_logits, seg_grads = run()
    lengths = [256, 320, 32] if bucketed else [250, 300, 30]
    assert calls == [(n, masked) for n, masked in zip(lengths, [True, False, True])] * 4  # 2 rows, 2 layers
    assert rel_err(seg_logits, logits) < 1e-6 and seg_grads.keys() == grads.keys()
    for name in grads:
        assert rel_err(seg_grads[name], grads[name]) < 1e-5, name


def test_cpu_segments_path_falls_back_to_the_dense_mask_for_a_short_window():
    """A window shorter than a sample: the dense mask (built once per forward, shared by the layers)."""
    model = tiny_model(layers=2, sliding_window=4).eval()
    built = []
    real_build = AttentionMask._build
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(AttentionMask, "_build", lambda self, w: built.append(w) or real_build(self, w))
        with torch.no_grad():
            model(SEG_IDS, document_ids=SEG_DOCS)
    assert built == [4]
