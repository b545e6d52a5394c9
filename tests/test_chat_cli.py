"""`velotune chat` and `velotune generate` driven as a user would: history, commands, streamed replies."""
import argparse
import io
import json

import pytest

import velotune as vt
from train_fixtures import make_model_dir
from velotune.cli import main
from velotune.infer.chat_cli import run_chat


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from velotune.data.templates import BUILTIN_TEMPLATES
    path = make_model_dir(tmp_path_factory.mktemp("chat"))
    tok_cfg = path / "tokenizer_config.json"
    cfg = json.loads(tok_cfg.read_text())
    cfg["chat_template"] = BUILTIN_TEMPLATES["chatml"]
    tok_cfg.write_text(json.dumps(cfg))
    return path


def _ns(model_dir, **kw):
    base = dict(model=str(model_dir), adapter=None, dtype="float32", quantize=None, device="cpu", system=None,
                chat_template=None,
                temperature=0.0, top_k=None, top_p=None, min_p=None, repetition_penalty=None, seed=None,
                max_new_tokens=6)
    return argparse.Namespace(**{**base, **kw})


def test_chat_session_commands_and_streamed_replies(model_dir):
    lines = iter(["Who rules Vell?", "/params", "/system Be brief.", "/reset", "What is Vell?", "/quit"])
    out = io.StringIO()
    run_chat(_ns(model_dir), input_fn=lambda prompt: next(lines), out=out)
    text = out.getvalue()
    assert text.count("tokens/s]") == 2
    assert "temperature" in text and "(request)" in text
    assert "(system prompt set; history cleared)" in text and "(history cleared)" in text
    model, tok = vt.load(model_dir, dtype="float32", device="cpu")
    expected = vt.generate(model, tok, [{"role": "user", "content": "Who rules Vell?"}], max_new_tokens=6)
    assert expected and expected in text


def test_generate_command_prints_the_greedy_reply(model_dir, capsys):
    code = main(["generate", str(model_dir), "--prompt", "Who rules Vell?", "--max-new-tokens", "5",
                 "--temperature", "0", "--device", "cpu", "--dtype", "float32"])
    assert code == 0
    model, tok = vt.load(model_dir, dtype="float32", device="cpu")
    expected = vt.generate(model, tok, [{"role": "user", "content": "Who rules Vell?"}], max_new_tokens=5)
    assert capsys.readouterr().out.strip() == expected.strip()


def test_generate_without_prompt_is_a_clear_error(model_dir, capsys):
    assert main(["generate", str(model_dir), "--device", "cpu"]) == 2
    assert "give --prompt TEXT or --messages FILE.json" in capsys.readouterr().err


def test_help_and_unknown_commands_are_not_sent_to_the_model(model_dir, monkeypatch):
    import importlib
    gen = importlib.import_module("velotune.infer.generation")
    sent, real = [], gen.encode_prompt
    monkeypatch.setattr(gen, "encode_prompt", lambda tok, prompt: sent.append(prompt) or real(tok, prompt))
    lines = iter(["/help", "/hepl", "/system", "//etc/hosts is a file", "/systematic", "/quit"])
    out = io.StringIO()
    run_chat(_ns(model_dir), input_fn=lambda prompt: next(lines), out=out)
    text = out.getvalue()
    assert text.count("/reset") == 2 and "//text sends /text" in text  # the banner and /help
    assert "unknown command /hepl; /help lists them" in text
    assert "unknown command /systematic; /help lists them" in text
    assert "(system prompt cleared; history cleared)" in text
    assert [m[-1]["content"] for m in sent] == ["/etc/hosts is a file"]
