"""LoRA on the experts of Mixtral and Qwen3-MoE in PEFT's format (target_parameters on transformers 5's fused
expert tensors), against PEFT 0.21: our adapter in PEFT and PEFT's in ours give the same logits (fp32, trained
nonzero A and B); our save -> load is bit-identical and merges exactly; wrong adapters are refused by name."""
from __future__ import annotations

import json

import pytest
import torch

import velotune as vt
from test_lora import randomize_adapters
from test_moe_parity import inputs, make_hf, rel
from velotune.errors import CheckpointError
from velotune.lora import lora_layers

peft = pytest.importorskip("peft")
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")
TOL = 1e-5
EXPERTS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


@pytest.fixture(scope="module", params=["mixtral", "qwen3_moe"])
def base(request, tmp_path_factory):
    """(case, checkpoint directory): 2 layers, both sparse (4 experts, top-2); see dense_layer_test below for
    Qwen3-MoE's dense layers."""
    path = tmp_path_factory.mktemp(request.param)
    make_hf(request.param, mlp_only_layers=[]).save_pretrained(str(path))
    return request.param, path


def ours_of(path):
    return vt.load(path, dtype="float32", device="cpu", load_tokenizer_files=False)[0]


def hf_of(path):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32, attn_implementation="eager").eval()


def trained(model):
    """Nonzero B everywhere, then one SGD step (A and B both moved, gate and up A different)."""
    randomize_adapters(model)
    ids, mask = inputs()
    model.train()
    model(ids, labels=ids, attention_mask=mask).loss.backward()
    torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5).step()
    model.zero_grad()
    return model.eval()


def logits(model):
    """Real positions' logits (ours, transformers' or PEFT's model: the same call)."""
    ids, mask = inputs()
    with torch.no_grad():
        return model(ids, attention_mask=mask).logits[mask.bool()]


@pytest.mark.parametrize("kind", [dict(r=4, alpha=8), dict(r=2, alpha=6, rslora=True)], ids=["lora", "rslora"])
def test_our_expert_adapter_loads_in_peft_with_the_same_logits(base, tmp_path, kind):
    case, path = base
    ours = trained(vt.add_lora(ours_of(path), seed=0, **kind))
    adapter = vt.save_adapter(ours, tmp_path / "adapter")
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["target_parameters"] == EXPERTS
    assert config["rank_pattern"] == {"gate_up_proj": 2 * kind["r"]}   # gate's and up's own A: rank 2r
    assert config["target_modules"] == ["k_proj", "o_proj", "q_proj", "v_proj"]
    theirs = peft.PeftModel.from_pretrained(hf_of(path), str(adapter)).eval()
    err = rel(logits(theirs), logits(ours))
    print(f"{case} {kind}: our adapter in PEFT, logits rel err {err:.2e}")
    assert err <= TOL
    # the adapter is not a no-op: the base alone differs
    assert rel(logits(hf_of(path)), logits(ours)) > 1e-3


def peft_adapter(path, out, **extra):
    """PEFT's own expert adapter: attention modules + fused experts (+ Qwen3-MoE's dense layer-0 MLP)."""
    hf = hf_of(path)
    modules = ["q_proj", "v_proj"]
    torch.manual_seed(5)
    model = peft.get_peft_model(hf, peft.LoraConfig(r=4, lora_alpha=8, target_modules=modules,
                                                    target_parameters=EXPERTS, **extra))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.1)
    model.save_pretrained(str(out))
    return model.eval()


