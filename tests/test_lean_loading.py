"""Lean loading. A checkpoint's tokenizer: the plain tokenizer.json class (Llama 3's declaration) loads without
AutoTokenizer's class resolution and gives exactly what AutoTokenizer gives; every other declaration goes through
AutoTokenizer. The model: built with parameters on the meta device, without importing torch._dynamo."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from hf_reference import make_checkpoint
from tiny_tokenizer import CHAT_TOKENS, DEFAULT_TEXTS, make_tokenizer
from velotune.models import tokenizer as tokenizer_module
from velotune.models.tokenizer import load_tokenizer

TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
            "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def _checkpoint(tmp_path, model_type="llama", tokenizer_class=None):
    path, _ = make_checkpoint(tmp_path, model_type)
    make_tokenizer(chat_template=TEMPLATE).save_pretrained(str(path))
    if tokenizer_class is not None:
        cfg_path = path / "tokenizer_config.json"
        cfg = json.loads(cfg_path.read_text())
        cfg["tokenizer_class"] = tokenizer_class
        cfg_path.write_text(json.dumps(cfg))
    return path


def _calls_to_auto(monkeypatch):
    from transformers import AutoTokenizer
    calls, original = [], AutoTokenizer.from_pretrained.__func__

    def spy(cls, *args, **kwargs):
        calls.append(args[0])
        return original(cls, *args, **kwargs)
    monkeypatch.setattr(AutoTokenizer, "from_pretrained", classmethod(spy))
    return calls


@pytest.mark.parametrize("model_type, declared", [
    ("llama", "PreTrainedTokenizerFast"), ("llama", "TokenizersBackend"),
    # transformers lists llava among the types whose hub declaration it overrides, with the plain class itself
    ("llava", "TokenizersBackend"),
])
def test_plain_declaration_skips_autotokenizer_and_equals_it(tmp_path, monkeypatch, model_type, declared):
    from transformers import AutoTokenizer
    path = _checkpoint(tmp_path, tokenizer_class=declared)
    if model_type != "llama":
        config = json.loads((path / "config.json").read_text())
        (path / "config.json").write_text(json.dumps({**config, "model_type": model_type}))
    calls = _calls_to_auto(monkeypatch)
    ours = load_tokenizer(path)
    assert calls == []
    auto = AutoTokenizer.from_pretrained(str(path))
    assert type(ours) is type(auto)
    texts = DEFAULT_TEXTS + ["".join(CHAT_TOKENS) + " mixed <|eos|> text", "  spaces\n\nand newlines "]
    for text in texts:
        assert ours(text)["input_ids"] == auto(text)["input_ids"]
        assert ours.decode(ours(text)["input_ids"]) == auto.decode(auto(text)["input_ids"])
    for attr in ("bos_token_id", "eos_token_id", "pad_token_id", "chat_template", "all_special_tokens"):
        assert getattr(ours, attr) == getattr(auto, attr), attr
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    assert ours.apply_chat_template(messages, tokenize=False) == auto.apply_chat_template(messages, tokenize=False)
    assert len(ours) == len(auto) and ours.get_vocab() == auto.get_vocab()


@pytest.mark.parametrize("model_type, declared", [
    ("qwen2", "PreTrainedTokenizerFast"),   # transformers maps qwen2 to its own class whatever the declaration
    ("llama", "LlamaTokenizer"),            # a specific class: AutoTokenizer's own rules decide
])
def test_other_declarations_go_through_autotokenizer(tmp_path, monkeypatch, model_type, declared):
    path = _checkpoint(tmp_path, model_type, tokenizer_class=declared)
    calls = _calls_to_auto(monkeypatch)
    assert load_tokenizer(path) is not None
    assert calls == [str(path)]


def test_remote_code_declaration_goes_through_autotokenizer(tmp_path):
    path = _checkpoint(tmp_path, tokenizer_class="PreTrainedTokenizerFast")
    cfg = json.loads((path / "tokenizer_config.json").read_text())
    cfg["auto_map"] = {"AutoTokenizer": [None, "tok.MyTokenizer"]}
    (path / "tokenizer_config.json").write_text(json.dumps(cfg))
    assert tokenizer_module._load_plain_fast_tokenizer(Path(path)) is None


def test_plain_tokenizer_load_leaves_the_modelling_stack_unimported(tmp_path):
    """The point of the plain path: loading it does not import torch._dynamo (~150 MB of RSS on a CPU)."""
    path = _checkpoint(tmp_path, tokenizer_class="PreTrainedTokenizerFast")
    code = ("import sys; from velotune.models.tokenizer import load_tokenizer; "
            f"load_tokenizer({str(path)!r}); print('dynamo' if 'torch._dynamo' in sys.modules else 'lean')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().endswith("lean")


def test_loading_and_running_a_model_leaves_the_modelling_stack_unimported(tmp_path):
    """vt.load builds the model with its parameters on the meta device but without `torch.device("meta")`,
    whose Python decompositions import torch._dynamo; inference needs none of it."""
    path = _checkpoint(tmp_path, tokenizer_class="PreTrainedTokenizerFast")
    code = ("import sys, torch, velotune as vt; m, t = vt.load(%r, device='cpu'); "
            "m(torch.tensor([[1, 2, 3]])); vt.generate(m, t, 'hi', max_new_tokens=3); "
            "print('dynamo' if 'torch._dynamo' in sys.modules else 'lean')" % str(path))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().endswith("lean")


def test_construction_patches_are_undone_even_on_errors():
    import torch
    from torch import nn

    from velotune.models.build import parameters_on_meta, skip_weight_init
    register, normal = nn.Module.register_parameter, nn.init.normal_
    with pytest.raises(RuntimeError, match="boom"):
        with parameters_on_meta(), skip_weight_init():
            layer = nn.Linear(4, 3)
            assert layer.weight.device.type == "meta" and layer.weight.requires_grad
            raise RuntimeError("boom")
    assert nn.Module.register_parameter is register and nn.init.normal_ is normal
    assert nn.Linear(4, 3).weight.device.type == "cpu"
    assert torch.nn.Embedding(5, 2).weight.abs().sum() > 0  # initialisation runs again
