"""Adapters that PEFT itself trained and saved, on transformers' own model of each vision family (LLaVA, Qwen2-VL,
Qwen2.5-VL, Idefics3, Gemma 3), load into velotune's model (`vt.load` + `vt.load_adapter`) with PEFT's logits: LoRA
on the language model and the vision tower, the projector saved in full (modules_to_save), named as PEFT users name
them (leaf names, or one regex over transformers' module names). The other direction (ours into PEFT) is
tests/test_vision_families.py's; its tiny checkpoints and images are reused here.

PEFT starts lora_B at zero: B and the saved projector are perturbed (seeded) before saving, so a LoRA layer or
projector that is dropped, misplaced or mis-scaled moves the logits."""
import json
import re
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import velotune as vt
from velotune.errors import CheckpointError
from velotune.lora import lora_layers
from test_vision_families import data, family_dir  # noqa: F401  (fixtures: the five tiny families, the images)
from vision_fixtures import QUESTION

# family -> (leaf target_modules over both parts, a regex over transformers' in-memory names, the projector)
SPECS = {
    "llava": (["q_proj", "v_proj", "out_proj", "fc1", "down_proj"],
              r".*language_model.*\.(q_proj|o_proj)|.*vision_tower.*\.fc2", "multi_modal_projector"),
    # "attn.proj", not "proj": the bare leaf also names Qwen's Conv3d patch embedding (its own test below)
    "qwen2_vl": (["q_proj", "o_proj", "down_proj", "qkv", "attn.proj", "fc1"],
                 r".*language_model.*\.(q_proj|v_proj)|.*visual\.blocks.*\.(qkv|fc2)", "merger"),
    "qwen2_5_vl": (["q_proj", "o_proj", "gate_proj", "qkv", "attn.proj"],
                   r".*language_model.*\.(k_proj|up_proj)|.*visual\.blocks.*\.(qkv|down_proj)", "merger"),
    # transformers calls Idefics3's text model `model.text_model`, ours is `language_model.model`
    "idefics3": (["q_proj", "v_proj", "out_proj", "fc1", "down_proj"],
                 r".*text_model.*\.(q_proj|v_proj)|.*vision_model.*\.fc1", "connector"),
    "gemma3": (["q_proj", "v_proj", "out_proj", "fc1", "down_proj"],
               r".*language_model.*\.(q_proj|o_proj)|.*vision_tower.*\.fc2", "multi_modal_projector"),
}
VISION_PARTS = ("vision_tower.", "visual.blocks.", "vision_model.")


def _inputs(model, tokenizer, items) -> tuple[dict, dict]:
    """A prompt with two images: velotune's inputs, and transformers' extra type ids (Gemma 3 reads its image
    blocks from them, Qwen2-VL its 3-D positions; 1 marks an image token)."""
    from velotune.infer.vision_prompt import encode_image_prompt
    prompt = [{"role": "user", "content": [{"type": "image", "image": str(items[0][0])},
                                           {"type": "text", "text": QUESTION},
                                           {"type": "image", "image": str(items[1][0])}]}]
    ids, images = encode_image_prompt(model, tokenizer, prompt)
    ids = torch.tensor([ids])
    types = (ids == model.image_token_id).long()
    extra = {"gemma3": {"token_type_ids": types}, "qwen2_vl": {"mm_token_type_ids": types},
             "qwen2_5_vl": {"mm_token_type_ids": types}}.get(model.model_type, {})
    return {"input_ids": ids, **images}, extra


def _peft_adapter(model_dir, targets, projector, out, seed=0):
    """get_peft_model on transformers' model, B and the projector's copy perturbed, save_pretrained -> the model."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForImageTextToText
    base = AutoModelForImageTextToText.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=targets,
                                                 modules_to_save=[projector]))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name or ".modules_to_save." in name:
                p.add_(0.1 * torch.randn(p.shape, generator=g))
    peft_model.eval().save_pretrained(str(out))
    return peft_model


def _family(model_dir) -> str:
    config = json.loads((model_dir / "config.json").read_text())
    return config["model_type"]


@pytest.fixture(scope="module")
def peft_leaf(family_dir, data, tmp_path_factory):  # noqa: F811
    """Per family: PEFT's adapter with leaf-name targets, its model, and the inputs of a two-image prompt."""
    targets, _, projector = SPECS[_family(family_dir)]
    out = tmp_path_factory.mktemp("peft") / "adapter"
    peft_model = _peft_adapter(family_dir, targets, projector, out)
    ours, tokenizer = vt.load(str(family_dir), dtype="float32")
    return family_dir, peft_model, out, _inputs(ours, tokenizer, data[1])


def _check_logits(peft_model, ours, inputs, extra) -> float:
    """PEFT's logits == ours after loading (relative max diff returned); the adapter moves them (can fail)."""
    with torch.no_grad():
        want = peft_model(**inputs, **extra).logits
        got = ours(**inputs).logits
        with peft_model.disable_adapter():
            plain = peft_model(**inputs, **extra).logits
    rel = float((want - got).abs().max() / want.abs().max())
    print(f"{ours.model_type}: max |diff| {float((want - got).abs().max()):.3g}, relative {rel:.3g}")
    assert rel < 1e-5
    assert float((want - plain).abs().max()) > 1e-2
    return rel


