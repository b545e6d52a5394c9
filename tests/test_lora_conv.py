"""LoRA on convolutions (lora/conv.py) computes what PEFT's convolution LoRA computes, merges exactly, and is chosen
only by name: "all-linear" leaves convolutions alone, as PEFT does. (Qwen2-VL's Conv3d patch embedding against
PEFT on transformers' model: tests/test_vision_peft_import.py.)"""
import copy

import pytest
import torch
from torch import nn

import velotune as vt
from velotune.errors import ConfigError
from velotune.lora import lora_layers
from velotune.lora import merged_state_dict
from velotune.models.vision.qwen2_vl_vision import PatchConv3d
from test_whisper_parity import checkpoint, features, make_hf, rel_err, text_batch  # noqa: F401 (a fixture)


class Tower(nn.Module):
    """A whisper-like Conv1d front end, a CLIP-like Conv2d patch embedding and a linear."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv1d(4, 6, kernel_size=3, stride=2, padding=1)
        self.patch = nn.Conv2d(3, 6, kernel_size=4, stride=4, bias=False)
        self.out = nn.Linear(6, 5)

    def forward(self, sound, image):
        a = self.conv1(sound).mean(-1)
        b = self.patch(image).flatten(2).mean(-1)
        return self.out(torch.tanh(a + b))


def _inputs():
    g = torch.Generator().manual_seed(3)
    return torch.randn(2, 4, 10, generator=g), torch.randn(2, 3, 8, 8, generator=g)


def _pair(targets):
    """Our LoRA and PEFT's on two copies of one tower, with the same (perturbed) A and B."""
    from peft import LoraConfig, get_peft_model
    torch.manual_seed(0)
    base = Tower()
    theirs = get_peft_model(copy.deepcopy(base), LoraConfig(r=2, lora_alpha=6, target_modules=targets))
    ours = vt.add_lora(base, r=2, alpha=6, targets=targets, seed=0)
    g = torch.Generator().manual_seed(1)
    peft_modules = dict(theirs.named_modules())
    with torch.no_grad():
        for name, layer in lora_layers(ours).items():
            for part in ("lora_A", "lora_B"):
                value = torch.randn(getattr(layer, part).weight.shape, generator=g)
                getattr(layer, part).weight.copy_(value)
                getattr(peft_modules[f"base_model.model.{name}"], part)["default"].weight.copy_(value)
    return ours, theirs


def test_conv1d_and_conv2d_outputs_and_gradients_equal_peft():
    ours, theirs = _pair(["conv1", "patch", "out"])
    assert sorted(lora_layers(ours)) == ["conv1", "out", "patch"]
    x = _inputs()
    want, got = theirs(*x), ours(*x)
    assert torch.allclose(want, got, atol=1e-6, rtol=1e-5)
    want.square().sum().backward()
    got.square().sum().backward()
    peft_params = dict(theirs.named_parameters())
    for name, p in ours.named_parameters():
        if p.requires_grad:
            peft_name = "base_model.model." + name.replace(".weight", ".default.weight")
            ref = peft_params[peft_name].grad
            assert ref.abs().max() > 0, name
            assert (p.grad - ref).abs().max() <= 1e-5 * ref.abs().max(), name


def test_merge_and_unmerge_are_exact_and_the_state_dict_is_peft_s():
    ours, theirs = _pair(["conv1", "patch"])
    x = _inputs()
    with torch.no_grad():
        adapted = ours(*x)
        vt.lora.merge_lora(ours)
        assert torch.allclose(ours(*x), adapted, atol=1e-5, rtol=1e-5)
        vt.lora.unmerge_lora(ours)
        assert torch.allclose(ours(*x), adapted, atol=1e-6, rtol=1e-6)
    ours_sd = {k: v for k, v in ours.state_dict().items() if "lora_" in k}
    peft_sd = {k.replace(".default", "").removeprefix("base_model.model."): v
               for k, v in theirs.state_dict().items() if "lora_" in k}
    assert {k: tuple(v.shape) for k, v in ours_sd.items()} == {k: tuple(v.shape) for k, v in peft_sd.items()}
    merged = vt.lora.merge_and_unload(ours)
    assert type(merged.conv1) is nn.Conv1d and type(merged.patch) is nn.Conv2d
    with torch.no_grad():
        assert torch.allclose(merged(*x), adapted, atol=1e-5, rtol=1e-5)


