"""LoRA layers on our models: injection, counts, init, dropout, merge / unmerge / merged export, bad input."""
import math

import pytest
import torch
from torch import nn

import velotune as vt
from hf_reference import make_checkpoint
from velotune.errors import ConfigError
from velotune.lora import (LoraLinear, lora_layers, lora_parameter_count, merge_and_unload, merged_state_dict,
                           parameter_summary, trainable_parameters)

# tiny llama (tests/hf_reference.py): hidden 64, 4 heads x head_dim 24 (q_out 96), 2 kv heads (kv_out 48), mlp 112
SHAPES = {"q_proj": (64, 96), "k_proj": (64, 48), "v_proj": (64, 48), "o_proj": (96, 64),
          "gate_proj": (64, 112), "up_proj": (64, 112), "down_proj": (112, 64)}
LAYERS = 2


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path, _ = make_checkpoint(tmp_path_factory.mktemp("lora"), "llama")
    return path


def load(path, dtype="float32"):
    return vt.load(path, dtype=dtype, device="cpu", load_tokenizer_files=False)[0]


def randomize_adapters(model, seed=3):
    """B = 0 at init hides most mistakes: give every adapter non-zero B (and a perturbed DoRA magnitude)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            if isinstance(layer, vt.lora.LoraEmbedding):  # PEFT's embedding pair starts with A at zero
                layer.lora_embedding_A.copy_(torch.randn(layer.lora_embedding_A.shape, generator=g) * 0.1)
                continue
            layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=g) * 0.1)
            if layer.use_dora:
                layer.lora_magnitude_vector.mul_(1 + 0.2 * torch.rand(layer.out_features, generator=g))
    return model


def token_ids(vocab=211, batch=2, seq=13, seed=7):
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))


def rel_err(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def expected_lora_params(r, targets, dora=False):
    per_layer = sum(r * (i + o) + (o if dora else 0) for name, (i, o) in SHAPES.items() if name in targets)
    return LAYERS * per_layer


@pytest.mark.parametrize("targets,dora", [("all-linear", False), ("all-linear", True), (["q_proj", "v_proj"], False),
                                          (["self_attn.o_proj", "down_proj"], True)])
def test_counts_names_and_frozen_base(ckpt, targets, dora):
    model = load(ckpt)
    base_total = sum(p.numel() for p in model.parameters())
    vt.add_lora(model, r=4, alpha=8, targets=targets, dora=dora)
    wanted = list(SHAPES) if targets == "all-linear" else [t.rsplit(".", 1)[-1] for t in targets]
    n_lora = expected_lora_params(4, wanted, dora)
    assert lora_parameter_count(model) == n_lora
    assert trainable_parameters(model) == (n_lora, base_total + n_lora)
    assert "trainable params: " + f"{n_lora:,}" in parameter_summary(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert all(".lora_" in n for n in trainable) and len(trainable) == LAYERS * len(wanted) * (3 if dora else 2)
    # names follow PEFT: base_layer / lora_A / lora_B / lora_magnitude_vector
    names = dict(model.named_parameters())
    leaf = wanted[0]
    prefix = f"model.layers.0.{'mlp' if leaf.endswith(('gate_proj', 'up_proj', 'down_proj')) else 'self_attn'}.{leaf}"
    assert names[f"{prefix}.base_layer.weight"].shape == (SHAPES[leaf][1], SHAPES[leaf][0])
    assert names[f"{prefix}.lora_A.weight"].shape == (4, SHAPES[leaf][0])
    assert names[f"{prefix}.lora_B.weight"].shape == (SHAPES[leaf][1], 4)
    assert (f"{prefix}.lora_magnitude_vector" in names) == dora
    assert "lm_head" not in {n.split(".")[0] for n in lora_layers(model)}


def test_init_matches_peft_convention_and_leaves_outputs_unchanged(ckpt):
    model = load(ckpt)
    ids = token_ids()
    before = model(ids).logits
    vt.add_lora(model, r=8, alpha=16, seed=11, dora=True)
    assert torch.equal(model(ids).logits, before)  # B = 0 and m = ||W||: an exact no-op
    layer = model.model.layers[1].mlp.down_proj
    bound = 1 / math.sqrt(layer.in_features)  # kaiming-uniform(a=sqrt(5)) bound
    a = layer.lora_A.weight
    assert a.abs().max() <= bound and a.abs().max() > 0.9 * bound and a.std() > 0.5 * bound / math.sqrt(3)
    assert torch.count_nonzero(layer.lora_B.weight) == 0
    w = layer.base_layer.weight
    assert torch.allclose(layer.lora_magnitude_vector, w.norm(dim=1), rtol=1e-6)
    again = vt.add_lora(load(ckpt), r=8, alpha=16, seed=11, dora=True)
    assert torch.equal(again.model.layers[1].mlp.down_proj.lora_A.weight, a)
    other = vt.add_lora(load(ckpt), r=8, alpha=16, seed=12)
    assert not torch.equal(other.model.layers[1].mlp.down_proj.lora_A.weight, a)


def test_scaling_and_forward_formula(ckpt):
    for rslora, scaling in ((False, 24 / 16), (True, 24 / 4)):
        model = randomize_adapters(vt.add_lora(load(ckpt), r=16, alpha=24, rslora=rslora))
        layer = model.model.layers[0].self_attn.v_proj
        assert layer.scaling == pytest.approx(scaling)
        x = torch.randn(3, 5, 64)
        expected = x @ layer.base_layer.weight.T + scaling * (x @ layer.lora_A.weight.T @ layer.lora_B.weight.T)
        assert torch.allclose(layer(x), expected, atol=1e-5)


def test_dropout_applies_to_the_lora_branch_only(ckpt):
    model = randomize_adapters(vt.add_lora(load(ckpt), r=4, alpha=8, dropout=0.5, targets=["up_proj"]))
    layer = model.model.layers[0].mlp.up_proj
    x = torch.randn(2, 7, 64)
    model.train()
    torch.manual_seed(5)
    out = layer(x)
    torch.manual_seed(5)
    dropped = nn.functional.dropout(x, 0.5, training=True)
    expected = layer.base_layer(x) + layer.scaling * layer.lora_B(layer.lora_A(dropped))
    assert torch.allclose(out, expected, atol=1e-6)
    assert not torch.allclose(out, layer.base_layer(x) + layer.scaling * layer.lora_B(layer.lora_A(x)), atol=1e-3)
    model.eval()
    assert torch.allclose(layer(x), layer.base_layer(x) + layer.scaling * layer.lora_B(layer.lora_A(x)), atol=1e-6)


@pytest.mark.parametrize("dora", [False, True])
def test_merge_unmerge_fp32(ckpt, dora):
    model = randomize_adapters(vt.add_lora(load(ckpt), r=4, alpha=8, dora=dora))
    ids = token_ids()
    base = {n: p.detach().clone() for n, p in model.named_parameters() if ".base_layer." in n}
    lora_logits = model(ids).logits
    q_weight = model.model.layers[0].self_attn.q_proj.base_layer.weight
    vt.merge_lora(model)
    assert model.model.layers[0].self_attn.q_proj.base_layer.weight is q_weight  # merged in place
    assert rel_err(model(ids).logits, lora_logits) <= 2e-6
    vt.merge_lora(model)  # a second merge is a no-op
    assert rel_err(model(ids).logits, lora_logits) <= 2e-6
    vt.unmerge_lora(model)
    worst = max((p.detach() - base[n]).abs().max().item() for n, p in model.named_parameters() if n in base)
    assert worst <= 5e-8, worst  # measured 7.5e-9 (LoRA) and 1.1e-8 (DoRA): fp32 rounding of W + dW - dW
    assert rel_err(model(ids).logits, lora_logits) <= 1e-6


def test_merge_unmerge_bf16_within_one_rounding(ckpt):
    model = randomize_adapters(vt.add_lora(load(ckpt, "bfloat16"), r=4, alpha=8))
    base = {n: p.detach().clone() for n, p in model.named_parameters() if ".base_layer." in n}
    vt.merge_lora(model)
    merged = {n: p.detach().clone() for n, p in model.named_parameters() if n in base}
    vt.unmerge_lora(model)
    eps = torch.finfo(torch.bfloat16).eps
    for n, p in model.named_parameters():
        if n in base:
            # two bf16 roundings (merge, then unmerge): at most one ulp of the original plus one of the merged weight
            bound = eps * (base[n].float().abs() + merged[n].float().abs())
            assert ((p.float() - base[n].float()).abs() <= bound).all(), n
            assert p.dtype == torch.bfloat16


def test_merged_state_dict_and_merge_and_unload(ckpt):
    from transformers import AutoModelForCausalLM
    model = randomize_adapters(vt.add_lora(load(ckpt), r=4, alpha=8, dora=True, targets=["q_proj", "down_proj"]))
    ids = token_ids()
    lora_logits = model(ids).logits
    state = merged_state_dict(model)
    plain = load(ckpt)
    assert set(state) == set(plain.state_dict())
    plain.load_state_dict(state)
    assert rel_err(plain(ids).logits, lora_logits) <= 2e-6
    hf = AutoModelForCausalLM.from_pretrained(str(ckpt), dtype=torch.float32, attn_implementation="eager")
    hf.load_state_dict(state)  # the merged tensors are a transformers checkpoint as they are
    assert rel_err(hf(input_ids=ids).logits, lora_logits) <= 2e-5
    bf16 = merged_state_dict(model, torch.bfloat16)
    assert all(t.dtype == torch.bfloat16 for t in bf16.values())
    assert lora_layers(model)  # merged_state_dict did not change the model
    merge_and_unload(model)
    assert not lora_layers(model) and model.lora_settings is None
    assert type(model.model.layers[0].self_attn.q_proj) is nn.Linear
    assert rel_err(model(ids).logits, lora_logits) <= 2e-6


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_low_precision_bases_train(ckpt, dtype):
    model = randomize_adapters(vt.add_lora(load(ckpt, dtype), r=4, alpha=8, dora=dtype == "float16", seed=0))
    ids = token_ids()
    out = model(ids, labels=ids, return_logits=True)
    assert out.logits.dtype == getattr(torch, dtype)
    out.loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert len(grads) == LAYERS * 7 * (3 if dtype == "float16" else 2)
    assert all(g is not None and g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)
    fp32 = randomize_adapters(vt.add_lora(load(ckpt), r=4, alpha=8, dora=dtype == "float16", seed=0))
    # measured 0.0092 (bf16) and 0.0010 (fp16 + DoRA): the rounding of a low-precision model, no more
    assert rel_err(out.logits, fp32(ids).logits) <= {"bfloat16": 0.02, "float16": 0.003}[dtype]


def test_plain_transformers_model_gets_the_same_names(ckpt):
    from transformers import AutoModelForCausalLM
    hf = AutoModelForCausalLM.from_pretrained(str(ckpt), dtype=torch.float32, attn_implementation="eager")
    ours = load(ckpt)
    vt.add_lora(hf, r=4, alpha=8, seed=1)
    vt.add_lora(ours, r=4, alpha=8, seed=1)
    randomize_adapters(hf)
    randomize_adapters(ours)
    hf_names = {n: p for n, p in hf.named_parameters() if p.requires_grad}
    our_names = {n: p for n, p in ours.named_parameters() if p.requires_grad}
    assert set(hf_names) == set(our_names)
    assert all(torch.equal(hf_names[n], our_names[n]) for n in hf_names)
    ids = token_ids()
    assert rel_err(hf(input_ids=ids).logits, ours(ids).logits) <= 1e-5


def test_bad_input(ckpt):
    model = load(ckpt)
    with pytest.raises(ConfigError, match=r"\['q_prj'\] match no linear layer.*down_proj, embed_tokens, gate_proj, "
                                          r"k_proj, lm_head, o_proj, q_proj, up_proj, v_proj"):
        vt.add_lora(model, targets=["q_proj", "q_prj"])
    with pytest.raises(ConfigError, match="regex"):
        vt.add_lora(model, targets=r".*\.nothing")
    for bad in (0, -2, 1.5, True):
        with pytest.raises(ConfigError, match="r \\(rank\\) must be a positive integer"):
            vt.add_lora(model, r=bad)
    with pytest.raises(ConfigError, match="alpha"):
        vt.add_lora(model, alpha=0)
    with pytest.raises(ConfigError, match="dropout"):
        vt.add_lora(model, dropout=1.0)
    with pytest.raises(ConfigError, match="modules_to_save \\['nope'\\]"):
        vt.add_lora(model, modules_to_save=["nope"])
    with pytest.raises(ConfigError, match="both LoRA targets and modules_to_save"):
        vt.add_lora(model, targets=["q_proj"], modules_to_save=["q_proj"])
    assert not lora_layers(model) and all(p.requires_grad for p in model.parameters())  # errors changed nothing
    vt.add_lora(model, targets="q_proj")  # a single name works as a one-item list
    assert list(lora_layers(model)) == ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"]
    assert isinstance(model.model.layers[0].self_attn.q_proj, LoraLinear)
    with pytest.raises(ConfigError, match="already carries LoRA"):
        vt.add_lora(model)