@pytest.mark.parametrize("extra", [{}, dict(alpha_pattern={"experts.down_proj": 12})], ids=["plain", "alpha_pattern"])
def test_peft_expert_adapter_loads_in_ours_with_the_same_logits(base, tmp_path, extra):
    case, path = base
    theirs = peft_adapter(path, tmp_path / "peft", **extra)
    ours = vt.load_adapter(ours_of(path), tmp_path / "peft")
    err = rel(logits(ours), logits(theirs))
    print(f"{case} {extra}: PEFT's adapter in ours, logits rel err {err:.2e}")
    assert err <= TOL
    layers = lora_layers(ours)
    gate, up = ("w1", "w3") if case == "mixtral" else ("gate_proj", "up_proj")
    ffn = "block_sparse_moe" if case == "mixtral" else "mlp"
    assert torch.equal(layers[f"model.layers.1.{ffn}.experts.2.{gate}"].lora_A.weight,
                       layers[f"model.layers.1.{ffn}.experts.2.{up}"].lora_A.weight)   # PEFT's shared A
    # written back: the shared A makes rank r again, which PEFT reads with the same logits
    again = vt.save_adapter(ours, tmp_path / "again")
    config = json.loads((again / "adapter_config.json").read_text())
    assert config["rank_pattern"] == {} and config["target_parameters"] == EXPERTS
    reread = peft.PeftModel.from_pretrained(hf_of(path), str(again)).eval()
    assert rel(logits(reread), logits(theirs)) <= TOL


def test_round_trip_is_identical_and_merges_exactly(base, tmp_path):
    from transformers import AutoModelForCausalLM
    _, path = base
    ours = trained(vt.add_lora(ours_of(path), r=4, alpha=8, seed=0))
    back = vt.load_adapter(ours_of(path), vt.save_adapter(ours, tmp_path / "adapter"))
    mine, theirs = dict(ours.named_parameters()), dict(back.named_parameters())
    assert set(mine) == set(theirs)
    assert all(torch.equal(p, theirs[n]) for n, p in mine.items())
    assert back.lora_settings.targets == ours.lora_settings.targets
    out = vt.export(back, None, tmp_path / "merged", format="merged")
    merged = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    err = rel(logits(merged), logits(ours))
    print(f"merged export vs adapted: rel err {err:.2e}")
    assert err <= TOL


def test_dense_adapter_on_an_moe_model_is_refused_by_tensor(base, tmp_path):
    """A Llama adapter on the MLP projections (same hidden / intermediate sizes as the Mixtral case)."""
    from hf_reference import make_checkpoint
    case, path = base
    llama, _ = make_checkpoint(tmp_path, "llama")
    dense = vt.add_lora(ours_of(llama), r=4, alpha=8, targets=["gate_proj", "up_proj", "down_proj"])
    adapter = vt.save_adapter(dense, tmp_path / "dense")
    model = ours_of(path)
    with pytest.raises(CheckpointError, match=r"dense/adapter_model\.safetensors: tensor 'base_model\.model\.model"
                                              r"\.layers\.0\.mlp\.\w+_proj\.lora_A\.weight' adapts a dense MLP "
                                              r"projection .* mixture of 4 experts"):
        vt.load_adapter(model, adapter)
    assert not lora_layers(model)


def rewrite(src, dst, config=None, tensors=None):
    from safetensors.torch import load_file, save_file
    dst.mkdir()
    cfg = json.loads((src / "adapter_config.json").read_text())
    (dst / "adapter_config.json").write_text(json.dumps(config(cfg) if config else cfg))
    state = load_file(str(src / "adapter_model.safetensors"))
    save_file(tensors(state) if tensors else state, str(dst / "adapter_model.safetensors"))
    return dst


