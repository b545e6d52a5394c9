"""`/v1/embeddings` in `velotune serve`: OpenAI's client gets sentence-transformers' embeddings; models and adapters
by name; what one request may cost is bounded."""
import base64
import sys
import threading
import time
from contextlib import contextmanager

import httpx
import numpy as np
import pytest
import torch

import velotune as vt
from server_process import free_port, serving
from velotune.cli import main
from velotune.errors import ConfigError
from embed_fixtures import INPUT_CAP, LONG, MAX_INPUTS, TEXTS, TOO_LONG, close, files, loaded, minilm, st, tuned_reference  # noqa: F401 (fixtures)


# ---- velotune serve --embedding-model (a real process, embedding models only) ------------------------------------
@pytest.fixture(scope="module")
def server(minilm, files):
    port = free_port()
    args = [sys.executable, "-m", "velotune", "serve", "--embedding-model", f"minilm={minilm}",
            "--embedding-adapter", f"tuned={files['tuned']}", "--embedding-model", f"pair={files['pair']}",
            "--max-embedding-inputs", str(MAX_INPUTS), "--max-embedding-input-tokens", str(INPUT_CAP),
            "--dtype", "float32", "--device", "cpu", "--threads", "1", "--port", str(port), "--log-level", "warning"]
    with serving(args, port, wait_s=90) as url:
        yield url


@pytest.fixture(scope="module")
def client(server):
    from openai import OpenAI
    return OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0, timeout=60)


def _post(url, body):
    return httpx.post(f"{url}/v1/embeddings", json=body, timeout=60)


def _error(response, status):
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    return error


def test_models_lists_the_embedding_models(client):
    models = {m.id: m for m in client.models.list().data}
    assert list(models) == ["minilm", "tuned", "pair"]
    assert (models["tuned"].parent, models["pair"].parent) == ("minilm", None)


def test_openai_client_gets_sentence_transformers_embeddings(client, minilm, st, loaded):
    reply = client.embeddings.create(model="minilm", input=TEXTS)    # the client asks for base64 and decodes it
    assert reply.model == "minilm" and [d.index for d in reply.data] == list(range(len(TEXTS)))
    close([d.embedding for d in reply.data], st(minilm, TEXTS))
    tokenizer = loaded[1]
    tokens = sum(len(ids) for ids in tokenizer(TEXTS)["input_ids"])
    assert reply.usage.prompt_tokens == reply.usage.total_tokens == tokens
    one = client.embeddings.create(model="minilm", input=TEXTS[1], encoding_format="float")
    assert len(one.data) == 1
    close([one.data[0].embedding], st(minilm, TEXTS[1:2]))


def test_float_base64_and_token_ids_agree(server, loaded):
    tokenizer = loaded[1]
    floats = _post(server, {"model": "minilm", "input": TEXTS[:3], "encoding_format": "float"}).json()
    packed = _post(server, {"model": "minilm", "input": TEXTS[:3], "encoding_format": "base64"}).json()
    decoded = [np.frombuffer(base64.b64decode(d["embedding"]), dtype="<f4") for d in packed["data"]]
    assert np.array_equal(np.stack(decoded), np.asarray([d["embedding"] for d in floats["data"]], dtype=np.float32))
    ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in TEXTS[:3]]
    by_ids = _post(server, {"model": "minilm", "input": ids, "encoding_format": "float"}).json()
    close([d["embedding"] for d in by_ids["data"]], [d["embedding"] for d in floats["data"]])
    one = _post(server, {"model": "minilm", "input": ids[0], "encoding_format": "float"}).json()
    assert len(one["data"]) == 1
    close([one["data"][0]["embedding"]], [floats["data"][0]["embedding"]])


def test_dimensions_truncate_and_renormalise(server, client, minilm, st):
    reply = client.embeddings.create(model="minilm", input=TEXTS, dimensions=64)
    vectors = torch.tensor([d.embedding for d in reply.data])
    assert vectors.shape == (len(TEXTS), 64)
    assert torch.allclose(vectors.norm(dim=-1), torch.ones(len(TEXTS)), atol=1e-5)
    close(vectors, torch.nn.functional.normalize(st(minilm, TEXTS)[:, :64], dim=-1))
    error = _error(_post(server, {"model": "minilm", "input": "x", "dimensions": 385}), 400)
    assert error["param"] == "dimensions" and "384" in error["message"]


