"""NF4 / int8 bases (bitsandbytes, on the CPU) and QLoRA over them: names, accuracy, training, merging."""
import sys

import pytest
import torch
from torch import nn

import velotune as vt
from hf_reference import make_checkpoint
from test_lora import ckpt, load, randomize_adapters, rel_err, token_ids  # noqa: F401 (ckpt is a fixture)
from velotune.errors import UnsupportedError
from velotune.lora import merged_state_dict, trainable_parameters
from velotune.models.quantize import decoder_linears, dequantize_weight, is_quantized_linear, quantize_model

bnb = pytest.importorskip("bitsandbytes")
pytestmark = pytest.mark.filterwarnings("ignore:MatMul8bitLt")

LAYER_CLASS = {"nf4": "Linear4bit", "int8": "Linear8bitLt"}
# Relative logit error of the quantized tiny model against the fp32 one, measured with this checkpoint's seed:
# nf4 0.107 (4-bit weights); int8 0.0076 in training mode, 0.0104 at inference (where activations are int8 too).
QUANT_ERROR = {"nf4": 0.15, "int8": 0.015}
# Widths that are multiples of the 64-value NF4 block (see nf4_supported): hidden 64, q 4x16, kv 2x16, mlp 128.
ALIGNED = dict(head_dim=16, intermediate_size=128)
LORA_PER_LAYER = 4 * (128 + 96 + 96 + 128 + 192 + 192 + 192)  # r * (in + out) over the 7 linears, r = 4


@pytest.fixture(scope="module")
def aligned(tmp_path_factory):
    path, _ = make_checkpoint(tmp_path_factory.mktemp("quant"), "llama", **ALIGNED)
    return path


def quantized(path, method, dtype="float32"):
    return vt.load(path, dtype=dtype, device="cpu", quantize=method, load_tokenizer_files=False)[0]


def dequantized_twin(path, model):
    """An fp32 model holding exactly the dequantized weights: isolates the kernels from the quantization error."""
    twin = load(path)
    with torch.no_grad():
        for (name, module), (_, plain) in zip(model.named_modules(), twin.named_modules()):
            if is_quantized_linear(module):
                plain.weight.copy_(dequantize_weight(module))
    return twin


@pytest.mark.parametrize("method", ["nf4", "int8"])
def test_quantized_base_names_and_accuracy(aligned, method):
    model = quantized(aligned, method)
    fp32 = load(aligned)
    layers = {n: type(m).__name__ for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    assert layers.pop("lm_head") == "Linear"  # neither the head nor the embeddings are quantized
    assert len(layers) == 14 and set(layers.values()) == {LAYER_CLASS[method]}
    assert type(model.model.embed_tokens) is nn.Embedding
    assert set(dict(model.named_parameters())) == set(dict(fp32.named_parameters()))  # `...q_proj.weight` stays
    assert model.quantization == method
    assert not any(m.training for m in model.modules())  # loaded for inference: every layer in eval mode
    ids = token_ids()
    model.train()  # the training path (in eval mode int8 also rounds the activations: compared below)
    logits = model(ids).logits
    assert rel_err(logits, dequantized_twin(aligned, model)(ids).logits) <= 1e-6  # measured 0 (nf4), 2.0e-7 (int8)
    assert rel_err(logits, fp32(ids).logits) <= QUANT_ERROR[method]
    model.eval()
    with torch.no_grad():  # inference path (bitsandbytes repacks / quantizes inputs differently here)
        assert rel_err(model(ids).logits, fp32(ids).logits) <= QUANT_ERROR[method]


def test_nf4_weight_error_is_nf4_rounding(aligned):
    model = quantized(aligned, "nf4")
    fp32 = load(aligned)
    w = fp32.model.layers[0].mlp.gate_proj.weight
    q = dequantize_weight(model.model.layers[0].mlp.gate_proj)
    blocks = w.reshape(-1, 64)  # 64-value blocks, each scaled by its absmax
    err = (q.reshape(-1, 64) - blocks).abs()
    # the widest gap between NF4 codes is -1 .. -0.6962: half of it, plus slack for the 8-bit absmax (double quant)
    assert (err <= 0.155 * blocks.abs().amax(dim=1, keepdim=True)).all()
    assert rel_err(q, w) <= 0.1  # measured 0.092


@pytest.mark.parametrize("method", ["nf4", "int8"])
def test_qlora_trains_adapters_only(aligned, method):
    model = randomize_adapters(vt.add_lora(quantized(aligned, method), r=4, alpha=8, seed=0))
    qweights = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable_parameters(model)[0] == sum(p.numel() for p in trainable) == 2 * LORA_PER_LAYER
    opt = torch.optim.AdamW(trainable, lr=1e-2)
    ids = token_ids()
    losses = []
    for _ in range(3):
        out = model(ids, labels=ids)
        out.loss.backward()
        assert all(p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0 for p in trainable)
        opt.step()
        opt.zero_grad()
        losses.append(out.loss.item())
    assert losses[-1] < losses[0]
    for n, p in model.named_parameters():
        if n in qweights:
            assert torch.equal(p.detach(), qweights[n]), n  # the int weights did not move
    assert model.model.layers[0].self_attn.q_proj.base_layer.weight.dtype == \
        {"nf4": torch.uint8, "int8": torch.int8}[method]


@pytest.mark.parametrize("method", ["nf4", "int8"])
@pytest.mark.parametrize("dora", [False, True])
def test_qlora_merge_dequantizes_and_unmerge_restores(aligned, method, dora):
    model = randomize_adapters(vt.add_lora(quantized(aligned, method), r=4, alpha=8, dora=dora, seed=0))
    model.train()  # int8's training path: its eval path also rounds activations, which a merged weight does not
    ids = token_ids()
    lora_logits = model(ids).logits
    layer = model.model.layers[1].mlp.down_proj
    original = layer.base_layer
    packed = original.weight.detach().clone()
    state = merged_state_dict(model)
    assert set(state) == set(load(aligned).state_dict())  # plain checkpoint names, no quantization state
    assert all(t.dtype == torch.float32 for t in state.values())
    vt.merge_lora(model)
    assert type(layer.base_layer) is nn.Linear and layer.base_layer.weight.dtype == torch.float32
    assert rel_err(model(ids).logits, lora_logits) <= 2e-6  # merged == adapter outputs: nothing re-quantized
    assert torch.equal(layer.base_layer.weight, state["model.layers.1.mlp.down_proj.weight"])
    vt.unmerge_lora(model)
    assert layer.base_layer is original and torch.equal(original.weight.detach(), packed)
    assert rel_err(model(ids).logits, lora_logits) <= 1e-7


def test_nf4_with_bf16_compute(aligned):
    model = randomize_adapters(vt.add_lora(quantized(aligned, "nf4", "bfloat16"), r=4, alpha=8, seed=0))
    assert model.model.layers[0].self_attn.q_proj.base_layer.compute_dtype == torch.bfloat16
    ids = token_ids()
    out = model(ids, labels=ids, return_logits=True)
    assert out.logits.dtype == torch.bfloat16
    out.loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad)
    ref = randomize_adapters(vt.add_lora(quantized(aligned, "nf4"), r=4, alpha=8, seed=0))
    # measured 0.034: bf16 rounding, and bf16 weights that round to a neighbouring NF4 code now and then
    assert rel_err(out.logits, ref(ids).logits) <= 0.05


