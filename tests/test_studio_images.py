"""Images in the Studio's chat: an uploaded picture goes to a vision-language model with the user's message (as
OpenAI image_url parts, through the same server `velotune serve` runs) and the answer is what vt.generate gives;
a text-only model refuses it by name; a file that is not an image is refused at upload."""
import json
import shutil

import pytest

import velotune as vt
from studio_fixtures import STUDIO_HEADERS, make_client, make_world
from vision_fixtures import QUESTION, digit_pngs

pytest.importorskip("fastapi")


@pytest.fixture()
def world(tmp_path, tiny_llava):
    world = make_world(tmp_path)
    shutil.copytree(tiny_llava, world["models"] / "vlm")
    return world


def _stream_text(text: str) -> str:
    pieces = []
    for line in text.splitlines():
        if line.startswith("data: ") and line != "data: [DONE]":
            for choice in json.loads(line[6:]).get("choices", []):
                pieces.append(choice["delta"].get("content") or "")
    return "".join(pieces)


def test_an_uploaded_image_reaches_a_vision_model_and_a_text_model_refuses_it(world, tmp_path):
    [(png, _)] = digit_pngs(tmp_path / "img", 1)
    client, _ = make_client(world)
    with client:
        up = client.post("/api/uploads", params={"name": "digit.png"}, content=png.read_bytes(),
                         headers={**STUDIO_HEADERS, "Content-Type": "application/octet-stream"})
        assert up.status_code == 200 and up.json()["kind"] == "image"
        body = {"model": "models:vlm", "messages": [{"role": "user", "content": QUESTION}],
                "attachments": [up.json()["id"]], "settings": {"max_new_tokens": 4, "temperature": 0}}
        prompt = client.post("/api/chat/prompt", json=body, headers=STUDIO_HEADERS).json()
        assert prompt["prompt"].count("<image>") == 4 and prompt["files"][0]["kind"] == "image"
        answer = client.post("/api/chat", json=body, headers=STUDIO_HEADERS)
        assert answer.status_code == 200
        model, tokenizer = vt.load(str(world["models"] / "vlm"), dtype="float32")
        expected = vt.generate(model, tokenizer, [{"role": "user", "content": [
            {"type": "image", "image": str(png)}, {"type": "text", "text": QUESTION}]}], max_new_tokens=4,
            temperature=0.0)
        assert _stream_text(answer.text) == expected
        refused = client.post("/api/chat", json={**body, "model": "models:tiny"}, headers=STUDIO_HEADERS)
        assert refused.status_code == 400 and "digit.png" in refused.json()["error"]["message"] \
            and "vision-language model" in refused.json()["error"]["message"]
        fake = client.post("/api/uploads", params={"name": "fake.png"}, content=b"\x89PNG not really",
                           headers={**STUDIO_HEADERS, "Content-Type": "application/octet-stream"})
        assert fake.status_code == 422 and "fake.png" in fake.json()["error"]["message"]