def test_models_and_adapters_are_chosen_by_name(client, minilm, files, st, tuned_reference):
    tuned = torch.tensor([d.embedding for d in client.embeddings.create(model="tuned", input=TEXTS).data])
    close(tuned, tuned_reference)
    base = torch.tensor([d.embedding for d in client.embeddings.create(model="minilm", input=TEXTS).data])
    close(base, st(minilm, TEXTS))                        # the adapter is switched off again
    assert torch.nn.functional.cosine_similarity(base, tuned).min() < 0.999
    pair = client.embeddings.create(model="pair", input=TEXTS)
    assert len(pair.data[0].embedding) == 768
    close([d.embedding for d in pair.data], st(files["pair"], TEXTS))
    query = client.embeddings.create(model="pair", input=TEXTS, extra_body={"prompt_name": "query"})
    close([d.embedding for d in query.data], st(files["pair"], TEXTS, prompt_name="query"))


def test_long_inputs_are_truncated_up_to_the_cap(server, minilm, st):
    response = _post(server, {"model": "minilm", "input": [TEXTS[0], LONG], "encoding_format": "float"})
    assert response.status_code == 200 and response.headers["x-velotune-truncated-inputs"] == "1"
    body = response.json()
    close([d["embedding"] for d in body["data"]], st(minilm, [TEXTS[0], LONG]))
    assert body["usage"]["prompt_tokens"] == 9 + 256      # the truncated text counts the tokens embedded
    error = _error(_post(server, {"model": "minilm", "input": [TEXTS[0], TOO_LONG]}), 400)
    assert (error["param"], error["code"]) == ("input.1", "context_length_exceeded")
    assert f"at most {INPUT_CAP} tokens" in error["message"]


def test_bad_requests_get_openai_errors(server, client):
    cases = [({"model": "minilm", "input": []}, 400, "input", None),
             ({"model": "minilm", "input": ["fine", ""]}, 400, "input.1", None),
             ({"model": "minilm", "input": ["x"] * (MAX_INPUTS + 1)}, 400, "input", "too_many_inputs"),
             ({"model": "minilm", "input": [[1, 2], [10 ** 6]]}, 400, "input.1", None),
             ({"model": "minilm", "input": "x", "encoding_format": "int8"}, 400, "encoding_format", None),
             ({"model": "minilm", "input": "x", "dimensions": 0}, 400, "dimensions", None),
             ({"model": "minilm", "input": [1, "x"]}, 400, "input", None),
             ({"model": "minilm", "input": "x", "prompt_name": "query"}, 400, "prompt_name", None),
             ({"input": "x"}, 400, "model", None),
             ({"model": "gamma", "input": "x"}, 404, "model", "model_not_found")]
    for body, status, param, code in cases:
        error = _error(_post(server, body), status)
        assert error["param"] == param and (code is None or error["code"] == code), (body, error)
    from openai import BadRequestError, NotFoundError
    with pytest.raises(NotFoundError, match="gamma"):
        client.embeddings.create(model="gamma", input="x")
    with pytest.raises(BadRequestError, match="too_many_inputs|at most 8"):
        client.embeddings.create(model="minilm", input=["x"] * (MAX_INPUTS + 1))
    # no chat model here: chat requests are told where embedding models answer
    chat = httpx.post(f"{server}/v1/chat/completions", timeout=30,
                      json={"model": "minilm", "messages": [{"role": "user", "content": "hi"}]})
    assert _error(chat, 400)["code"] == "model_not_supported" and "/v1/embeddings" in chat.text
    assert _error(httpx.post(f"{server}/v1/completions", json={"model": "gamma", "prompt": "x"}, timeout=30),
                  404)["code"] == "model_not_found"
    assert client.embeddings.create(model="minilm", input="still serving").data[0].index == 0


# ---- in-process: a chat model beside embedding models; the worker off the event loop ------------------------------

@pytest.fixture(scope="module")
def chat_files(tmp_path_factory):
    from hf_reference import make_checkpoint
    from tiny_tokenizer import make_tokenizer
    from velotune.data.templates import CHATML
    root = tmp_path_factory.mktemp("chat")
    tok = make_tokenizer(chat_template=CHATML)
    base, _ = make_checkpoint(root, "llama", vocab_size=len(tok), max_position_embeddings=128)
    tok.save_pretrained(str(base))
    return base


def _service(loaded, **limits):
    from velotune.infer.server_embeddings import EmbeddingLimits, EmbeddingService
    service = EmbeddingService(EmbeddingLimits(**limits))
    service.add_model("minilm", *loaded)
    return service


@contextmanager
def _running(server):
    """The app over `server` served by uvicorn in a thread on a free port; yields (url, port)."""
    import uvicorn
    from velotune.infer.server import create_app
    from velotune.infer.server_guards import allowed_hosts
    port = free_port()
    config = uvicorn.Config(create_app(server, allowed_hosts("127.0.0.1", port)), host="127.0.0.1", port=port,
                            log_config=None, log_level="warning")
    uv = uvicorn.Server(config)
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not uv.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}", port
    finally:
        uv.should_exit = True
        thread.join(10)


