"""What velotune's Whisper keeps for backward, and that keeping less changes no gradient: the cross-attention that
never forms keys and values in training (against the plain path, to fp32 rounding) and the norm outputs rebuilt in
backward (kernels/recompute_saved.py: bit for bit), on a tiny random model with LoRA on q_proj / v_proj.
"""
import weakref

import pytest
import torch
from torch import nn

import velotune as vt
from velotune.kernels.recompute_saved import recomputed_in_backward
from velotune.lora import lora_layers
from velotune.models.whisper import Whisper, WhisperArgs
from velotune.models.whisper_blocks import WhisperAttention, layer_norm

CONFIG = dict(vocab_size=97, num_mel_bins=16, d_model=64, encoder_layers=2, decoder_layers=2,
              encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=96, decoder_ffn_dim=112,
              max_source_positions=48, max_target_positions=24, pad_token_id=95, bos_token_id=95,
              eos_token_id=95, decoder_start_token_id=94)


def rel_err(a, b):
    return ((a - b).norm() / b.norm().clamp(min=1e-30)).item()


def plain_paths():
    """An outer saved-tensor hook pair (the recompute then steps aside) and VELOTUNE_KERNELS=reference (the plain
    cross-attention): everything saved as autograd saves it by default."""
    return torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t)


def tiny_model(lora_targets=("q_proj", "v_proj"), **overrides):
    torch.manual_seed(0)
    model = Whisper(WhisperArgs.from_dict({**CONFIG, **overrides}))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:  # norms and biases off their 1/0 init
                p.normal_(1.0 if "layer_norm" in name and name.endswith("weight") else 0.0, 0.1)
    if lora_targets:
        vt.add_lora(model, r=4, alpha=8, targets=list(lora_targets), seed=0)
        with torch.no_grad():
            for layer in lora_layers(model).values():
                layer.lora_B.weight.normal_(0.0, 0.2)  # B starts at zero: make the adapters count
    return model.train()


def batch(rows=3, seq=9, seed=5):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, CONFIG["num_mel_bins"], 2 * CONFIG["max_source_positions"], generator=g)
    labels = torch.randint(0, 94, (rows, seq), generator=g)
    labels[-1, seq - 3:] = -100
    return x, labels


def grads(model, x, labels):
    model.zero_grad(set_to_none=True)
    out = model(x, labels=labels, reduction="sum")
    out.loss.backward()
    return out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("targets", [("q_proj", "v_proj"), ("k_proj", "v_proj", "out_proj", "fc1"), None])
def test_training_gradients_equal_the_plain_paths(targets, monkeypatch):
    model = tiny_model(targets)
    x, labels = batch()
    loss, ours = grads(model, x, labels)
    monkeypatch.setenv("VELOTUNE_KERNELS", "reference")
    with plain_paths():
        ref_loss, ref = grads(model, x, labels)
    assert ours.keys() == ref.keys() and len(ours) > 0
    assert rel_err(loss, ref_loss) <= 1e-6
    worst = max(rel_err(ours[n], ref[n]) for n in ref)
    assert worst <= 2e-6, worst  # measured ~3e-7: only the cross-attention's summation order differs


def test_recomputed_norm_outputs_change_no_bit(monkeypatch):
    """With the plain cross-attention on both sides, the encoder's rebuilt norm outputs give identical gradients."""
    monkeypatch.setenv("VELOTUNE_KERNELS", "reference")
    model = tiny_model()
    x, labels = batch()
    loss, ours = grads(model, x, labels)
    with plain_paths():
        ref_loss, ref = grads(model, x, labels)
    assert torch.equal(loss, ref_loss)
    assert all(torch.equal(ours[n], ref[n]) for n in ref)


def test_cross_attention_matches_the_plain_path_and_keeps_no_keys_or_values(monkeypatch):
    torch.manual_seed(3)
    attn = WhisperAttention(64, 4, 0.0).train()
    vt.add_lora(attn, r=4, alpha=8, targets=["q_proj", "v_proj"], seed=0)
    with torch.no_grad():
        for layer in lora_layers(attn).values():
            layer.lora_B.weight.normal_(0.0, 0.2)
        attn.v_proj.base_layer.bias.normal_(0.0, 0.5)
    x = torch.randn(2, 5, 64, requires_grad=True)
    states = torch.randn(2, 40, 64, requires_grad=True)
    frames_by_width = 2 * 40 * 64 * 4

    def run():
        saved = {}

        def pack(t):
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = attn.cross_attend(x, states)
        params = [x, states, *(p for p in attn.parameters() if p.requires_grad)]
        g = torch.autograd.grad(out.square().sum(), params)
        big = sorted(n for n in saved.values() if n >= frames_by_width)
        return out.detach(), g, big

    out, g, big = run()
    monkeypatch.setenv("VELOTUNE_KERNELS", "reference")
    ref_out, ref_g, ref_big = run()
    assert rel_err(out, ref_out) <= 1e-6
    assert all(rel_err(a, b) <= 2e-6 for a, b in zip(g, ref_g)), [rel_err(a, b) for a, b in zip(g, ref_g)]
    assert big == [frames_by_width]          # the states alone (kept anyway by the encoder's side)
    assert len(ref_big) == 3                 # the plain path: states (LoRA's input), keys, values


