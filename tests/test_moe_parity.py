"""Mixtral and Qwen3-MoE against transformers on tiny configs (4 experts, top-2, hidden 64, 2 layers): logits, the
loss, every gradient (router and experts included) and the router load-balancing loss, in fp32, with padding;
both checkpoint layouts (the hub's per-expert files, which transformers' save_pretrained also writes, and its fused
`save_original_format=False` layout); expert tensors that do not match the config; greedy generation."""
from __future__ import annotations

import json

import pytest
import torch

import velotune as vt
from velotune.errors import CheckpointError

pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")
TOL = 1e-5
BASE = dict(vocab_size=211, hidden_size=64, intermediate_size=112, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-6, tie_word_embeddings=False,
            num_experts_per_tok=2, router_aux_loss_coef=0.02)
CASES = {
    # A window of 8 over 19 tokens; the router's top-2 renormalised.
    "mixtral": ("mixtral", dict(num_local_experts=4, sliding_window=8, head_dim=24)),
    # Layer 0 dense (mlp_only_layers), layer 1 sparse; renormalised top-k; biases and q/k norms.
    "qwen3_moe": ("qwen3_moe", dict(num_experts=4, moe_intermediate_size=48, mlp_only_layers=[0],
                                    norm_topk_prob=True, attention_bias=True, head_dim=16)),
    # Layer 0 dense by decoder_sparse_step 2; top-k probabilities not renormalised; a sliding window; tied head.
    "qwen3_moe_step": ("qwen3_moe", dict(num_experts=4, moe_intermediate_size=48, decoder_sparse_step=2,
                                         norm_topk_prob=False, use_sliding_window=True, sliding_window=8,
                                         tie_word_embeddings=True)),
}


def make_hf(case: str, **overrides):
    from transformers import AutoConfig, AutoModelForCausalLM
    model_type, extra = CASES[case]
    torch.manual_seed(1234)
    config = AutoConfig.for_model(model_type, **{**BASE, **extra, **overrides})
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="eager")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(1.0, 0.1)
            elif p.dim() == 1:
                p.normal_(0.0, 0.05)
            elif name.endswith("mlp.gate.weight"):
                p.normal_(0.0, 0.3)  # decisive routing: near-uniform scores would make top-k a coin toss
    return model.eval()


def rel(a, b):
    return ((a - b).norm() / b.norm().clamp(min=1e-30)).item()


@pytest.fixture(scope="module", params=list(CASES))
def pair(request, tmp_path_factory):
    """(case, transformers model, its save_pretrained directory)."""
    hf = make_hf(request.param)
    out = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(str(out))
    return request.param, hf, out


def inputs():
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(0, 211, (2, 19), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :5] = 0  # left padding in row 1
    return ids, mask


def test_saved_layout_is_per_expert(pair):
    """What the loader reads by name: save_pretrained reverts transformers' fused experts to the hub layout."""
    case, _, path = pair
    names = json.loads((path / "model.safetensors").read_bytes()[8:8 + int.from_bytes(
        (path / "model.safetensors").read_bytes()[:8], "little")]).keys()
    expert = "block_sparse_moe.experts.3.w2.weight" if case == "mixtral" else "mlp.experts.3.down_proj.weight"
    assert f"model.layers.1.{expert}" in names


def test_logits_loss_aux_and_grads(pair):
    case, hf, path = pair
    ours, _ = vt.load(path, dtype="float32", device="cpu", load_tokenizer_files=False)
    ids, mask = inputs()
    # The first real token of the padded row has no target: a padded position would predict it, and padded
    # positions' outputs are nobody's (transformers masks their whole attention row, we let them see themselves).
    labels = ids.masked_fill(mask == 0, -100)
    labels[1, 5] = -100
    hf.zero_grad()
    ref = hf(input_ids=ids, attention_mask=mask, labels=labels, output_router_logits=True)
    ref.loss.backward()
    out = ours(ids, attention_mask=mask, labels=labels, output_router_logits=True, return_logits=True)
    out.loss.backward()
    keep = mask.bool()
    assert rel(out.logits[keep], ref.logits[keep]) < TOL
    assert abs(out.aux_loss.item() - ref.aux_loss.item()) < TOL * ref.aux_loss.item()
    assert abs(out.loss.item() - ref.loss.item()) < TOL * ref.loss.item()
    theirs = dict(hf.named_parameters())
    worst = 0.0
    for name, p in ours.named_parameters():
        worst = max(worst, rel(p.grad, hf_grad(case, name, theirs)))
    assert worst < TOL, worst
    # config.json's output_router_logits (false): no aux loss, the plain loss, as transformers.
    with torch.no_grad():
        plain, theirs_plain = ours(ids, labels=ids), hf(input_ids=ids, labels=ids)
    assert plain.aux_loss is None and abs(plain.loss.item() - theirs_plain.loss.item()) < TOL * plain.loss.item()