def test_chat_and_embedding_models_on_one_server(loaded, chat_files, minilm, st):
    from velotune.infer.server import build_server
    model, tok = vt.load(chat_files, dtype="float32", device="cpu")
    clashing = _service(loaded)
    with pytest.raises(ConfigError, match="'minilm' is both a chat and an embedding model's"):
        build_server(model, tok, "minilm", embeddings=clashing)
    clashing.close()
    server = build_server(model.eval(), tok, "tiny-chat", embeddings=_service(loaded))
    with _running(server) as (url, _):
        assert [m["id"] for m in httpx.get(f"{url}/v1/models").json()["data"]] == ["tiny-chat", "minilm"]
        reply = _post(url, {"model": "minilm", "input": TEXTS[:2], "encoding_format": "float"}).json()
        close([d["embedding"] for d in reply["data"]], st(minilm, TEXTS[:2]))
        error = _error(_post(url, {"model": "tiny-chat", "input": "x"}), 400)
        assert error["code"] == "model_not_supported" and "chat model" in error["message"]
        chat = httpx.post(f"{url}/v1/chat/completions", timeout=30, json={
            "model": "tiny-chat", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
        assert chat.status_code == 200 and chat.json()["usage"]["completion_tokens"] <= 2
        health = httpx.get(f"{url}/health").json()
        assert (health["model_count"], health["embedding_requests"]) == (2, 1)


def test_health_answers_during_an_encode_and_a_departed_client_stops_it(loaded, monkeypatch):
    from velotune.infer.server import build_server
    service = _service(loaded)
    encoder = service.routes["minilm"][0].encoder
    started, release, real_encode = threading.Event(), threading.Event(), encoder.encode

    def slow_encode(tokenizer, texts, progress=None, **options):
        started.set()
        release.wait(30)
        progress(1, len(texts))           # a client that left is noticed here, between batches
        return real_encode(tokenizer, texts, progress=progress, **options)
    monkeypatch.setattr(encoder, "encode", slow_encode)
    with _running(build_server(None, None, None, embeddings=service)) as (url, _):
        with pytest.raises(httpx.ReadTimeout):
            _post_with_timeout(url, 0.5)
        assert started.wait(10)
        t0 = time.monotonic()
        assert httpx.get(f"{url}/health", timeout=5).json()["embedding_requests"] == 0
        assert time.monotonic() - t0 < 1.0            # the event loop is free while the worker encodes
        time.sleep(4 * 0.25)                           # the server polls for the departed client
        release.set()
        service.worker.submit(lambda: None).result(10)   # the worker is done with the request
        assert service.stats["embedding_requests"] == 0  # stopped: never finished
        monkeypatch.setattr(encoder, "encode", real_encode)
        assert _post(url, {"model": "minilm", "input": "back"}).status_code == 200
        assert service.stats["embedding_requests"] == 1


def _post_with_timeout(url, seconds):
    return httpx.post(f"{url}/v1/embeddings", json={"model": "minilm", "input": TEXTS}, timeout=seconds)


# ---- the command line's embedding options -------------------------------------------------------------------------

def test_embedding_options_pair_adapters_with_the_model_before_them():
    from velotune.infer.server_embeddings import parse_embedding_options
    items = [("model", "a=/m/a"), ("adapter", "x=/ad/x"), ("adapter", "/ad/y"), ("model", "org/b"),
             ("adapter", "z=/ad/z")]
    assert parse_embedding_options(items) == [("a", "/m/a", {"x": "/ad/x", "y": "/ad/y"}),
                                              ("org/b", "org/b", {"z": "/ad/z"})]
    with pytest.raises(ConfigError, match="give it after the --embedding-model"):
        parse_embedding_options([("adapter", "x=/ad/x"), ("model", "a=/m/a")])
    with pytest.raises(ConfigError, match="expected NAME=PATH"):
        parse_embedding_options([("model", "=/m/a")])
    with pytest.raises(ConfigError, match="'a' is given twice"):
        parse_embedding_options([("model", "a=/m/a"), ("adapter", "a=/ad/x")])
    with pytest.raises(ConfigError, match="'chat' is given twice"):
        parse_embedding_options([("model", "chat=/m/a")], taken=["chat"])


@pytest.mark.parametrize("args, message", [
    ([], "nothing to serve: give a chat MODEL, --embedding-model PATH or --speech-model PATH"),
    (["--adapter", "a=/x", "--embedding-model", "/m"], "--adapter applies to the chat MODEL"),
    (["--embedding-adapter", "a=/x", "--embedding-model", "/m"], "--embedding-adapter 'a=/x': give it after"),
    (["/chat", "--name", "same", "--embedding-model", "same=/m"], "--embedding-model 'same=/m': the served model "
                                                                  "name 'same' is given twice"),
])
def test_serve_refuses_bad_embedding_options_before_loading(capsys, args, message):
    assert main(["serve", *args]) == 2
    assert capsys.readouterr().err.strip().startswith(f"velotune: error: {message}")
