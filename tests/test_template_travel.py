"""The chat template a model was trained with travels with it: an adapter directory saves it, and chat,
generate and every export use it (over the base's own), unless --chat-template says otherwise."""
from __future__ import annotations

import importlib
import json
import logging

import pytest

import velotune as vt
from export_fixtures import load_with_lora, make_tokenized_checkpoint
from velotune.cli import main
from velotune.data.templates import (ALPACA, BUILTIN_TEMPLATES, CHATML, load_chat_template,
                                     resolve_chat_template, saved_chat_template)
from velotune.errors import CheckpointError, ConfigError

gguf = pytest.importorskip("gguf")

MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(base dir with ChatML, adapter dir saved with the alpaca template it was trained with, tokenizer)."""
    root = tmp_path_factory.mktemp("travel")
    base, tok = make_tokenized_checkpoint(root, "llama")
    assert saved_chat_template(base) == CHATML
    model, tok = load_with_lora(base)
    adapter = vt.save_adapter(model, root / "adapter")
    tok.chat_template = ALPACA
    tok.save_pretrained(str(adapter))
    tok.chat_template = CHATML
    return base, adapter, tok


def _rendered_ids(tok, template):
    text = tok.apply_chat_template(MESSAGES, chat_template=template, add_generation_prompt=True, tokenize=False)
    return tok(text, add_special_tokens=False).input_ids


def _generate_prompt_ids(monkeypatch, args) -> list[int]:
    gen = importlib.import_module("velotune.infer.generation")
    seen, real = [], gen.encode_prompt

    def recording(tokenizer, prompt):
        seen.append(real(tokenizer, prompt))
        return seen[-1]
    monkeypatch.setattr(gen, "encode_prompt", recording)
    assert main(["generate", *args, "--prompt", MESSAGES[0]["content"], "--max-new-tokens", "2",
                 "--device", "cpu", "--dtype", "float32"]) == 0
    return seen[0]


def test_generate_uses_the_adapters_template_and_the_override(trained, monkeypatch, caplog, tmp_path):
    base, adapter, tok = trained
    with caplog.at_level(logging.INFO, logger="velotune"):
        ids = _generate_prompt_ids(monkeypatch, [str(base), "--adapter", str(adapter)])
    assert ids == _rendered_ids(tok, ALPACA) and "### Instruction:" in tok.decode(ids)
    assert f"chat template: alpaca, saved with the adapter in {adapter}" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="velotune"):
        ids = _generate_prompt_ids(monkeypatch, [str(base), "--adapter", str(adapter), "--chat-template", "chatml"])
    assert ids == _rendered_ids(tok, CHATML) and "chat template: chatml, as asked" in caplog.text
    assert _generate_prompt_ids(monkeypatch, [str(base)]) == _rendered_ids(tok, CHATML)  # the base's own
    custom = tmp_path / "mine.jinja"
    custom.write_text("{% for m in messages %}Q: {{ m['content'] }}\n{% endfor %}A:", encoding="utf-8")
    ids = _generate_prompt_ids(monkeypatch, [str(base), "--chat-template", str(custom)])
    assert tok.decode(ids) == "Q: What is the capital of France?\nA:"


def test_chat_uses_the_adapters_template(trained, monkeypatch):
    import argparse
    import io

    from velotune.infer.chat_cli import run_chat
    gen = importlib.import_module("velotune.infer.generation")
    base, adapter, tok = trained
    seen, real = [], gen.encode_prompt
    monkeypatch.setattr(gen, "encode_prompt", lambda t, p: seen.append(real(t, p)) or seen[-1])
    ns = argparse.Namespace(model=str(base), adapter=str(adapter), dtype="float32", quantize=None, device="cpu",
                            chat_template=None, system=None, temperature=0.0, top_k=None, top_p=None, min_p=None,
                            repetition_penalty=None, seed=None, max_new_tokens=2)
    lines = iter([MESSAGES[0]["content"], "/quit"])
    run_chat(ns, input_fn=lambda prompt: next(lines), out=io.StringIO())
    assert seen == [_rendered_ids(tok, ALPACA)]


def test_merged_and_adapter_exports_carry_the_trained_template(trained, tmp_path):
    base, adapter, _ = trained
    assert main(["export", str(base), "--adapter", str(adapter), "--format", "merged", "--out",
                 str(tmp_path / "merged")]) == 0
    assert saved_chat_template(tmp_path / "merged") == ALPACA
    assert vt.load(tmp_path / "merged", device="cpu")[1].chat_template == ALPACA
    assert main(["export", str(base), "--adapter", str(adapter), "--format", "adapter", "--out",
                 str(tmp_path / "adapter")]) == 0
    assert saved_chat_template(tmp_path / "adapter") == ALPACA
    assert main(["export", str(base), "--adapter", str(adapter), "--format", "merged", "--chat-template", "chatml",
                 "--out", str(tmp_path / "chatml")]) == 0
    assert saved_chat_template(tmp_path / "chatml") == CHATML


def test_gguf_export_carries_the_trained_template_and_an_alpaca_modelfile(trained, tmp_path):
    from velotune.exporting.modelfile import alpaca_go_template
    base, adapter, tok = trained
    out = tmp_path / "g"
    assert main(["export", str(base), "--adapter", str(adapter), "--format", "gguf", "--quant", "f16",
                 "--out", str(out)]) == 0
    reader = gguf.GGUFReader(str(out / "model.gguf"))
    assert reader.fields["tokenizer.chat_template"].contents() == ALPACA
    text = (out / "Modelfile").read_text()
    assert "# chat format: alpaca" in text
    assert f'TEMPLATE """{alpaca_go_template(tok.eos_token)}"""' in text and "ChatML" not in text


def test_export_refuses_an_unknown_template_before_loading(trained, tmp_path, capsys):
    base, adapter, _ = trained
    assert main(["export", str(base), "--format", "merged", "--chat-template", "vicuna",
                 "--out", str(tmp_path / "x")]) == 2
    assert "--chat-template: unknown chat template 'vicuna'; built-in templates: llama-3, chatml" in \
        capsys.readouterr().err
    assert not (tmp_path / "x").exists()


# ---- the alpaca Ollama template renders what the Jinja template renders ---------------------------------------

# Each Go action of alpaca_go_template, spelled in Jinja (same whitespace control): a small translation that
# holds for this one template, so the test can render it with jinja2 and compare with the trained prompt.
GO_TO_JINJA = [('{{- if and .Messages (eq (index .Messages 0).Role "system") }}',
                "{%- if messages and messages[0]['role'] == 'system' %}"),
               ("{{ (index .Messages 0).Content }}", "{{ messages[0]['content'] }}"),
               ("{{- range .Messages }}", "{%- for m in messages %}"),
               ('{{- if eq .Role "user" }}', "{%- if m['role'] == 'user' %}"),
               ('{{ else if eq .Role "assistant" }}', "{% elif m['role'] == 'assistant' %}"),
               ("{{ .Content }}", "{{ m['content'] }}"), ("{{ else }}", "{% else %}"),
               ("{{- end }}", "{%- endfor %}"), ("{{ end }}", "{% endif %}")]


def _render_go(go_template: str, messages) -> str:
    import jinja2
    text = go_template
    for go, jinja in GO_TO_JINJA:
        text = text.replace(go, jinja)
    assert "{{ ." not in text and "{{- ." not in text  # every Go action was translated
    return jinja2.Environment(keep_trailing_newline=True).from_string(text).render(messages=messages)


@pytest.mark.parametrize("messages", [
    MESSAGES,
    [{"role": "system", "content": "Answer in French."}] + MESSAGES,
    MESSAGES + [{"role": "assistant", "content": "Paris."}, {"role": "user", "content": "And Germany?"}],
])
def test_alpaca_go_template_renders_the_trained_prompt(messages):
    from transformers import PreTrainedTokenizerFast  # noqa: F401  (the Jinja side renders as training did)

    from tiny_tokenizer import make_tokenizer
    from velotune.exporting.modelfile import alpaca_go_template
    tok = make_tokenizer()
    trained = tok.apply_chat_template(messages, chat_template=ALPACA, add_generation_prompt=True, tokenize=False)
    assert trained.startswith(tok.bos_token)  # llama.cpp adds BOS itself: the Go template leaves it out
    assert _render_go(alpaca_go_template(tok.eos_token), messages) == trained[len(tok.bos_token):]


# ---- the template functions -----------------------------------------------------------------------------------

def test_saved_chat_template_reads_every_place_a_template_is_kept(tmp_path):
    d = tmp_path / "d"
    d.mkdir()
    assert saved_chat_template(d) is None and saved_chat_template(tmp_path / "missing") is None
    (d / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{{ 'x' }}"}))
    assert saved_chat_template(d) == "{{ 'x' }}"
    (d / "tokenizer_config.json").write_text(json.dumps(
        {"chat_template": [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}]}))
    assert saved_chat_template(d) == "D"
    (d / "tokenizer_config.json").write_text(json.dumps({"chat_template": {"tool_use": "T", "rag": "R"}}))
    assert saved_chat_template(d) == "T"
    (d / "chat_template.jinja").write_text("{{ 'jinja file' }}")
    assert saved_chat_template(d) == "{{ 'jinja file' }}"
    (d / "chat_template.jinja").unlink()
    (d / "tokenizer_config.json").write_text('{"chat_template": ')
    with pytest.raises(CheckpointError, match=r"tokenizer_config.json: invalid JSON at line 1"):
        saved_chat_template(d)


def test_load_chat_template_names_files_text_and_errors(tmp_path, caplog):
    from tiny_tokenizer import make_tokenizer
    assert load_chat_template("alpaca") == ALPACA and load_chat_template("Qwen2.5") == BUILTIN_TEMPLATES["qwen-2.5"]
    file = tmp_path / "t.jinja"
    file.write_text("{{ messages[0]['content'] }}", encoding="utf-8")
    assert load_chat_template(str(file)) == "{{ messages[0]['content'] }}"
    assert load_chat_template("{% for m in messages %}{% endfor %}") == "{% for m in messages %}{% endfor %}"
    with pytest.raises(ConfigError, match=r"chat template: unknown chat template 'vicuna'; built-in templates: "
                                          r"llama-3, chatml, mistral, gemma, phi-3, qwen-2\.5, alpaca"):
        load_chat_template("vicuna")
    with pytest.raises(ConfigError, match=r"missing\.jinja: no such chat template file"):
        load_chat_template(str(tmp_path / "missing.jinja"))
    (tmp_path / "plain.txt").write_text("hello")
    with pytest.raises(ConfigError, match=r"plain\.txt: holds no Jinja template"):
        load_chat_template(str(tmp_path / "plain.txt"))
    with caplog.at_level(logging.WARNING, logger="velotune"):
        load_chat_template("chatml", make_tokenizer(chat_tokens=False))
    assert "closes turns with <|im_end|>, which is not a single token" in caplog.text
    tok = make_tokenizer()
    assert resolve_chat_template(str(file), tok) == load_chat_template(str(file), tok)