def hf_grad(case, name, theirs):
    """The gradient transformers has for our parameter `name` (its experts are fused [E, ...] tensors)."""
    import re
    match = re.match(r"(model\.layers\.\d+)\.(?:block_sparse_moe|mlp)\.experts\.(\d+)\.(\w+)\.weight$", name)
    if match is None:
        return theirs[name.replace("block_sparse_moe", "mlp")].grad
    prefix, e, proj = match[1], int(match[2]), match[3]
    kind = {"w1": 0, "gate_proj": 0, "w3": 1, "up_proj": 1}.get(proj)
    if kind is None:
        return theirs[f"{prefix}.mlp.experts.down_proj"].grad[e]
    return theirs[f"{prefix}.mlp.experts.gate_up_proj"].grad[e].chunk(2, dim=0)[kind]


def test_greedy_generation_matches_transformers(pair):
    from velotune.infer import generate_ids
    _, hf, path = pair
    ours, _ = vt.load(path, dtype="float32", device="cpu", load_tokenizer_files=False)
    prompt = inputs()[0][:1, :7]
    out = generate_ids(ours, prompt[0].tolist(), max_new_tokens=6, eos_token_ids=[])
    ref = hf.generate(prompt, max_new_tokens=6, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert out.tokens[0] == ref[0, 7:].tolist()


def hub_state(case, hf) -> dict:
    """The hub's per-expert tensors, written here from transformers' fused in-memory weights (not by its own
    save_pretrained revert)."""
    ffn, names = ("block_sparse_moe", ("w1", "w3", "w2")) if case == "mixtral" else \
        ("mlp", ("gate_proj", "up_proj", "down_proj"))
    state = {}
    for name, p in hf.state_dict().items():
        if ".mlp.experts." not in name:
            state[name.replace(".mlp.gate.", f".{ffn}.gate.")] = p.contiguous()
            continue
        prefix = name.split(".mlp.experts.")[0] + f".{ffn}.experts"
        for e, w in enumerate(p.unbind(0)):
            parts = w.chunk(2, dim=0) if name.endswith("gate_up_proj") else (w,)
            for proj, part in zip(names[:2] if len(parts) == 2 else names[2:], parts):
                state[f"{prefix}.{e}.{proj}.weight"] = part.contiguous()
    if hf.config.tie_word_embeddings:
        state.pop("lm_head.weight")
    return state


def write_dir(path, config_dir, state):
    from safetensors.torch import save_file
    path.mkdir()
    (path / "config.json").write_text((config_dir / "config.json").read_text())
    save_file(state, str(path / "model.safetensors"))
    return path


def logits_of(path, ids):
    ours, _ = vt.load(path, dtype="float32", device="cpu", load_tokenizer_files=False)
    with torch.no_grad():
        return ours(ids).logits


def test_hub_and_fused_layouts_load(pair, tmp_path):
    case, hf, path = pair
    ids = inputs()[0]
    with torch.no_grad():
        ref = hf(input_ids=ids).logits
    hub = write_dir(tmp_path / "hub", path, hub_state(case, hf))
    assert rel(logits_of(hub, ids), ref) < TOL
    fused = tmp_path / "fused"
    hf.save_pretrained(str(fused), save_original_format=False)   # transformers' in-memory names
    assert rel(logits_of(fused, ids), ref) < TOL
    # vt.save writes the per-expert layout back, which transformers reads.
    from transformers import AutoModelForCausalLM
    ours, _ = vt.load(fused, dtype="float32", device="cpu", load_tokenizer_files=False)
    vt.save(ours, None, tmp_path / "saved")
    again = AutoModelForCausalLM.from_pretrained(str(tmp_path / "saved"), dtype=torch.float32).eval()
    with torch.no_grad():
        assert rel(again(input_ids=ids).logits, ref) < TOL


def test_unknown_expert_layouts_are_refused(pair, tmp_path):
    case, hf, path = pair
    state = hub_state(case, hf)
    ffn = "block_sparse_moe" if case == "mixtral" else "mlp"
    down = "w2" if case == "mixtral" else "down_proj"
    missing = f"model.layers.1.{ffn}.experts.2.{down}.weight"
    broken = write_dir(tmp_path / "missing", path, {k: v for k, v in state.items() if k != missing})
    with pytest.raises(CheckpointError, match=rf"model\.safetensors: tensor '{missing}' is missing"):
        vt.load(broken, dtype="float32", device="cpu", load_tokenizer_files=False)
    # Fewer experts in config.json than in the weights: named, not ignored.
    fewer = write_dir(tmp_path / "fewer", path, state)
    config = json.loads((fewer / "config.json").read_text())
    config["num_local_experts"] = 3
    (fewer / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=rf"model\.safetensors: tensor 'model\.layers\.\d\.{ffn}\.experts\.3\."):
        vt.load(fewer, dtype="float32", device="cpu", load_tokenizer_files=False)
    fused = tmp_path / "fused"
    hf.save_pretrained(str(fused), save_original_format=False)
    (fused / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"tensor 'model\.layers\.\d\.mlp\.experts\.\w+' holds 4 experts"):
        vt.load(fused, dtype="float32", device="cpu", load_tokenizer_files=False)


def test_expert_in_a_dense_layer_is_refused(tmp_path):
    hf, path = make_hf("qwen3_moe"), tmp_path / "src"
    hf.save_pretrained(str(path))
    config = json.loads((path / "config.json").read_text())
    config["mlp_only_layers"] = [0, 1]
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"tensor 'model\.layers\.1\.mlp\.experts\.0\.\w+\.weight' is an "
                                              r"expert of layer 1"):
        vt.load(path, dtype="float32", device="cpu", load_tokenizer_files=False)


