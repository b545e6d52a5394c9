"""LoRA on gpt-oss's fused experts (`mlp.experts.gate_up_proj` [E, hidden, 2I], `down_proj` [E, I, hidden]) in PEFT's
ParamWrapper layout, against PEFT 0.21 on transformers' GptOssForCausalLM (tiny config of test_gpt_oss_parity, fp32,
left padding): the same adapter weights give the same logits and the same gradients for every A and B; our files
load in PEFT and PEFT's in ours with the same logits; merging (in place and the merged export) is exact; dropout and
DoRA on experts are refused."""
from __future__ import annotations

import json

import pytest
import torch

import velotune as vt
from test_gpt_oss_parity import inputs, load, make_hf, rel
from velotune.errors import CheckpointError, ConfigError, UnsupportedError
from velotune.lora import adapter_state_dict, adapters_disabled, lora_layers
from velotune.lora.param_lora import LoraExperts

peft = pytest.importorskip("peft")
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")
TOL = 1e-5
EXPERTS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
PREFIX = "base_model.model."


@pytest.fixture(scope="module")
def path(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpt_oss_lora")
    make_hf().save_pretrained(str(out))
    return out


def hf_of(path):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32, attn_implementation="eager").eval()


def randomized(model, seed=3):
    """Nonzero B (and A moved off its init) in every adapter: B = 0 would hide most mistakes."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapter_state_dict(model).values():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return model


def logits(model):
    ids, mask = inputs()
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits[mask.bool()]


def peft_names(model) -> dict[str, torch.Tensor]:
    """A PEFT model's adapter parameters under the file's names (`base_model.model.` kept, no adapter name)."""
    return {n.replace(".default.", "."): p for n, p in model.named_parameters() if ".lora_" in n}


def test_all_linear_adapts_the_experts_in_peft_layout_and_never_the_router(path):
    model = vt.add_lora(load(path), r=4, alpha=8, seed=0)
    targets = model.lora_settings.targets
    assert "model.layers.1.mlp.experts.gate_up_proj" in targets and "model.layers.1.mlp.experts.down_proj" in targets
    assert not any("router" in t or "bias" in t for t in targets)
    layer = lora_layers(model)["model.layers.1.mlp.experts"]
    assert isinstance(layer, LoraExperts)
    gate_up, down = layer.adapters["gate_up_proj"], layer.adapters["down_proj"]
    assert tuple(gate_up.lora_A.weight.shape) == (4 * 4, 64) and tuple(gate_up.lora_B.weight.shape) == (80, 16)
    assert tuple(down.lora_A.weight.shape) == (16, 40) and tuple(down.lora_B.weight.shape) == (64, 16)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in model.named_parameters() if ".lora_" in n}
    names = set(adapter_state_dict(model))   # PEFT's names: down_proj's wrapper outermost
    assert f"{PREFIX}model.layers.1.mlp.experts.base_layer.lora_A.weight" in names
    assert f"{PREFIX}model.layers.1.mlp.experts.lora_B.weight" in names
    only = vt.add_lora(load(path), r=2, alpha=4, targets=["gate_up_proj"])
    assert only.lora_settings.targets == [f"model.layers.{i}.mlp.experts.gate_up_proj" for i in range(4)]
    assert set(adapter_state_dict(only)) == {f"{PREFIX}model.layers.{i}.mlp.experts.lora_{x}.weight"
                                             for i in range(4) for x in "AB"}


def test_one_sgd_step_moves_a_and_b_and_lowers_the_loss(path):
    model = randomized(vt.add_lora(load(path), r=4, alpha=8, seed=0, targets=EXPERTS))
    ids, mask = inputs()
    model.train()
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    loss = model(ids, labels=ids, attention_mask=mask).loss
    loss.backward()
    torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1).step()
    moved = {n for n, p in model.named_parameters() if p.requires_grad and not torch.equal(p, before[n])}
    assert moved == set(before) and any("gate_up_proj.lora_A" in n for n in moved)
    with torch.no_grad():
        after = model(ids, labels=ids, attention_mask=mask).loss
    print(f"loss {loss.item():.5f} -> {after.item():.5f}")
    assert after < loss


def test_logits_and_gradients_match_peft(path):
    ours = randomized(vt.add_lora(load(path), r=4, alpha=8, seed=0))
    theirs = peft.get_peft_model(hf_of(path), peft.LoraConfig(r=4, lora_alpha=8, target_modules=ATTENTION,
                                                              target_parameters=EXPERTS))
    mine, other = adapter_state_dict(ours), peft_names(theirs)
    assert set(mine) == set(other)
    with torch.no_grad():
        for n, p in other.items():
            p.copy_(mine[n])
    ids, mask = inputs()
    # the padding, and each row's first real token (predicted from a padded position), out of both losses
    labels = ids.masked_fill(mask.cumsum(-1) <= 1, -100)
    ours.train(), theirs.train()   # no dropout anywhere: train mode only lets gradients flow as in training
    a = ours(ids, labels=labels, attention_mask=mask, return_logits=True)
    b = theirs(input_ids=ids, labels=labels, attention_mask=mask)
    keep = mask.bool()
    err = rel(a.logits[keep], b.logits[keep])
    assert abs(a.loss.item() - b.loss.item()) <= TOL * b.loss.item()
    a.loss.backward()
    b.loss.backward()
    grads = {n: rel(mine[n].grad, p.grad) for n, p in other.items()}
    worst = max(grads, key=grads.get)
    experts = max(v for n, v in grads.items() if ".experts." in n)
    print(f"logits rel err {err:.2e}; worst gradient rel err {grads[worst]:.2e} ({worst}); experts' {experts:.2e}")
    assert err <= TOL
    assert grads[worst] <= TOL
    assert all(mine[n].grad.abs().sum() > 0 for n in other if "experts" in n)


def test_our_file_loads_in_peft_and_peft_file_loads_in_ours(path, tmp_path):
    ours = randomized(vt.add_lora(load(path), r=4, alpha=8, seed=0))
    adapter = vt.save_adapter(ours, tmp_path / "ours")
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["target_parameters"] == EXPERTS and config["target_modules"] == sorted(ATTENTION)
    assert config["lora_dropout"] == 0.0 and config["rank_pattern"] == {}
    theirs = peft.PeftModel.from_pretrained(hf_of(path), str(adapter)).eval()
    err = rel(logits(theirs), logits(ours.eval()))
    print(f"our adapter in PEFT: logits rel err {err:.2e}")
    assert err <= TOL and rel(logits(hf_of(path)), logits(ours)) > 1e-3   # and the adapter is no no-op
    # PEFT's own file (its init, B randomized) read by us
    torch.manual_seed(5)
    made = peft.get_peft_model(hf_of(path), peft.LoraConfig(r=2, lora_alpha=6, target_modules=["q_proj", "v_proj"],
                                                            target_parameters=EXPERTS))
    with torch.no_grad():
        for n, p in made.named_parameters():
            if "lora_B" in n:
                p.normal_(0.0, 0.1)
    made.save_pretrained(str(tmp_path / "peft"))
    back = vt.load_adapter(load(path), tmp_path / "peft")
    err = rel(logits(back), logits(made.eval()))
    print(f"PEFT's adapter in ours: logits rel err {err:.2e}")
    assert err <= TOL
    assert sorted({t.rsplit(".", 1)[-1] for t in back.lora_settings.targets}) == \
        ["down_proj", "gate_up_proj", "q_proj", "v_proj"]
    # ours written back and read again: bit-identical
    again = vt.load_adapter(load(path), vt.save_adapter(back, tmp_path / "again"))
    assert all(torch.equal(p, adapter_state_dict(back)[n]) for n, p in adapter_state_dict(again).items())


def test_gate_up_alone_loads_in_peft(path, tmp_path):
    ours = randomized(vt.add_lora(load(path), r=2, alpha=4, targets=["gate_up_proj"], seed=0))
    adapter = vt.save_adapter(ours, tmp_path / "a")
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["target_parameters"] == ["mlp.experts.gate_up_proj"] and config["target_modules"] is None
    theirs = peft.PeftModel.from_pretrained(hf_of(path), str(adapter)).eval()
    assert rel(logits(theirs), logits(ours.eval())) <= TOL


def test_merge_and_merged_export_are_exact(path, tmp_path):
    from transformers import AutoModelForCausalLM
    model = randomized(vt.add_lora(load(path), r=4, alpha=8, seed=0)).eval()
    adapted = logits(model)
    with adapters_disabled(model):
        base = logits(model)
    assert rel(base, logits(hf_of(path))) <= TOL
    weight = model.model.layers[1].mlp.experts.base_layer.gate_up_proj
    original = weight.detach().clone()
    vt.merge_lora(model)
    err = rel(logits(model), adapted)
    assert err <= TOL and not torch.equal(weight, original)
    vt.unmerge_lora(model)
    assert (weight - original).abs().max() < 1e-6
    out = vt.export(model, None, tmp_path / "merged", format="merged", dtype="float32")
    merged = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32, attn_implementation="eager").eval()
    export_err = rel(logits(merged), adapted)
    print(f"merge_lora vs adapted: {err:.2e}; merged export in transformers vs adapted: {export_err:.2e}")
    assert export_err <= TOL


def test_dropout_and_dora_on_experts_are_refused(path, tmp_path):
    with pytest.raises(ConfigError, match=r"dropout 0\.1 cannot apply to fused expert parameters "
                                          r"\(model\.layers\.0\.mlp\.experts\.gate_up_proj\)"):
        vt.add_lora(load(path), r=4, dropout=0.1)
    with pytest.raises(ConfigError, match="DoRA cannot apply to fused expert parameters"):
        vt.add_lora(load(path), r=4, dora=True, targets=["down_proj"])
    vt.add_lora(load(path), r=4, dropout=0.1, dora=True, targets=ATTENTION)   # attention alone: both allowed
    # a file whose fused tensor is for another expert count, and an unknown target parameter: refused by name
    ours = vt.add_lora(load(path), r=2, alpha=4, seed=0)
    adapter = vt.save_adapter(ours, tmp_path / "a")
    from safetensors.torch import load_file, save_file
    state = load_file(str(adapter / "adapter_model.safetensors"))
    key = f"{PREFIX}model.layers.2.mlp.experts.base_layer.lora_A.weight"
    state[key] = state[key][:6]
    save_file(state, str(adapter / "adapter_model.safetensors"))
    with pytest.raises(CheckpointError, match=rf"wrong shape: {key.replace('.', '[.]')} \[6, 64\]"):
        vt.load_adapter(load(path), adapter)
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, "rank_pattern": {"down_proj": 4}}))
    with pytest.raises(UnsupportedError, match=r"rank_pattern 'down_proj': 4 gives model\.layers\.0\.mlp"):
        vt.load_adapter(load(path), adapter)
    config["target_parameters"] = ["mlp.experts.gate_proj"]
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"target_parameters entry \['mlp.experts.gate_proj'\] match no"):
        vt.load_adapter(load(path), adapter)