def test_all_linear_leaves_convolutions_alone_and_a_regex_can_pick_one():
    model = vt.add_lora(Tower(), r=2, alpha=4, targets="all-linear")
    assert sorted(lora_layers(model)) == ["out"]
    model = vt.add_lora(Tower(), r=2, alpha=4, targets=r"conv\d")
    assert sorted(lora_layers(model)) == ["conv1"]


def test_a_flattened_patch_embedding_gets_the_convolution_s_update():
    """Qwen2-VL computes its Conv3d patch embedding on flattened patches: the same numbers as the convolution, with
    LoRA too."""
    torch.manual_seed(0)
    holder = nn.Module()
    holder.proj = PatchConv3d(3, 8, kernel_size=(2, 4, 4), stride=(2, 4, 4), bias=False)
    vt.add_lora(holder, r=2, alpha=4, targets=["proj"], seed=0)
    layer = holder.proj
    with torch.no_grad():
        layer.lora_B.weight.normal_()
    patches = torch.randn(5, 3 * 2 * 4 * 4)
    flat = layer(patches)
    full = layer(patches.view(5, 3, 2, 4, 4)).view(5, 8)
    assert torch.allclose(flat, full, atol=1e-5, rtol=1e-5)
    assert (flat - layer.base_layer(patches)).abs().max() > 1e-2


@pytest.mark.parametrize("conv, words", [
    (nn.Conv2d(4, 4, 3, groups=2), "groups 2"),
    (nn.Conv2d(4, 4, 3, dilation=2), r"dilation \(2, 2\)"),
    (nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect"), "'reflect'"),
    (nn.Conv2d(4, 4, 3, padding="same"), "padding 'same'"),
])
def test_convolutions_lora_cannot_describe_are_refused_by_name(conv, words):
    holder = nn.Module()
    holder.stem = conv
    with pytest.raises(ConfigError, match=f"LoRA target stem.*{words}"):
        vt.add_lora(holder, r=2, alpha=4, targets=["stem"])
    assert not lora_layers(holder)


def test_dora_on_a_convolution_is_refused():
    with pytest.raises(ConfigError, match="LoRA target patch is a Conv2d: DoRA is for linear layers only"):
        vt.add_lora(Tower(), r=2, alpha=4, targets=["patch", "out"], dora=True)


def test_lora_on_whisper_s_conv_front_end_trains_and_merges_into_transformers(checkpoint):  # noqa: F811
    """LoRA on Whisper's two encoder Conv1d layers (named targets; a Conv1d with stride and padding is checked
    against PEFT above): it trains, and the merged weights in transformers' model give the
    adapted logits. (PEFT cannot run this on transformers' Whisper: its forward reads `conv1.stride`, which PEFT's
    convolution layer does not pass through.)"""
    path, _ = checkpoint
    from velotune.models.whisper import load_whisper
    ours = vt.add_lora(load_whisper(path, dtype="float32", device="cpu"), r=4, alpha=8,
                       targets=["conv1", "conv2", "q_proj"], seed=0)
    assert {"model.encoder.conv1", "model.encoder.conv2"} <= set(lora_layers(ours))
    with torch.no_grad():
        for layer in lora_layers(ours).values():
            layer.lora_B.weight.normal_(0.0, 0.2)
    x, labels = features(batch=2), text_batch("none")[2][:2]
    out = ours(x, labels=labels, return_logits=True)
    out.loss.backward()
    for name in ("conv1", "conv2"):
        layer = lora_layers(ours)[f"model.encoder.{name}"]
        assert layer.lora_A.weight.grad.abs().max() > 0 and layer.lora_B.weight.grad.abs().max() > 0
    merged = make_hf()
    merged.load_state_dict(merged_state_dict(ours))
    with torch.no_grad():
        assert rel_err(out.logits, merged(input_features=x, labels=labels).logits) <= 1e-5
        assert rel_err(out.logits, make_hf()(input_features=x, labels=labels).logits) > 1e-3
