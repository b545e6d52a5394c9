"""Images through the command line and the server: `velotune generate --image`, `velotune chat --image` and /image,
and `velotune serve` answering the official openai client's image_url parts (data URIs) as vt.generate does, with
remote URLs, server-side paths and too many images refused."""
import base64
import io
import subprocess
import sys
from types import SimpleNamespace

import httpx
import pytest

import velotune as vt
from server_process import free_port, serving
from velotune.errors import VelotuneError
from vision_fixtures import QUESTION, digit_pngs


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return [path for path, _ in digit_pngs(tmp_path_factory.mktemp("img"), 2)]


def _uri(path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def _reference(model_dir, image) -> str:
    model, tokenizer = vt.load(str(model_dir), dtype="float32")
    return vt.generate(model, tokenizer, [{"role": "user", "content": [{"type": "image", "image": str(image)},
                                                                       {"type": "text", "text": QUESTION}]}],
                       max_new_tokens=5)


def test_generate_and_chat_take_images(tiny_llava, images, capsys):
    from velotune.infer.chat_cli import run_chat, run_generate
    common = dict(model=str(tiny_llava), adapter=None, dtype="float32", quantize=None, device="cpu",
                  chat_template=None, temperature=0.0, top_k=None, top_p=None, min_p=None,
                  repetition_penalty=None, seed=None, max_new_tokens=5)
    run_generate(SimpleNamespace(**common, prompt=QUESTION, messages=None, raw=False, image=[str(images[0])]))
    assert capsys.readouterr().out.rstrip("\n") == _reference(tiny_llava, images[0])
    lines = iter([f"/image {images[1]}", QUESTION, "/quit"])
    out = io.StringIO()
    run_chat(SimpleNamespace(**common, system=None, image=[]), input_fn=lambda _: next(lines), out=out)
    text = out.getvalue()
    assert "image attached" in text and _reference(tiny_llava, images[1]) in text
    with pytest.raises(VelotuneError, match="no such file"):
        run_generate(SimpleNamespace(**common, prompt="x", messages=None, raw=False, image=["missing.png"]))


def test_serve_answers_image_url_parts_and_bounds_them(tiny_llava, images):
    from openai import BadRequestError, OpenAI
    port = free_port()
    args = [sys.executable, "-m", "velotune", "serve", str(tiny_llava), "--port", str(port), "--dtype", "float32",
            "--device", "cpu"]
    with serving(args, port) as url:
        client = OpenAI(base_url=url + "/v1", api_key="none")

        def ask(*parts):
            return client.chat.completions.create(
                model=client.models.list().data[0].id, max_tokens=5, temperature=0,
                messages=[{"role": "user", "content": list(parts)}])
        reply = ask({"type": "image_url", "image_url": {"url": _uri(images[0])}}, {"type": "text", "text": QUESTION})
        assert reply.choices[0].message.content == _reference(tiny_llava, images[0])
        for part, message in [
            ({"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}, "data: URI"),
            ({"type": "image_url", "image_url": {"url": str(images[0])}}, "data: URI"),
            ({"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}, "messages"),
        ]:
            with pytest.raises(BadRequestError, match=message):
                ask(part, {"type": "text", "text": QUESTION})
        with pytest.raises(BadRequestError, match="at most 8 images"):
            ask(*[{"type": "image_url", "image_url": {"url": _uri(images[0])}}] * 9)
        assert httpx.get(url + "/health").status_code == 200   # still serving after the refusals


def test_the_cli_refuses_image_with_raw(tiny_llava, images):
    done = subprocess.run([sys.executable, "-m", "velotune", "generate", str(tiny_llava), "--prompt", "x", "--raw",
                           "--image", str(images[0]), "--device", "cpu"], capture_output=True, text=True)
    assert done.returncode != 0 and "--image needs the chat template" in done.stderr