def test_wrong_expert_count_and_unknown_parameter_are_refused(base, tmp_path):
    _, path = base
    good = vt.save_adapter(trained(vt.add_lora(ours_of(path), r=4, alpha=8, seed=0)), tmp_path / "good")
    a_name = "base_model.model.model.layers.1.mlp.experts.lora_A.weight"   # down_proj (outer wrapper)
    b_name = a_name.replace("lora_A", "lora_B")

    def three_experts(state):   # rank 4 x 3 experts: A's first 12 rows, B's columns of experts 0..2
        state[a_name] = state[a_name][:12].contiguous()
        state[b_name] = state[b_name].reshape(64, 4, 4)[:, :, :3].reshape(64, 12).contiguous()
        return state
    fewer = rewrite(good, tmp_path / "fewer", tensors=three_experts)
    model = ours_of(path)
    with pytest.raises(CheckpointError, match=rf"fewer/adapter_model\.safetensors: tensor '{a_name}' holds LoRA "
                                              r"weights for 3 experts \(rank 4\), but model\.layers\.1\.mlp of this "
                                              r"model has 4"):
        vt.load_adapter(model, fewer)
    unknown = rewrite(good, tmp_path / "unknown", config=lambda c: {
        **c, "target_parameters": c["target_parameters"] + ["mlp.experts.gate_up_proj_bias"]})
    with pytest.raises(CheckpointError, match=r"unknown/adapter_config\.json: target_parameters entry "
                                              r"\['mlp\.experts\.gate_up_proj_bias'\] match no expert parameter"):
        vt.load_adapter(model, unknown)
    gate_up_b = "base_model.model.model.layers.0.mlp.experts.base_layer.lora_B.weight"   # rank 2r = 8

    def mixed(state):   # a gate row reading an up rank: not block-diagonal
        state[gate_up_b][0, 1] = 0.5   # column k*E + e = 1: rank 0 of expert 1; row 0 is a gate row
        state[gate_up_b][0, 4 * 4 + 1] = 0.5   # rank 4 (an up rank) of expert 1
        return state
    with pytest.raises(CheckpointError, match=rf"mixed/adapter_model\.safetensors: tensor '{gate_up_b}' \(rank 8 = "
                                              r"2r\) of expert 1 is not block-diagonal"):
        vt.load_adapter(model, rewrite(good, tmp_path / "mixed", tensors=mixed))
    assert not lora_layers(model) and all(p.requires_grad for p in model.parameters())


def test_experts_adapted_in_part_are_written_per_expert_and_load_back(base, tmp_path):
    """PEFT adapts a fused expert parameter whole: an adapter on some of its projections is written with velotune's
    per-expert names (a warning says PEFT cannot apply it), never refused (a save mid-training must not fail), and
    loads back exactly."""
    case, path = base
    gate = "w1" if case == "mixtral" else "gate_proj"
    model = randomize_adapters(vt.add_lora(ours_of(path), r=4, alpha=8, targets=["q_proj", gate])).eval()
    with pytest.warns(UserWarning, match=r"adapts 4 of the 8 expert projections behind gate_up_proj in "
                                         r"model\.layers\.0\.\w+: PEFT adapts a fused expert parameter whole"):
        out = vt.save_adapter(model, tmp_path / "part")
    config = json.loads((out / "adapter_config.json").read_text())
    assert config.get("target_parameters") in (None, [])
    again = vt.load_adapter(ours_of(path), out).eval()
    assert sorted(lora_layers(again)) == sorted(lora_layers(model))
    assert torch.equal(logits(again), logits(model))


def test_target_parameters_on_a_dense_model_are_refused(tmp_path):
    from hf_reference import make_checkpoint
    llama, _ = make_checkpoint(tmp_path, "llama")
    dense = vt.save_adapter(vt.add_lora(ours_of(llama), r=4, alpha=8, targets=["q_proj"]), tmp_path / "a")
    bad = rewrite(dense, tmp_path / "bad", config=lambda c: {**c, "target_parameters": EXPERTS})
    with pytest.raises(CheckpointError, match=r"bad/adapter_config\.json: target_parameters entries .* match no "
                                              r"expert parameter of this model \(known: none"):
        vt.load_adapter(ours_of(llama), bad)


def test_dense_layer_mlp_of_qwen3_moe_reads_back_exactly_with_a_warning(tmp_path):
    """Qwen3-MoE with a dense layer 0 (mlp_only_layers): its mlp.gate_proj/up_proj/down_proj are module targets,
    which PEFT 0.21 on transformers 5 rewrites into expert parameters (dropping them): warned; our own load is
    exact (and our merged export matches)."""
    path = tmp_path / "q"
    make_hf("qwen3_moe").save_pretrained(str(path))
    ours = trained(vt.add_lora(ours_of(path), r=4, alpha=8, seed=0))
    with pytest.warns(UserWarning, match=r"model\.layers\.0\.mlp\.gate_proj.*PEFT .* would leave"):
        adapter = vt.save_adapter(ours, tmp_path / "adapter")
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert "gate_proj" in config["target_modules"] and config["target_parameters"] == EXPERTS
    back = vt.load_adapter(ours_of(path), adapter)
    assert all(torch.equal(p, dict(back.named_parameters())[n]) for n, p in ours.named_parameters())
    assert rel(logits(back), logits(ours)) == 0