@pytest.mark.parametrize("module,field,value,words", [
    ("mixtral", "num_experts_per_tok", 9, "exceeds the number of experts"),
    ("mixtral", "num_local_experts", 0, "positive integer"),
    ("mixtral", "router_aux_loss_coef", -1, "non-negative"),
    ("qwen3_moe", "mlp_only_layers", [5], "layer indices below"),
    ("qwen3_moe", "decoder_sparse_step", 0, "positive integer"),
    ("qwen3_moe", "norm_topk_prob", "yes", "true or false"),
])
def test_config_guards_name_the_field(module, field, value, words):
    from velotune.models.registry import architecture
    config = {**BASE, "model_type": module, "num_local_experts": 8, field: value}
    with pytest.raises(CheckpointError, match=rf"config\.json: field '{field}'.*{words}"):
        architecture(module).Args.from_dict(config)


def test_aux_loss_under_checkpointing_and_without_mask(pair):
    """The load-balancing loss read from the routers survives gradient checkpointing (same loss, same grads)."""
    _, hf, path = pair
    ids = inputs()[0]
    ours, _ = vt.load(path, dtype="float32", device="cpu", load_tokenizer_files=False)
    ref = hf(input_ids=ids, labels=ids, output_router_logits=True)
    grads = []
    for mode in (False, True):
        ours.zero_grad()
        ours.train()
        ours.set_gradient_checkpointing(mode)
        out = ours(ids, labels=ids, output_router_logits=True)
        assert abs(out.aux_loss.item() - ref.aux_loss.item()) < TOL * ref.aux_loss.item()
        assert abs(out.loss.item() - ref.loss.item()) < TOL * ref.loss.item()
        out.loss.backward()
        grads.append({n: p.grad.clone() for n, p in ours.named_parameters()})
    assert max(rel(grads[1][n], grads[0][n]) for n in grads[0]) < TOL


