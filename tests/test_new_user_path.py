"""The path a new user walks, end to end, through the command line: their own Qwen2 checkpoint (ChatML template),
trained on an alpaca file with data.chat_template=alpaca; then chat, generate, serve, export merged and export
GGUF, each rendering prompts with the template the run trained with, not the base's."""
import importlib
import io
import json
import sys

import pytest

from export_fixtures import make_tokenized_checkpoint
from server_process import free_port, serving
from train_fixtures import FACTS
from velotune.cli import main
from velotune.data.templates import ALPACA, CHATML, saved_chat_template

gguf = pytest.importorskip("gguf")
QUESTION = FACTS[1][0]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """(base dir, adapter dir, tokenizer): `velotune train` of the README's example config, as a user runs it."""
    root = tmp_path_factory.mktemp("newuser")
    base, tok = make_tokenized_checkpoint(root, "qwen2")
    assert saved_chat_template(base) == CHATML
    data = root / "alpaca.json"
    data.write_text(json.dumps([{"instruction": q, "input": "", "output": a} for q, a in FACTS] * 3))
    assert main(["train", "examples/lora.yaml", f"model.path={base}", f"data.path={data}",
                 "data.chat_template=alpaca", f"train.output_dir={root / 'run'}", "train.max_steps=2",
                 "train.progress=false", "model.dtype=float32", "model.device=cpu"]) == 0
    adapter = root / "run" / "adapter"
    assert saved_chat_template(adapter) == ALPACA
    return base, adapter, tok


def rendered(tok, template) -> list[int]:
    text = tok.apply_chat_template([{"role": "user", "content": QUESTION}], chat_template=template,
                                   add_generation_prompt=True, tokenize=False)
    return tok(text, add_special_tokens=False).input_ids


def recorded_prompts(monkeypatch) -> list:
    gen = importlib.import_module("velotune.infer.generation")
    seen, real = [], gen.encode_prompt
    monkeypatch.setattr(gen, "encode_prompt", lambda *a, **k: seen.append(real(*a, **k)) or seen[-1])
    return seen


def test_generate_and_chat_use_the_trained_template(run, monkeypatch):
    base, adapter, tok = run
    seen = recorded_prompts(monkeypatch)
    assert main(["generate", str(base), "--adapter", str(adapter), "--prompt", QUESTION, "--max-new-tokens", "2",
                 "--dtype", "float32", "--device", "cpu"]) == 0
    monkeypatch.setattr(sys, "stdin", io.StringIO(f"{QUESTION}\n/quit\n"))
    assert main(["chat", str(base), "--adapter", str(adapter), "--max-new-tokens", "2", "--dtype", "float32",
                 "--device", "cpu"]) == 0
    assert seen[0] == seen[1] == rendered(tok, ALPACA)
    assert "### Instruction:" in tok.decode(seen[0])


def test_serve_answers_with_the_trained_template(run):
    """A real server process: the prompt token count it reports is the alpaca rendering's, not ChatML's."""
    import httpx
    base, adapter, tok = run
    port = free_port()
    args = [sys.executable, "-m", "velotune", "serve", str(base), "--adapter", f"mine={adapter}", "--port", str(port),
            "--dtype", "float32", "--device", "cpu", "--threads", "1"]
    with serving(args, port) as url:
        body = {"model": "mine", "messages": [{"role": "user", "content": QUESTION}], "max_tokens": 2}
        reply = httpx.post(url + "/v1/chat/completions", json=body, timeout=60)
    assert reply.status_code == 200, reply.text
    assert reply.json()["usage"]["prompt_tokens"] == len(rendered(tok, ALPACA)) != len(rendered(tok, CHATML))


def test_exports_carry_the_trained_template(run, tmp_path):
    base, adapter, tok = run
    merged, gguf_file = tmp_path / "merged", tmp_path / "mine.gguf"
    assert main(["export", str(base), "--adapter", str(adapter), "--format", "merged", "--out", str(merged)]) == 0
    assert saved_chat_template(merged) == ALPACA
    assert main(["export", str(base), "--adapter", str(adapter), "--format", "gguf", "--quant", "f16",
                 "--out", str(gguf_file)]) == 0
    reader = gguf.GGUFReader(str(gguf_file))
    field = reader.fields["tokenizer.chat_template"]
    assert bytes(field.parts[field.data[0]]).decode() == ALPACA
    modelfile = (tmp_path / "mine.Modelfile").read_text()
    assert "### Instruction:" in modelfile and "<|im_start|>" not in modelfile
