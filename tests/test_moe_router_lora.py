"""LoRA on a mixture-of-experts router only when asked: "all-linear" leaves Mixtral's `block_sparse_moe.gate`,
Qwen3-MoE's `mlp.gate` and gpt-oss's `mlp.router` alone; naming the router adapts it and nothing else, with the
gradients PEFT 0.21 gives on transformers 5's model (whose routers are bare parameters, which PEFT adapts with
`target_parameters`: `mlp.gate.weight` / `mlp.router.weight`); the adapter we write loads in PEFT with our logits,
PEFT's loads in ours, and merging is exact. Tiny fp32 models of test_moe_parity / test_gpt_oss_nf4, left padding.

How a router is named: Mixtral / Qwen3-MoE hold it as a Linear, `targets=["gate"]`; gpt-oss as a bare weight and
bias (not a Linear), `targets=["router.weight"]`, PEFT's target_parameters spelling (lora/param_lora.py)."""
from __future__ import annotations

import json

import pytest
import torch

import velotune as vt
from test_gpt_oss_nf4 import make_hf as make_gpt_oss
from test_moe_parity import inputs, make_hf, rel
from velotune.errors import ConfigError
from velotune.lora import adapter_state_dict, lora_layers

peft = pytest.importorskip("peft")
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")
TOL = 1e-5
PREFIX = "base_model.model."
# case -> (our router module under model.layers.N, transformers' name, our target, PEFT's target_parameters,
#          sparse layers)
CASES = {
    "mixtral": ("block_sparse_moe.gate", "mlp.gate", "gate", "mlp.gate.weight", (0, 1)),
    "qwen3_moe": ("mlp.gate", "mlp.gate", "gate", "mlp.gate.weight", (1,)),   # layer 0 a dense MLP (gate_proj)
    "gpt_oss": ("mlp.router", "mlp.router", "router.weight", "mlp.router.weight", (0, 1, 2, 3)),
}


@pytest.fixture(scope="module", params=list(CASES))
def case(request, tmp_path_factory):
    """(case name, checkpoint directory)."""
    path = tmp_path_factory.mktemp(request.param)
    (make_gpt_oss() if request.param == "gpt_oss" else make_hf(request.param)).save_pretrained(str(path))
    return request.param, path


def ours_of(path):
    return vt.load(path, dtype="float32", device="cpu", load_tokenizer_files=False)[0]


def hf_of(path):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32, attn_implementation="eager").eval()


def with_router_lora(path, name, **kw):
    """Our model with LoRA on the router alone, A and B both moved off their init (B = 0 would hide mistakes)."""
    model = vt.add_lora(ours_of(path), r=4, alpha=8, targets=[CASES[name][2]], seed=0, **kw)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in adapter_state_dict(model).values():
            p.add_(torch.randn(p.shape, generator=g) * 0.3)
    return model


def logits(model):
    ids, mask = inputs()
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits[mask.bool()]


def routers(name):
    ours, theirs, _, _, layers = CASES[name]
    return [f"model.layers.{i}.{ours}" for i in layers], [f"model.layers.{i}.{theirs}" for i in layers]


def test_all_linear_leaves_the_router_alone(case):
    name, path = case
    model = vt.add_lora(ours_of(path), r=4, alpha=8, seed=0)
    mine, _ = routers(name)
    assert not any(t == r or t.startswith(r + ".") for t in model.lora_settings.targets for r in mine)
    assert not any(r in lora_layers(model) for r in mine)
    assert not any(p.requires_grad for r in mine for p in model.get_submodule(r).parameters())
    assert len(model.lora_settings.targets) > 4 * len(mine)   # it did adapt the attention and the experts


def test_naming_the_router_adapts_it_and_nothing_else(case):
    name, path = case
    model = vt.add_lora(ours_of(path), r=4, alpha=8, targets=[CASES[name][2]], seed=0)
    mine, theirs = routers(name)
    suffix = ".weight" if name == "gpt_oss" else ""   # a bare parameter is targeted by its own name
    assert model.lora_settings.targets == [r + suffix for r in mine]
    state = adapter_state_dict(model)
    assert set(state) == {f"{PREFIX}{r}.lora_{x}.weight" for r in theirs for x in "AB"}
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert {id(p) for p in trainable} == {id(p) for p in state.values()}
    experts = 4
    assert all(tuple(state[f"{PREFIX}{r}.lora_A.weight"].shape) == (4, 64)
               and tuple(state[f"{PREFIX}{r}.lora_B.weight"].shape) == (experts, 4) for r in theirs)
    assert sum(p.numel() for p in trainable) == len(mine) * 4 * (64 + experts)
    if name == "gpt_oss":   # a bare parameter takes no dropout (nor does PEFT's ParamWrapper): refused by name
        with pytest.raises(ConfigError, match=r"lora dropout 0\.1 cannot apply to a router's bare weight "
                                              r"\(model\.layers\.0\.mlp\.router\.weight\)"):
            vt.add_lora(ours_of(path), r=4, alpha=8, targets=["router.weight"], dropout=0.1)


