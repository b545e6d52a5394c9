"""Fused linear cross-entropy: the chunked path (pure PyTorch, and with the Triton per-chunk kernel on the CPU
interpreter) against the reference, in float64 (gradcheck), fp32, and half precision against a float64 oracle;
and what it keeps for backward (never [tokens, vocab])."""
import os

os.environ["TRITON_INTERPRET"] = "1"  # before any Triton kernel module is imported (triton.jit reads it then)

import importlib.util  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from kernel_checks import assert_within_torch_error, errors_vs_fp64, rel_err  # noqa: E402
from velotune.kernels import cross_entropy as ce  # noqa: E402
from velotune.kernels import linear_cross_entropy  # noqa: E402
from velotune.kernels.cross_entropy import chunked_linear_cross_entropy, linear_cross_entropy_reference  # noqa: E402

HAS_TRITON = importlib.util.find_spec("triton") is not None
IMPLS = [False, pytest.param(True, marks=pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed"))]


@pytest.fixture(autouse=True, scope="module")
def _gpu_bf16_rounding():
    if not HAS_TRITON:
        yield
        return
    from kernel_checks import round_bf16_like_a_gpu
    with pytest.MonkeyPatch.context() as mp:
        round_bf16_like_a_gpu(mp)
        yield


def _problem(N=37, H=24, V=101, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, H, generator=g, dtype=torch.float64).to(dtype)
    weight = (torch.randn(V, H, generator=g, dtype=torch.float64) * 0.4).to(dtype)
    targets = torch.randint(0, V, (N,), generator=g)
    targets[::5] = -100
    return hidden, weight, targets


def _oracle(softcap, reduction):
    def f(h, w, t):  # float64 throughout (the reference casts its logits to fp32)
        logits = h @ w.t()
        if softcap:
            logits = torch.tanh(logits / softcap) * softcap
        return F.cross_entropy(logits, t, reduction=reduction)
    return f


def _loss_and_grads(fn, hidden, weight, targets, scale=1.5, **kw):
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    loss = fn(h, w, targets, **kw)
    gh, gw = torch.autograd.grad(loss * scale, (h, w))
    return loss.detach(), gh, gw


@pytest.mark.parametrize("use_triton", IMPLS)
@pytest.mark.parametrize("softcap", [None, 2.0])
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_fp32_matches_reference(use_triton, softcap, reduction):
    hidden, weight, targets = _problem()
    kw = dict(softcap=softcap, reduction=reduction)
    ref = _loss_and_grads(linear_cross_entropy_reference, hidden, weight, targets, **kw)
    for rows in (8, 37, None):  # chunks that do not divide the tokens, one chunk, the budget's choice
        out = _loss_and_grads(chunked_linear_cross_entropy, hidden, weight, targets, use_triton=use_triton,
                              chunk_rows=rows, **kw)
        assert out[0].dtype == ref[0].dtype == torch.float32
        assert out[1].dtype == out[2].dtype == torch.float32
        for name, a, b in zip(("loss", "grad hidden", "grad weight"), out, ref):
            assert rel_err(a, b) < 1e-6, (name, rel_err(a, b))


@pytest.mark.parametrize("use_triton", IMPLS)
@pytest.mark.parametrize("softcap,reduction", [(None, "sum"), (1.5, "mean")])
def test_float64_gradcheck(use_triton, softcap, reduction):
    hidden, weight, targets = _problem(N=5, H=3, V=7, dtype=torch.float64)
    targets[1] = -100
    h, w = hidden.requires_grad_(), weight.requires_grad_()
    fn = lambda a, b: chunked_linear_cross_entropy(a, b, targets, softcap=softcap, reduction=reduction,  # noqa
                                                   use_triton=use_triton, chunk_rows=2)
    assert torch.autograd.gradcheck(fn, (h, w), fast_mode=use_triton)
    assert rel_err(fn(h, w), _oracle(softcap, reduction)(h, w, targets)) < 1e-13


@pytest.mark.parametrize("use_triton", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_within_torch_error(use_triton, dtype):
    """Against a float64 oracle: at most 2x the error of the plain PyTorch reference in the same dtype."""
    hidden, weight, targets = _problem(N=45, H=32, V=211, dtype=torch.float64)
    kw = dict(softcap=3.0, reduction="sum")
    rows = errors_vs_fp64(lambda h, w: chunked_linear_cross_entropy(h, w, targets, use_triton=use_triton,
                                                                    chunk_rows=16, **kw),
                          lambda h, w: linear_cross_entropy_reference(h, w, targets, **kw),
                          lambda h, w: _oracle(**kw)(h, w, targets), [hidden, weight], dtype)
    assert_within_torch_error(rows)


@pytest.mark.parametrize("use_triton", IMPLS)
def test_under_autocast_logits_are_computed_like_the_reference(use_triton):
    """fp32 hidden and weight under bf16 autocast (fp32 master weights, bf16 compute): the logits matmul runs in
    bf16 as the reference's `hidden @ weight.T` does, not silently in fp32; loss and gradients stay within
    2x the reference's own error against float64, and a bf16 hidden with an fp32 weight is accepted too."""
    hidden, weight, targets = _problem(N=45, H=32, V=211, dtype=torch.float64)
    kw = dict(softcap=None, reduction="sum")
    oracle = _loss_and_grads(_oracle(**kw), hidden, weight, targets)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = _loss_and_grads(lambda h, w, t: chunked_linear_cross_entropy(h, w, t, use_triton=use_triton,
                                                                           chunk_rows=16, **kw),
                               hidden.float(), weight.float(), targets)
        ref = _loss_and_grads(lambda h, w, t: linear_cross_entropy_reference(h, w, t, **kw),
                              hidden.float(), weight.float(), targets)
        mixed = chunked_linear_cross_entropy(hidden.bfloat16(), weight.float(), targets, chunk_rows=16, **kw)
    exact_fp32 = chunked_linear_cross_entropy(hidden.float(), weight.float(), targets, chunk_rows=16, **kw)
    assert rel_err(ours[0], oracle[0]) > 10 * rel_err(exact_fp32, oracle[0])  # bf16 logits, as the reference
    for o, r, x in zip(ours, ref, oracle):
        assert rel_err(o, x) <= 2 * rel_err(r, x) + 1e-6
    assert rel_err(mixed, oracle[0]) < 1e-2


def test_grad_weight_accumulates_in_fp32():
    """Many chunks of bf16 contributions: summed in fp32, the weight gradient stays as close to the float64
    answer as one bf16 rounding."""
    hidden, weight, targets = _problem(N=256, H=16, V=64, dtype=torch.float64)
    h16, w16 = hidden.bfloat16(), weight.bfloat16()
    _, _, gw = _loss_and_grads(chunked_linear_cross_entropy, h16, w16, targets, scale=1.0, chunk_rows=4)
    _, _, gw_exact = _loss_and_grads(_oracle(None, "sum"), h16.double(), w16.double(), targets, scale=1.0)
    assert gw.dtype == torch.bfloat16
    assert rel_err(gw, gw_exact) <= 2 * rel_err(gw_exact.bfloat16(), gw_exact) + 1e-4


def _saved_bytes(fn):
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = fn()
    loss.backward()
    return sum(storages.values())


@pytest.mark.parametrize("dtype,softcap", [(torch.float32, None), (torch.float32, 30.0), (torch.bfloat16, None)])
def test_saves_gradients_not_logits(dtype, softcap):
    N, H, V = 256, 16, 1000
    hidden, weight, targets = _problem(N, H, V, dtype)
    grads_bytes = (hidden.numel() + weight.numel()) * hidden.element_size()
    logits_bytes = N * V * 4

    def run(fn, **kw):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        return _saved_bytes(lambda: fn(h, w, targets, softcap=softcap, **kw))

    fused = run(chunked_linear_cross_entropy, chunk_rows=64)
    reference = run(linear_cross_entropy_reference)
    assert fused <= grads_bytes + 1024, (fused, grads_bytes)
    assert fused < logits_bytes / 10
    assert reference >= logits_bytes  # the reference keeps the fp32 log-probabilities
    print(f"saved for backward: fused {fused} B, reference {reference} B, ratio {reference / fused:.1f}")


def test_frozen_weight_saves_only_hidden_grad():
    hidden, weight, targets = _problem()
    h = hidden.clone().requires_grad_()
    saved = _saved_bytes(lambda: chunked_linear_cross_entropy(h, weight, targets))
    assert saved == hidden.numel() * hidden.element_size()
    assert weight.grad is None and rel_err(h.grad, _loss_and_grads(
        linear_cross_entropy_reference, hidden, weight, targets, scale=1.0)[1]) < 1e-6


def test_no_grad_and_edge_cases():
    hidden, weight, targets = _problem()
    with torch.no_grad():
        loss = chunked_linear_cross_entropy(hidden.requires_grad_(), weight, targets, chunk_rows=5)
    assert loss.grad_fn is None
    assert rel_err(loss, linear_cross_entropy_reference(hidden.detach(), weight, targets)) < 1e-6
    everything_ignored = torch.full_like(targets, -100)
    loss, gh, gw = _loss_and_grads(chunked_linear_cross_entropy, hidden.detach(), weight, everything_ignored)
    assert loss.item() == 0.0 and gh.abs().max().item() == 0.0 and gw.abs().max().item() == 0.0
    mean = chunked_linear_cross_entropy(hidden.detach(), weight, everything_ignored, reduction="mean")
    assert torch.isnan(mean) and torch.isnan(linear_cross_entropy_reference(
        hidden.detach(), weight, everything_ignored, reduction="mean"))
    with pytest.raises(ValueError, match="reduction"):
        chunked_linear_cross_entropy(hidden.detach(), weight, targets, reduction="max")
    with pytest.raises(ValueError, match="expected hidden"):
        chunked_linear_cross_entropy(hidden.detach()[None], weight, targets)


def test_grad_output_scales_saved_grads():
    hidden, weight, targets = _problem()
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    chunked_linear_cross_entropy(h, w, targets).backward(torch.tensor(-0.25))
    _, gh, gw = _loss_and_grads(linear_cross_entropy_reference, hidden, weight, targets, scale=-0.25)
    assert rel_err(h.grad, gh) < 1e-6 and rel_err(w.grad, gw) < 1e-6


def test_chunk_rows_respect_the_memory_budget(monkeypatch):
    hidden = torch.zeros(10_000, 8)
    rows = ce._chunk_rows(10_000, 128_256, hidden, None)
    assert 1 <= rows < 10_000 and rows * 128_256 * 8 <= 32 * 2**20  # fp32 logits + one temporary
    monkeypatch.setenv("VELOTUNE_CE_CHUNK_MB", "1")
    assert ce._chunk_rows(10_000, 128_256, hidden, 30.0) == 1
    assert ce._chunk_rows(7, 100, hidden, None) == 7


def test_dispatch_picks_chunked_on_cpu(monkeypatch):
    calls = []
    real = ce.chunked_linear_cross_entropy
    monkeypatch.setattr(ce, "chunked_linear_cross_entropy", lambda *a, **k: calls.append(k) or real(*a, **k))
    hidden, weight, targets = _problem()
    h = hidden.requires_grad_()
    monkeypatch.delenv("VELOTUNE_KERNELS", raising=False)
    loss = linear_cross_entropy(h, weight, targets)
    assert calls and calls[-1].get("use_triton") is False
    assert type(loss.grad_fn).__name__ == "ChunkedLinearCrossEntropyBackward"
    n = len(calls)
    per_token = linear_cross_entropy(h, weight, targets, reduction="none")
    assert per_token.shape == targets.shape and len(calls) == n + 1
    n += 1
    monkeypatch.setenv("VELOTUNE_KERNELS", "reference")
    assert rel_err(linear_cross_entropy(h, weight, targets), loss) < 1e-6 and len(calls) == n
    if HAS_TRITON:
        monkeypatch.setenv("VELOTUNE_KERNELS", "triton")
        assert rel_err(linear_cross_entropy(h, weight, targets), loss) < 1e-6
        assert calls[-1].get("use_triton") is True


# ---- per-row losses (reduction="none"): token log-probabilities for preference and RL objectives -------------

def _per_row_loss_and_grads(fn, hidden, weight, targets, weights, **kw):
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    losses = fn(h, w, targets, **kw)
    gh, gw = torch.autograd.grad((losses * weights).sum(), (h, w))  # every row with its own grad_output
    return losses.detach(), gh, gw


@pytest.mark.parametrize("use_triton", IMPLS)
@pytest.mark.parametrize("softcap", [None, 2.0])
def test_per_row_fp32_matches_reference(use_triton, softcap):
    hidden, weight, targets = _problem()
    weights = torch.randn(targets.shape[0], generator=torch.Generator().manual_seed(1))
    ref = _per_row_loss_and_grads(linear_cross_entropy_reference, hidden, weight, targets, weights,
                                  softcap=softcap, reduction="none")
    for rows in (8, None):
        out = _per_row_loss_and_grads(chunked_linear_cross_entropy, hidden, weight, targets, weights,
                                      softcap=softcap, reduction="none", use_triton=use_triton, chunk_rows=rows)
        assert out[0].shape == targets.shape and out[0].dtype == torch.float32
        assert (out[0][targets == -100] == 0).all()
        for name, a, b in zip(("losses", "grad hidden", "grad weight"), out, ref):
            assert rel_err(a, b) < 1e-6, (name, rel_err(a, b))


@pytest.mark.parametrize("use_triton", IMPLS)
def test_per_row_float64_gradcheck(use_triton):
    hidden, weight, targets = _problem(N=5, H=3, V=7, dtype=torch.float64)
    targets[1] = -100
    h, w = hidden.requires_grad_(), weight.requires_grad_()
    fn = lambda a, b: chunked_linear_cross_entropy(a, b, targets, softcap=1.5, reduction="none",  # noqa: E731
                                                   use_triton=use_triton, chunk_rows=2)
    assert torch.autograd.gradcheck(fn, (h, w), fast_mode=use_triton)
    assert rel_err(fn(h, w), _oracle(1.5, "none")(h, w, targets)) < 1e-13


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_per_row_half_precision_within_torch_error(dtype):
    hidden, weight, targets = _problem(N=45, H=32, V=211, dtype=torch.float64)
    kw = dict(softcap=3.0, reduction="none")  # random output gradients: every row weighed differently
    rows = errors_vs_fp64(lambda h, w: chunked_linear_cross_entropy(h, w, targets, chunk_rows=16, **kw),
                          lambda h, w: linear_cross_entropy_reference(h, w, targets, **kw),
                          lambda h, w: _oracle(**kw)(h, w, targets), [hidden, weight], dtype)
    assert_within_torch_error(rows)


def test_per_row_saves_inputs_not_logits():
    N, H, V = 256, 16, 1000
    hidden, weight, targets = _problem(N, H, V)
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    saved = _saved_bytes(lambda: chunked_linear_cross_entropy(h, w, targets, reduction="none", chunk_rows=64).sum())
    assert saved <= (hidden.numel() + weight.numel()) * 4 + targets.numel() * 8 + 1024
    assert saved < N * V * 4 / 10
    with torch.no_grad():
        assert rel_err(chunked_linear_cross_entropy(hidden, weight, targets, reduction="none"),
                       linear_cross_entropy_reference(hidden, weight, targets, reduction="none")) < 1e-6


def test_next_token_logprobs_per_token_and_per_sequence():
    """Label log-probabilities from hidden states (no logits) against log_softmax of the full logits, values and
    gradients, with each sequence's sum weighed differently (as a preference loss does)."""
    from velotune.models.base import next_token_logprobs
    g = torch.Generator().manual_seed(7)
    hidden = torch.randn(3, 9, 16, generator=g, dtype=torch.float64)
    weight = torch.randn(50, 16, generator=g, dtype=torch.float64) * 0.3
    labels = torch.randint(0, 50, (3, 9), generator=g)
    labels[0, :4] = -100  # a prompt without targets
    labels[2, 6:] = -100  # padding
    seq_weights = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)

    def reference(h, w):
        logp = torch.log_softmax(h @ w.t(), dim=-1)
        shifted = F.pad(labels[:, 1:], (0, 1), value=-100)
        picked = logp.gather(-1, shifted.clamp(min=0)[..., None])[..., 0] * (shifted != -100)
        return picked, picked.sum(1)

    h1, w1 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    per_token, per_seq, counts = next_token_logprobs(h1, labels, w1)
    (per_seq * seq_weights).sum().backward()
    h2, w2 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    ref_token, ref_seq = reference(h2, w2)
    (ref_seq * seq_weights).sum().backward()
    assert counts.tolist() == [5, 8, 5]  # labels[1:] of each row, less the masked ones
    assert rel_err(per_token, ref_token) < 1e-12 and rel_err(per_seq, ref_seq) < 1e-12
    assert rel_err(h1.grad, h2.grad) < 1e-12 and rel_err(w1.grad, w2.grad) < 1e-12