def test_peft_adapter_on_tower_and_language_model_with_the_projector_loads_with_peft_logits(peft_leaf):
    model_dir, peft_model, adapter, (inputs, extra) = peft_leaf
    written = load_file(str(adapter / "adapter_model.safetensors"))
    lora = [k for k in written if ".lora_A." in k]
    # PEFT adapted both parts and saved the projector whole
    assert any(".language_model." in k or ".text_model." in k for k in lora)
    assert any(part in k for k in lora for part in VISION_PARTS)
    assert any(f".{SPECS[_family(model_dir)][2]}." in k and "lora" not in k for k in written)

    ours, _ = vt.load(str(model_dir), dtype="float32")
    vt.load_adapter(ours, adapter)
    # every tensor of the file went somewhere, by PEFT's name, unchanged
    held = {k: v.detach() for k, v in vt.lora.adapter_state_dict(ours).items()}
    assert sorted(held) == sorted(written)
    assert all(torch.equal(held[k], written[k]) for k in written)
    _check_logits(peft_model, ours, inputs, extra)


def test_a_regex_target_is_read_over_transformers_module_names(family_dir, data, tmp_path):  # noqa: F811
    """PEFT matches a regex target against transformers' in-memory names (Idefics3's `model.text_model.`, ours
    `language_model.model.`): velotune adapts the same linears, and the projector named in full."""
    _, regex, projector = SPECS[_family(family_dir)]
    # the projector by its full in-memory name this time (`model.visual.merger`, ours `visual.merger`)
    full = {"merger": "model.visual.merger"}.get(projector, f"model.{projector}")
    peft_model = _peft_adapter(family_dir, regex, full, tmp_path / "adapter", seed=1)
    ours, tokenizer = vt.load(str(family_dir), dtype="float32")
    vt.load_adapter(ours, tmp_path / "adapter")
    assert len(lora_layers(ours)) == sum(1 for n, _ in peft_model.named_modules() if n.endswith(".lora_A")) > 0
    inputs, extra = _inputs(ours, tokenizer, data[1])
    _check_logits(peft_model, ours, inputs, extra)


def test_lora_for_a_module_the_family_lacks_is_named_by_file_and_tensor(peft_leaf, tmp_path):
    """A layer's LoRA also written for a layer index the tiny model does not have (an adapter for a deeper
    model)."""
    model_dir, _, adapter, _ = peft_leaf
    bad = shutil.copytree(adapter, tmp_path / "bad")
    state = load_file(str(bad / "adapter_model.safetensors"))
    copied = next(k for k in state if ".layers.1." in k and k.endswith(".lora_A.weight"))
    for suffix in (".lora_A.weight", ".lora_B.weight"):
        key = copied.replace(".lora_A.weight", suffix)
        state[key.replace(".layers.1.", ".layers.7.")] = state[key].clone()
    save_file(state, str(bad / "adapter_model.safetensors"))
    ours, _ = vt.load(str(model_dir), dtype="float32")
    wanted = copied.replace(".layers.1.", ".layers.7.")
    with pytest.raises(CheckpointError, match=rf"bad/adapter_model\.safetensors: tensor {re.escape(wanted)} is "
                                              r"LoRA for .*, a module this model does not have"):
        vt.load_adapter(ours, bad)
    assert not lora_layers(ours)   # left as it was


def test_a_target_the_family_lacks_is_named_by_config_file(peft_leaf, tmp_path):
    model_dir, _, adapter, _ = peft_leaf
    bad = shutil.copytree(adapter, tmp_path / "bad")
    config = json.loads((bad / "adapter_config.json").read_text())
    config["target_modules"] = list(config["target_modules"]) + ["c_attn"]
    (bad / "adapter_config.json").write_text(json.dumps(config))
    ours, _ = vt.load(str(model_dir), dtype="float32")
    with pytest.raises(CheckpointError, match=r"bad/adapter_config\.json: .*\['c_attn'\] match no linear layer"):
        vt.load_adapter(ours, bad)
    assert not lora_layers(ours)


@pytest.fixture(scope="module")
def qwen2_vl_dir(tmp_path_factory):
    from velotune.bench.tiny_vlm_families import make_tiny_qwen2_vl
    from test_vision_families import TEXTS
    return make_tiny_qwen2_vl(tmp_path_factory.mktemp("qwen2_vl_conv"), TEXTS)