def test_attention_lora_matches_peft(pair, tmp_path):
    """LoRA on the attention projections of an MoE model: our adapter file in PEFT gives the same logits and
    gradients. (LoRA on experts is a later step: transformers holds them as fused 3-D parameters.)"""
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM
    from test_lora import randomize_adapters
    _, _, path = pair
    ours, _ = vt.load(path, dtype="float32", device="cpu", load_tokenizer_files=False)
    ours = randomize_adapters(vt.add_lora(ours, r=4, alpha=8, targets=["q_proj", "v_proj"], seed=0))
    vt.save_adapter(ours, tmp_path / "adapter")
    hf = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32, attn_implementation="eager")
    theirs = peft.PeftModel.from_pretrained(hf, str(tmp_path / "adapter"), is_trainable=True)
    ids = inputs()[0]
    mine, ref = ours(ids, labels=ids, return_logits=True), theirs(input_ids=ids, labels=ids)
    assert rel(mine.logits, ref.logits) < TOL
    mine.loss.backward()
    ref.loss.backward()
    theirs_grads = {n.removeprefix("base_model.model.").replace(".default.", "."): p.grad
                    for n, p in theirs.named_parameters() if p.requires_grad}
    trained = {n: p.grad for n, p in ours.named_parameters() if p.requires_grad}
    assert set(trained) == set(theirs_grads)
    assert max(rel(g, theirs_grads[n]) for n, g in trained.items()) < TOL


def test_routers_stay_out_of_all_linear_lora_and_quantization(tmp_path):
    """As PEFT leaves transformers' routers: all-linear LoRA and NF4 skip every `gate`; naming it adapts it."""
    from velotune.models.quantize import decoder_linears, router_names
    make_hf("mixtral").save_pretrained(str(tmp_path / "mixtral"))
    model, _ = vt.load(tmp_path / "mixtral", dtype="float32", device="cpu")
    routers = router_names(model)
    assert routers and all(name.endswith(".gate") for name in routers)
    assert not routers & {name for name, _ in decoder_linears(model)}
    vt.add_lora(model, r=2, alpha=4)
    assert not routers & set(model.lora_settings.targets) and any(".experts." in t for t in model.lora_settings.targets)


def test_lora_on_the_experts_trains_them_and_merges_exactly_into_a_checkpoint_transformers_loads(pair, tmp_path):
    """all-linear LoRA adapts every expert's projections (not the routers); one optimizer step moves each expert's
    adapter that saw tokens; the merged export (the hub's per-expert layout) loads in transformers with the adapted
    model's logits."""
    from transformers import AutoModelForCausalLM
    case, _, path = pair
    model, _ = vt.load(path, dtype="float32", device="cpu", load_tokenizer_files=False)
    vt.add_lora(model, r=4, alpha=8)
    experts = [t for t in model.lora_settings.targets if ".experts." in t]
    assert experts and not any(t.endswith(".gate") for t in model.lora_settings.targets)
    ids, mask = inputs()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    model.train()
    model(ids, labels=ids, attention_mask=mask).loss.backward()
    moved = sum(int(model.get_submodule(t).lora_B.weight.grad.abs().sum() > 0) for t in experts)
    assert moved >= len(experts) // 2   # the experts that got tokens
    opt.step()
    model.eval()
    out = vt.export(model, None, tmp_path / "merged", format="merged")
    merged = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    with torch.no_grad():
        want = model(ids, attention_mask=mask).logits
        got = merged(input_ids=ids, attention_mask=mask).logits
    real = mask.bool()
    assert rel(got[real], want[real]) < TOL


def test_expert_groups_run_at_bucket_sizes_where_kernels_are_kept_per_shape(monkeypatch):
    """bf16 / fp16 on the CPU (oneDNN keeps a compiled kernel per matmul shape): each expert's group is padded with
    zero rows to a bucket size, so training meets few shapes and memory stops growing; the real rows' outputs and
    gradients are those of the unpadded groups. fp32 groups run at their own sizes."""
    from velotune.kernels.shape_buckets import bucket_length
    from velotune.models import moe
    torch.manual_seed(0)
    experts = [moe.Expert(16, 24, "silu", ("gate_proj", "up_proj", "down_proj")) for _ in range(3)]
    seen = []
    for e in experts:
        e.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[0]))
    counts = [37, 0, 90]
    x = torch.randn(sum(counts), 16, requires_grad=True)
    plain = moe.run_groups(experts, x, counts)
    assert seen == counts
    grad = torch.randn_like(plain)
    want = torch.autograd.grad(plain, [x, *experts[0].parameters()], grad)
    seen.clear()
    monkeypatch.setattr(moe, "shape_keyed_kernels", lambda device, dtype: True)
    bucketed = moe.run_groups(experts, x, counts)
    assert seen == [bucket_length(37), 0, bucket_length(90)] == [40, 0, 96]
    assert rel(bucketed, plain) < 1e-6
    got = torch.autograd.grad(bucketed, [x, *experts[0].parameters()], grad)
    assert max(rel(g, w) for g, w in zip(got, want)) < 1e-6