def test_the_plain_cross_attention_where_few_queries_do_not_pay(monkeypatch):
    """More queries than heads x seq <= width, inference, attention dropout: keys and values as before."""
    attn = WhisperAttention(64, 4, 0.0).train()
    x, states = torch.randn(1, 17, 64), torch.randn(1, 40, 64)  # 4 x 17 > 64
    called = []
    monkeypatch.setattr(attn, "keys_values", lambda s: called.append(1) or WhisperAttention.keys_values(attn, s))
    attn.cross_attend(x, states)
    with torch.no_grad():
        attn.cross_attend(x[:, :3], states)
    assert len(called) == 2
    attn.cross_attend(x[:, :3], states)
    assert len(called) == 2  # the folded path


def test_recompute_drops_the_output_and_rebuilds_it_once():
    norm, lin = nn.LayerNorm(8), nn.Linear(8, 8)
    x = torch.randn(3, 8, requires_grad=True)
    calls = []

    def recipe():
        calls.append(1)
        return layer_norm(norm, x)

    def forward():
        y = norm(x)
        kept = weakref.ref(y)
        with recomputed_in_backward(y, recipe):
            out = lin(y).sum() + lin(y[1:]).sum()   # y and a view of it, both saved by the linears
        return out, kept

    out, kept = forward()
    assert kept() is None  # nothing holds the norm's output between forward and backward
    g = torch.autograd.grad(out, [x, lin.weight])
    assert len(calls) == 1
    with torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):  # another pair active: plain path
        out, kept = forward()
        assert kept() is not None
    ref = torch.autograd.grad(out, [x, lin.weight])
    assert len(calls) == 1 and all(torch.equal(a, b) for a, b in zip(g, ref))


def test_a_recipe_that_gives_another_tensor_is_refused():
    lin = nn.Linear(8, 8)
    x = torch.randn(3, 8, requires_grad=True)
    y = x * 2
    with recomputed_in_backward(y, lambda: x[:2] * 2):
        out = lin(y).sum()
    with pytest.raises(RuntimeError, match="recomputed_in_backward"):
        out.backward()


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_frozen_mlp_matches_autograd_in_any_number_of_chunks(approximate, monkeypatch):
    import velotune.kernels.frozen_mlp as frozen_mlp
    torch.manual_seed(1)
    fc1, fc2 = nn.Linear(16, 40).requires_grad_(False), nn.Linear(40, 16).requires_grad_(False)
    x = torch.randn(3, 7, 16, requires_grad=True)
    dout = torch.randn(3, 7, 16)
    ref_out = fc2(torch.nn.functional.gelu(fc1(x), approximate=approximate))
    (ref_dx,) = torch.autograd.grad(ref_out, x, dout)
    for chunk_rows in (1, 4, 21, 1000):  # one row a chunk, uneven chunks, all rows at once
        monkeypatch.setattr(frozen_mlp, "CHUNK_BYTES", chunk_rows * 40 * 4)
        out = frozen_mlp.frozen_gelu_mlp(fc1, fc2, approximate, x)
        assert out is not None and torch.equal(out, ref_out)  # the same forward ops
        (dx,) = torch.autograd.grad(out, x, dout)
        assert rel_err(dx, ref_dx) <= 1e-6, (chunk_rows, rel_err(dx, ref_dx))


def test_frozen_mlp_steps_aside_where_it_does_not_apply(monkeypatch):
    from velotune.kernels.frozen_mlp import frozen_gelu_mlp
    fc1, fc2 = nn.Linear(8, 12).requires_grad_(False), nn.Linear(12, 8).requires_grad_(False)
    x = torch.randn(2, 8, requires_grad=True)
    assert frozen_gelu_mlp(fc1, fc2, "none", x) is not None
    assert frozen_gelu_mlp(fc1, fc2, None, x) is None              # not a GELU
    assert frozen_gelu_mlp(fc1, fc2, "none", x, dropout=0.1) is None
    assert frozen_gelu_mlp(fc1, fc2, "none", x.detach()) is None   # nothing to differentiate
    with torch.no_grad():
        assert frozen_gelu_mlp(fc1, fc2, "none", x) is None
    fc1.weight.requires_grad_(True)                                 # a trainable linear: autograd's graph
    assert frozen_gelu_mlp(fc1, fc2, "none", x) is None
    fc1.weight.requires_grad_(False)
    monkeypatch.setenv("VELOTUNE_KERNELS", "reference")
    assert frozen_gelu_mlp(fc1, fc2, "none", x) is None