def test_lora_on_qwen2_vl_patch_embedding_conv_loads_with_peft_logits(qwen2_vl_dir, data, tmp_path):  # noqa: F811
    """PEFT's bare leaf `proj` also adapts Qwen2-VL's Conv3d patch embedding (a Conv3d LoRA pair): it loads, and the
    logits are PEFT's."""
    peft_model = _peft_adapter(qwen2_vl_dir, ["q_proj", "proj"], "merger", tmp_path / "adapter")
    written = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    conv_a = "base_model.model.model.visual.patch_embed.proj.lora_A.weight"
    assert written[conv_a].dim() == 5  # PEFT's Conv3d pair
    ours, tokenizer = vt.load(str(qwen2_vl_dir), dtype="float32")
    vt.load_adapter(ours, tmp_path / "adapter")
    assert type(lora_layers(ours)["visual.patch_embed.proj"]).__name__ == "LoraConv"
    inputs, extra = _inputs(ours, tokenizer, data[1])
    _check_logits(peft_model, ours, inputs, extra)
    # the patch embedding's adapter alone moves the logits: it is applied, not just loaded
    with torch.no_grad():
        before = ours(**inputs).logits
        lora_layers(ours)["visual.patch_embed.proj"].lora_B.weight.zero_()
        assert float((ours(**inputs).logits - before).abs().max()) > 1e-3


def test_a_regex_that_selects_nothing_is_named(peft_leaf, tmp_path):
    model_dir, _, adapter, _ = peft_leaf
    bad = shutil.copytree(adapter, tmp_path / "bad")
    config = json.loads((bad / "adapter_config.json").read_text())
    config["target_modules"] = r".*\.cross_attn\.(q|k)_proj"
    (bad / "adapter_config.json").write_text(json.dumps(config))
    ours, _ = vt.load(str(model_dir), dtype="float32")
    with pytest.raises(CheckpointError, match=r"bad/adapter_config\.json: target_modules regex .*cross_attn.* "
                                              r"matches no linear layer"):
        vt.load_adapter(ours, bad)


@pytest.mark.filterwarnings("error:Found missing adapter keys")
def test_our_lora_on_the_patch_embedding_trains_loads_in_peft_and_merges(qwen2_vl_dir, data, tmp_path):  # noqa: F811
    """velotune's LoRA on the Conv3d patch embedding: its gradients are PEFT's on transformers' model (same A and B),
    its adapter file loads into PEFT with our logits, and the merged export gives them too."""
    from peft import PeftModel
    from test_vision_families import image_prompt_inputs
    from transformers import AutoModelForImageTextToText

    ours, tokenizer = vt.load(str(qwen2_vl_dir), dtype="float32")
    vt.add_lora(ours, r=4, alpha=8, targets=["q_proj", "proj"], seed=0)
    conv = lora_layers(ours)["visual.patch_embed.proj"]
    assert conv.lora_A.weight.requires_grad and conv.lora_A.weight.dim() == 5
    with torch.no_grad():
        for p in ours.parameters():
            if p.requires_grad and p.dim() > 1 and not p.any():  # B starts at zero: perturb it
                p.add_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    vt.save_adapter(ours, tmp_path / "ours")
    ids, images, extra = image_prompt_inputs(ours, tokenizer, data[1][0][0])
    base = AutoModelForImageTextToText.from_pretrained(str(qwen2_vl_dir), dtype=torch.float32)
    theirs = PeftModel.from_pretrained(base, str(tmp_path / "ours"), is_trainable=True)
    want = ours(ids, **images, labels=ids)
    got = theirs(input_ids=ids, **images, **extra, labels=ids)
    assert float((want.loss - got.loss).detach().abs()) < 1e-5 * float(got.loss.detach().abs())
    want.loss.backward()
    got.loss.backward()
    peft_conv = dict(theirs.named_modules())["base_model.model.model.visual.patch_embed.proj"]
    for part in ("lora_A", "lora_B"):
        ours_grad = getattr(conv, part).weight.grad
        peft_grad = getattr(peft_conv, part)["default"].weight.grad
        assert ours_grad.abs().max() > 0
        assert float((ours_grad - peft_grad).abs().max()) <= 1e-5 * float(peft_grad.abs().max()), part

    ours.eval()
    with torch.no_grad():
        adapted = ours(ids, **images).logits
    out = vt.export(ours, tokenizer, tmp_path / "merged", format="merged")
    plain = AutoModelForImageTextToText.from_pretrained(str(out), dtype=torch.float32).eval()
    with torch.no_grad():
        merged = plain(input_ids=ids, **images, **extra).logits
    assert float((merged - adapted).abs().max()) < 1e-5 * float(adapted.abs().max())


def test_a_peft_regex_that_selects_the_patch_embedding_loads(qwen2_vl_dir, data, tmp_path):  # noqa: F811
    """A regex target is matched against convolutions too, as PEFT matches it: its Conv3d adapter loads."""
    regex = r".*visual\.(patch_embed\.proj|blocks\.\d+\.attn\.qkv)"
    peft_model = _peft_adapter(qwen2_vl_dir, regex, "merger", tmp_path / "adapter")
    ours, tokenizer = vt.load(str(qwen2_vl_dir), dtype="float32")
    vt.load_adapter(ours, tmp_path / "adapter")
    assert "visual.patch_embed.proj" in lora_layers(ours)
    inputs, extra = _inputs(ours, tokenizer, data[1])
    _check_logits(peft_model, ours, inputs, extra)
