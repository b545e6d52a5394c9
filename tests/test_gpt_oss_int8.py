"""gpt-oss with an int8 base: the fused experts quantized expert by expert as weight-only row-wise absmax int8
(models/quantized_experts.py), the attention linears as bitsandbytes' Linear8bitLt (LLM.int8) as in any model.

The tiny model of test_gpt_oss_nf4 (widths multiples of 64, decisive routing). The int8 model is compared with an
fp32 model holding exactly the dequantized weights (the kernels alone) in training mode, where Linear8bitLt keeps
its activations in float (at inference it also rounds them to int8, which a twin cannot reproduce); the weight
error with what row-wise absmax promises; LoRA on top (training, merge, export, adapter reload): test_gpt_oss_nf4, over both codecs."""
from __future__ import annotations

import pytest
import torch

from test_gpt_oss_nf4 import dequantized_twin, experts_against_plain, experts_of, ids, load, make_hf, rel
from velotune.lora import trainable_parameters
from velotune.models.gpt_oss import Experts
from velotune.models.quantize import is_quantized_linear, quantize_model

bnb = pytest.importorskip("bitsandbytes")
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")
TOL = 1e-5
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")


@pytest.fixture(scope="module")
def path(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpt_oss_int8")
    make_hf().save_pretrained(str(out))
    return out


@pytest.fixture(scope="module")
def int8(path):
    """One int8 model for the read-only tests (the others change theirs)."""
    return load(path, "int8")


def perturbed(model, seed=3):
    """Nonzero B (and A off its init) in every adapter: B = 0 would hide mistakes."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return model


def test_load_quantizes_the_experts_while_reading_and_linears_become_linear8bitlt(path, int8, monkeypatch):
    from velotune.models import quantized_experts
    calls = []
    real = quantized_experts.quantize_fused_experts
    monkeypatch.setattr(quantized_experts, "quantize_fused_experts", lambda *a, **k: calls.append(real(*a, **k)))
    model = load(path, "int8")
    assert model.quantization == "int8"
    assert calls == [0]   # the stream replaced all 4 layers' experts as it read them; none was left for after
    assert len(experts_of(model)) == 4 and not any(type(m) is Experts for m in model.modules())
    experts = model.model.layers[0].mlp.experts
    for weight, shape in (("gate_up_proj", (4, 64, 128)), ("down_proj", (4, 64, 64))):
        packed = getattr(experts, weight)
        assert packed.codec == "int8" and packed.shape == shape
        assert packed.codes.dtype == torch.int8 and tuple(packed.codes.shape) == shape
        assert tuple(packed.absmax.shape) == (4, shape[2])   # one scale per output row per expert
    assert not any(p.requires_grad for p in experts.parameters())
    # the model's own linears are LLM.int8 layers as in any model; the router (not a linear) and the head stay
    attention = model.model.layers[2].self_attn
    assert all(type(getattr(attention, n)).__name__ == "Linear8bitLt" for n in ATTENTION)
    assert sum(is_quantized_linear(m) for m in model.modules()) == 4 * len(ATTENTION)
    assert model.model.layers[0].mlp.router.weight.dtype == torch.float32
    # a model built in memory (not streamed) gets the same experts from quantize_model
    calls.clear()
    again = quantize_model(load(path), "int8")
    assert calls == [4] and again.model.layers[3].mlp.experts.down_proj.codes.equal(
        int8.model.layers[3].mlp.experts.down_proj.codes)


def test_logits_and_input_gradients_match_the_dequantized_twin(path, int8):
    model = int8.train()   # Linear8bitLt's training path: float activations (see the module docstring)
    twin = dequantized_twin(path, model).train()
    x = ids()
    with torch.no_grad():
        logits, twin_logits = model(x).logits, twin(x).logits
        err = rel(logits, twin_logits)
        int8_err = rel(logits, load(path).train()(x).logits)
        loss_err = abs(model(x, labels=x).loss.item() - twin(x, labels=x).loss.item())
    # one layer's experts on random rows: the same output and input gradient as the plain module
    out_err, grad_err = experts_against_plain(model.model.layers[2].mlp.experts)
    # the whole model's gradient at its input embeddings (every layer's experts and attention in the backward)
    grads = []
    for m in (model, twin):
        embed = m.model.embed_tokens.weight
        embed.requires_grad_(True)
        m(x, labels=x).loss.backward()
        grads.append(embed.grad.clone())
        embed.grad = None
        embed.requires_grad_(False)
    embed_err = rel(grads[0], grads[1])
    print(f"int8 vs dequantized twin: logits {err:.2e}, loss {loss_err:.2e}, experts {out_err:.2e}, experts' input "
          f"grad {grad_err:.2e}, embedding grad {embed_err:.2e}; int8 vs original logits {int8_err:.4f}")
    assert err <= TOL and out_err <= TOL and grad_err <= TOL and embed_err <= TOL and loss_err <= TOL
    assert grads[0].abs().sum() > 0
    # int8's rounding is ~1/300 of each row's range; this tiny model amplifies weight noise ~6x (test_gpt_oss_nf4)
    assert 0 < int8_err <= 0.08   # measured 0.0425


def test_weight_error_is_at_most_half_a_step_and_storage_a_quarter(path, int8):
    fp32 = load(path)
    F = bnb.functional
    for layer in (0, 3):
        q, w = int8.model.layers[layer].mlp.experts, fp32.model.layers[layer].mlp.experts
        for name in ("gate_up_proj", "down_proj"):
            packed, original = getattr(q, name), getattr(w, name).detach()
            absmax = packed.absmax.view(torch.float32)                               # [E, out]
            assert absmax.equal(original.abs().amax(dim=1))
            error = (packed.dequantize_all(torch.float32) - original).abs()
            step = (absmax / 127)[:, None, :]                                        # per expert and output row
            worst = (error / step).max().item()
            assert worst <= 0.5 + 1e-5, f"{name}: error {worst:.6f} steps"
            # the codes are bitsandbytes' own row-wise (vectorwise) int8 of each expert's [out, in] matrix
            for e in range(packed.shape[0]):
                codes, scales, _ = F.int8_vectorwise_quant(original[e].T.contiguous())
                assert packed.codes[e].T.equal(codes) and absmax[e].equal(scales)
    q, w = int8.model.layers[1].mlp.experts, fp32.model.layers[1].mlp.experts
    weight_bytes = sum(getattr(w, n).numel() * 4 for n in ("gate_up_proj", "down_proj"))
    packed = q.gate_up_proj.storage_bytes() + q.down_proj.storage_bytes()
    print(f"int8 experts: worst error {worst:.4f} of a step; packed weights {packed / weight_bytes:.4f} of fp32; "
          f"whole module {q.storage_bytes() / sum(p.numel() * 4 for p in w.parameters()):.4f}")
    # 1 byte a value + a 4-byte scale per output row: 1/4 + 1/in of fp32 (in = 64 here, 2880 in gpt-oss-20b)
    assert weight_bytes / 4 < packed == weight_bytes * (1 / 4 + 1 / 64)
    assert trainable_parameters(int8)[1] == trainable_parameters(fp32)[1]   # logical elements, as for NF4


def test_dtype_cast_reaches_the_biases_never_the_scales(path):
    model = load(path, "int8")
    q = model.model.layers[1].mlp.experts
    before = q.down_proj.dequantize(1)
    model.to(torch.bfloat16)
    assert q.down_proj_bias.dtype == torch.bfloat16 and q.down_proj.codes.dtype == torch.int8
    assert q.down_proj.dequantize(1, torch.float32).equal(before)