def test_quantize_errors(ckpt, monkeypatch):
    with pytest.raises(ValueError, match="quantize='nf3'"):
        quantize_model(load(ckpt), "nf3")
    with pytest.raises(UnsupportedError, match="before adding LoRA"):
        quantize_model(vt.add_lora(load(ckpt), r=2), "nf4")
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # as if it were not installed
    with pytest.raises(UnsupportedError, match="needs the bitsandbytes package: pip install 'velotune\\[quant\\]'"):
        quantized(ckpt, "nf4")


def test_dequantize_plain_linear_is_a_copy():
    linear = nn.Linear(4, 3)
    w = dequantize_weight(linear, torch.float64)
    assert w.dtype == torch.float64 and torch.equal(w.float(), linear.weight.detach())
    assert not is_quantized_linear(linear)


def test_nf4_keeps_layers_the_cpu_kernel_gets_wrong(ckpt, caplog):
    model = quantized(ckpt, "nf4")  # o_proj (in 96) and down_proj (in 112) are not multiples of 64
    kept = [f"model.layers.{i}.{m}" for i in range(2) for m in ("self_attn.o_proj", "mlp.down_proj")]
    assert model.quantization == "nf4"
    assert [n for n, m in decoder_linears(model) if not is_quantized_linear(m)] == kept
    assert "kept in float32 because bitsandbytes' CPU 4-bit kernel" in caplog.text
    assert all(type(model.get_submodule(n)) is nn.Linear for n in kept)
    assert type(model.model.layers[0].mlp.up_proj).__name__ == "Linear4bit"
    ids = token_ids()
    assert rel_err(model(ids).logits, dequantized_twin(ckpt, model)(ids).logits) <= 1e-6


@pytest.mark.parametrize("method", ["nf4", "int8"])
def test_loading_quantizes_each_linear_as_it_is_read(aligned, method, monkeypatch):
    """vt.load(quantize=...) quantizes a linear as soon as its tensors are read (a big model, an MoE one above all,
    never exists in full precision at once) and gives exactly what quantizing the loaded model gives."""
    from velotune.models import quantize as quantize_module
    streamed = quantized(aligned, method)
    after = quantize_model(load(aligned), method, compute_dtype=torch.float32, device="cpu")
    for (name, mine), (_, theirs) in zip(decoder_linears(streamed), decoder_linears(after)):
        assert type(mine) is type(theirs), name
        assert torch.equal(dequantize_weight(mine), dequantize_weight(theirs)), name
    ids = token_ids()
    assert torch.equal(streamed(ids).logits, after(ids).logits)
    # While loading, at most one linear's weight waits in full precision: every other one read so far is quantized.
    waiting = []
    offer = quantize_module.StreamingQuantizer.offer

    def watched(self, name, loaded):
        offer(self, name, loaded)
        waiting.append(sum(1 for n in loaded if n in self.owner))
    monkeypatch.setattr(quantize_module.StreamingQuantizer, "offer", watched)
    quantized(aligned, method)
    assert waiting and max(waiting) <= 1