def test_router_gradients_match_peft(case):
    name, path = case
    ours = with_router_lora(path, name)
    theirs = peft.get_peft_model(hf_of(path), peft.LoraConfig(r=4, lora_alpha=8, target_modules=[],
                                                              target_parameters=[CASES[name][3]]))
    mine = adapter_state_dict(ours)
    other = {n.replace(".default.", "."): p for n, p in theirs.named_parameters() if ".lora_" in n}
    assert set(mine) == set(other)
    with torch.no_grad():
        for n, p in other.items():
            p.copy_(mine[n])
    ids, mask = inputs()
    labels = ids.masked_fill(mask.cumsum(-1) <= 1, -100)   # padding and each row's first real token left out
    ours.train(), theirs.train()   # no dropout: train mode only lets gradients flow as in training
    a = ours(ids, labels=labels, attention_mask=mask, return_logits=True)
    b = theirs(input_ids=ids, labels=labels, attention_mask=mask)
    keep = mask.bool()
    err, loss_err = rel(a.logits[keep], b.logits[keep]), abs(a.loss.item() - b.loss.item()) / b.loss.item()
    a.loss.backward()
    b.loss.backward()
    grads = {n: rel(mine[n].grad, p.grad) for n, p in other.items()}
    worst = max(grads, key=grads.get)
    print(f"{name}: router LoRA vs PEFT: logits {err:.2e}, loss {loss_err:.2e}, worst gradient {grads[worst]:.2e} "
          f"({worst})")
    assert err <= TOL and loss_err <= TOL and grads[worst] <= TOL
    assert all(mine[n].grad.abs().sum() > 0 for n in mine)


def test_router_adapter_loads_in_peft_and_merges_exactly(case, tmp_path):
    from transformers import AutoModelForCausalLM
    name, path = case
    ours = with_router_lora(path, name).eval()
    adapted = logits(ours)
    assert rel(logits(ours_of(path)), adapted) > 1e-3   # the adapter is not a no-op
    adapter = vt.save_adapter(ours, tmp_path / "adapter")
    config = json.loads((adapter / "adapter_config.json").read_text())
    if name == "gpt_oss":
        assert config["target_parameters"] == ["mlp.router.weight"] and not config["target_modules"]
    else:   # a module target; PEFT maps `gate` to transformers 5's `gate.weight` parameter itself
        assert config["target_modules"] == ["gate"] and not config.get("target_parameters")
    theirs = peft.PeftModel.from_pretrained(hf_of(path), str(adapter)).eval()
    peft_err = rel(logits(theirs), adapted)
    back = vt.load_adapter(ours_of(path), adapter)
    assert back.lora_settings.targets == ours.lora_settings.targets
    mine, again = adapter_state_dict(ours), adapter_state_dict(back)
    assert set(mine) == set(again) and all(torch.equal(p, again[n]) for n, p in mine.items())
    router = ours.get_submodule(routers(name)[0][0])
    before = router.base_layer.weight.detach().clone()
    vt.merge_lora(ours)
    assert not torch.equal(router.base_layer.weight, before)
    merge_err = rel(logits(ours), adapted)
    vt.unmerge_lora(ours)
    unmerge_err = (router.base_layer.weight - before).abs().max().item()
    out = vt.export(ours, None, tmp_path / "merged", format="merged", dtype="float32")
    merged = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32, attn_implementation="eager").eval()
    export_err = rel(logits(merged), adapted)
    print(f"{name}: our router adapter in PEFT {peft_err:.2e}; merge_lora {merge_err:.2e}; unmerge max weight "
          f"error {unmerge_err:.1e}; merged export in transformers {export_err:.2e}")
    assert peft_err <= TOL and merge_err <= TOL and export_err <= TOL and unmerge_err <= 1e-6


def test_peft_router_adapter_loads_in_ours(case, tmp_path):
    """PEFT's own router adapter (target_parameters on transformers 5's router weight) gives our model its
    logits."""
    name, path = case
    theirs = peft.get_peft_model(hf_of(path), peft.LoraConfig(r=4, lora_alpha=8, target_modules=[],
                                                              target_parameters=[CASES[name][3]]))
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for n, p in theirs.named_parameters():
            if ".lora_" in n:
                p.add_(torch.randn(p.shape, generator=g) * 0.3)
    theirs.save_pretrained(str(tmp_path / "peft"))
    ours = vt.load_adapter(ours_of(path), tmp_path / "peft")
    err = rel(logits(ours), logits(theirs.eval()))
    print(f"{name}: PEFT's router adapter in ours, logits {err:.2e}")
    assert err <= TOL
    assert ours.lora_settings.targets == [r + (".weight" if name == "gpt_oss" else "") for r in routers(name)[0]]


def test_router_beside_the_experts_loads_in_peft(case, tmp_path):
    """The router named beside the experts: one adapter, PEFT reads both (experts as target_parameters)."""
    name, path = case
    model = ours_of(path)
    # every expert projection by its full name (Qwen3-MoE's dense layer-0 MLP shares the leaf names, and PEFT reads
    # those as the experts': see peft_experts._warn_remapped)
    experts = (["gate_up_proj", "down_proj"] if name == "gpt_oss" else
               [n for n, m in model.named_modules() if ".experts." in n and isinstance(m, torch.nn.Linear)])
    model = vt.add_lora(model, r=4, alpha=8, targets=experts + [CASES[name][2]], seed=0)
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for p in adapter_state_dict(model).values():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    adapter = vt.save_adapter(model.eval(), tmp_path / "adapter")
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert {"mlp.experts.gate_up_proj", "mlp.experts.down_proj"} <= set(config["target_parameters"])
    theirs = peft.PeftModel.from_pretrained(hf_of(path), str(adapter)).eval()
    assert any(".router.lora_A" in n or ".gate.lora_A" in n for n, _ in theirs.named_parameters())
    err = rel(logits(theirs), logits(model))
    print(f"{name}: experts + router adapter in PEFT, logits {err:.2e}")
    assert err <= TOL
