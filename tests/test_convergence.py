"""Convergence A/B: a 4-layer mini Llama with LoRA trained 30 steps from one seed on the fused path (fused LoRA
blocks, chunked cross-entropy) and on the reference path (VELOTUNE_KERNELS=reference: plain LoRA modules, the
reference loss). Every step's loss and the final adapters agree: fp32 to 1e-5 relative; in bf16 the fused run's
distance to a float64 run is at most 3x the plain bf16 run's distance to it."""
import pytest
import torch

from kernel_checks import rel_err
from test_kernels_lora import kernels
from test_memory import tiny_model

STEPS = 30


def batches(n, vocab=101, seed=4, distinct=4):
    """Packed rows (two documents each) with some prompt tokens masked out of the loss: `distinct`
    batches seen in turn, so the loss falls (4.83 -> 3.16) and the comparison is not between two noisy lines."""
    g = torch.Generator().manual_seed(seed)
    documents = torch.tensor([[0] * 9 + [1] * 12, [0] * 14 + [1] * 7])
    out = []
    for _ in range(distinct):
        ids = torch.randint(0, vocab, documents.shape, generator=g)
        labels = ids.clone()
        labels[:, :3] = -100
        out.append((ids, labels, documents))
    return [out[i % distinct] for i in range(n)]


def train(mode, dtype=torch.float32, quantize=None):
    """(loss per step, final trainable parameters in fp64) of STEPS SGD steps under VELOTUNE_KERNELS=mode.

    Plain SGD carries a gradient difference through linearly. Adam would not: it divides each element by its own
    magnitude, so a 1e-8 rounding difference on a near-zero gradient element becomes a full-size update
    difference (measured with AdamW(lr=1e-2) on the QLoRA model: 3.4e-6 after one step, 1.4e-5 after 30, with
    gradients that agree to 6e-7): that would test Adam, not the kernels."""
    model = tiny_model(layers=4, quantize=quantize)
    if dtype == torch.float64:
        model.double()
    else:
        _cast_frozen(model, dtype)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.3)
    losses = []
    with kernels(mode):
        for ids, labels, documents in batches(STEPS):
            loss = model(ids, labels=labels, document_ids=documents, return_logits=False).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.item())
    return torch.tensor(losses, dtype=torch.float64), torch.cat([p.detach().double().flatten() for p in params])


def _cast_frozen(model, dtype):
    """The base in `dtype`, the adapters kept in fp32 (velotune's default: fp32 adapters over a bf16 base)."""
    for p in model.parameters():
        if not p.requires_grad and p.is_floating_point():
            p.data = p.data.to(dtype)


def test_fp32_fused_path_trains_like_the_reference():
    fused_losses, fused_params = train("auto")
    ref_losses, ref_params = train("reference")
    assert ref_losses[-1] < 0.7 * ref_losses[0]  # it learns
    assert ((fused_losses - ref_losses).abs() / ref_losses).max() < 1e-5
    assert rel_err(fused_params, ref_params) < 1e-5


def test_fp32_qlora_fused_path_trains_like_the_reference():
    """NF4 bases: the fused path dequantizes with our kernel (bit-exact with bitsandbytes), forward and backward."""
    pytest.importorskip("bitsandbytes")
    fused_losses, fused_params = train("auto", quantize="nf4")
    ref_losses, ref_params = train("reference", quantize="nf4")
    assert ((fused_losses - ref_losses).abs() / ref_losses).max() < 1e-5
    assert rel_err(fused_params, ref_params) < 1e-5


def test_bf16_fused_path_within_plain_bf16_error():
    """bf16 bases, fp32 adapters. The oracle is the same training in float64; plain PyTorch in bf16 is off from it
    by its rounding, which grows over the 30 steps. The fused run rounds in other places: its error has the same
    size, not the same value. Measured over six data seeds, fused error / plain error: 0.25-1.93 for the loss curve,
    0.39-1.90 for the final adapters (this seed: 1.93 and 0.94). Bound: 3x, for both."""
    oracle_losses, oracle_params = train("reference", torch.float64)
    plain_losses, plain_params = train("reference", torch.bfloat16)
    fused_losses, fused_params = train("auto", torch.bfloat16)
    plain_err = rel_err(plain_losses, oracle_losses), rel_err(plain_params, oracle_params)
    fused_err = rel_err(fused_losses, oracle_losses), rel_err(fused_params, oracle_params)
    assert 0 < plain_err[0] < 1e-2 and 0 < plain_err[1] < 3e-2  # bf16 noise (measured <= 1.2e-3, 6.6e-3)
    assert fused_err[0] <= 3 * plain_err[0] and fused_err[1] <= 3 * plain_err[1], (fused_err, plain_err)
