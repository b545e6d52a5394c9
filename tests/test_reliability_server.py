"""No request can stall or crash the server (issue 10, server items; issue 11, serve items).

A real uvicorn server runs in a thread over a tiny llama: body limits (413), work kept off the event loop
(/health answers while a large request is prepared), JSON content type (415) and Host checks (403) against
cross-site requests and DNS rebinding, a /health without names or paths, value ranges that used to crash the
worker, non-finite logits failing one request only, bounded max_tokens, checked command-line values, the serve
extra checked before loading, one log line for a client that leaves mid-body, and per-adapter chat templates."""
import asyncio
import json
import logging
import socket
import threading
import time
from contextlib import contextmanager

import httpx
import pytest
import torch

import velotune as vt
from hf_reference import make_checkpoint
from tiny_tokenizer import make_tokenizer
from velotune.data.templates import ALPACA, CHATML
from velotune.infer import generate_batch
from velotune.infer.defaults import resolve_sampling
from velotune.infer.server import build_server, create_app
from velotune.infer.server_guards import allowed_hosts, read_json_body
from velotune.infer.server_schema import APIError, ChatRequest, CompletionRequest, validate

BASE = "tiny-base"
CONTEXT = 256
LIMIT = 64 * 1024          # the body limit of the shared test server
JSON = {"Content-Type": "application/json"}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("reliable")
    tok = make_tokenizer(chat_template=CHATML)
    base, _ = make_checkpoint(root, "llama", vocab_size=len(tok), max_position_embeddings=CONTEXT)
    tok.save_pretrained(str(base))
    model, _ = vt.load(base, dtype="float32", device="cpu")
    vt.add_lora(model, r=2, alpha=4)
    vt.save_adapter(model, root / "alp")
    (root / "alp" / "chat_template.jinja").write_text(ALPACA, encoding="utf-8")   # trained with alpaca
    return {"base": base, "adapter": root / "alp"}


@pytest.fixture(scope="module")
def loaded(files):
    model, tok = vt.load(files["base"], dtype="float32", device="cpu")
    return model.eval(), tok


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def running(server, allow=()):
    """The app over `server` served by uvicorn in a thread on a free port; yields (url, port)."""
    import uvicorn
    port = _free_port()
    hosts = None if server.api_key else allowed_hosts("127.0.0.1", port, allow)
    config = uvicorn.Config(create_app(server, hosts), host="127.0.0.1", port=port, log_config=None,
                            log_level="info")
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


@pytest.fixture(scope="module")
def open_server(loaded):
    """No API key, a 64 KiB body limit, and one extra allowed host name."""
    model, tok = loaded
    with running(build_server(model, tok, BASE, max_body_bytes=LIMIT), allow=["proxy.internal"]) as (url, port):
        yield url, port


def _error(response, status):
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    return error


def _raw_response(sock) -> tuple[str, bytes]:
    """(head, body) of the HTTP response on a raw socket."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(65536)
    head, body = data.split(b"\r\n\r\n", 1)
    length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                  if line.lower().startswith(b"content-length"))
    while len(body) < length:
        body += sock.recv(65536)
    return head.decode(), body


def _completion(**extra):
    return {"model": BASE, "prompt": "Vell", "max_tokens": 2, "temperature": 0, **extra}


# ---- item 4: body limit, and nothing heavy on the event loop -------------------------------------------------

def test_body_over_the_limit_is_refused_from_content_length(open_server):
    """A declared length over the limit is refused before any of the body is read."""
    url, port = open_server
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
                  f"Content-Length: {10 ** 9}\r\n\r\n".encode())
        head, body = _raw_response(s)
    assert head.startswith("HTTP/1.1 413")
    error = json.loads(body)["error"]
    assert error["code"] == "request_too_large" and str(LIMIT) in error["message"]
    assert httpx.post(f"{url}/v1/completions", json=_completion(), timeout=30).status_code == 200


def test_body_without_length_is_counted_while_received():
    """A chunked body is refused as soon as it passes the limit: the rest is never received."""
    from starlette.requests import Request
    received = []

    async def receive():
        received.append(1000)
        return {"type": "http.request", "body": b"x" * 1000, "more_body": True}   # an endless body

    async def read():
        scope = {"type": "http", "method": "POST", "path": "/v1/completions", "query_string": b"",
                 "headers": [(b"content-type", b"application/json")]}
        return await read_json_body(Request(scope, receive), 10_000)

    with pytest.raises(APIError) as info:
        asyncio.run(read())
    assert (info.value.status, info.value.code) == (413, "request_too_large")
    assert sum(received) == 11_000


def test_health_answers_while_a_large_request_is_prepared(loaded, monkeypatch):
    """A body just under the limit that must be tokenized whole (the context is large) takes 0.2-1 s to prepare;
    /health meanwhile answers in < 100 ms (it waited for all of it when the event loop tokenized)."""
    model, tok = loaded
    monkeypatch.setattr(model, "max_seq_length", 150_000)
    limit = 256 * 1024
    body = json.dumps({"model": BASE, "max_tokens": 50_000,
                       "messages": [{"role": "user", "content": "fox " * ((limit - 200) // 4)}]}).encode()
    assert limit - 1000 < len(body) <= limit
    with running(build_server(model, tok, BASE, max_body_bytes=limit)) as (url, _):
        result = {}

        def big():
            start = time.perf_counter()
            result["response"] = httpx.post(f"{url}/v1/chat/completions", content=body, headers=JSON, timeout=120)
            result["seconds"] = time.perf_counter() - start

        latencies = []
        with httpx.Client(timeout=30) as client:
            client.get(f"{url}/health")   # connected before the clock starts
            thread = threading.Thread(target=big)
            thread.start()
            while thread.is_alive():
                start = time.perf_counter()
                assert client.get(f"{url}/health").status_code == 200
                latencies.append(time.perf_counter() - start)
                time.sleep(0.01)
    error = _error(result["response"], 400)   # it was tokenized whole: the exact count is in the message
    assert error["code"] == "context_length_exceeded" and "(130986 in the messages" in error["message"]
    assert len(latencies) >= 5, (result["seconds"], latencies)    # /health was asked all along the way
    assert max(latencies) < 0.1, sorted(latencies)[-5:]


class _CountingTokenizer:
    """The tokenizer, recording the length of every text it encodes."""

    def __init__(self, tokenizer):
        self.tokenizer, self.lengths = tokenizer, []

    def __call__(self, text, **kwargs):
        self.lengths.append(len(text))
        return self.tokenizer(text, **kwargs)

    def __getattr__(self, name):
        return getattr(self.tokenizer, name)


@pytest.mark.parametrize("kind", ["chat", "completion"])
def test_a_prompt_far_over_the_context_is_refused_from_its_start(loaded, kind):
    """Four MB of text for a 256-token context: only the first 16 characters per context token are tokenized."""
    from velotune.infer.server_jobs import JobBuilder
    model, tok = loaded
    counting = _CountingTokenizer(tok)
    builder = JobBuilder(model, counting, BASE)
    text = "fox " * (1024 * 1024)
    body = {"model": BASE, "messages": [{"role": "user", "content": text}]} if kind == "chat" else \
        {"model": BASE, "prompt": text}
    with pytest.raises(APIError, match="far more: its first 4096 characters alone") as info:
        builder.build(validate(ChatRequest if kind == "chat" else CompletionRequest, body), print)
    assert info.value.code == "context_length_exceeded"
    assert max(counting.lengths) == CONTEXT * 16


# ---- item 5: cross-site requests, DNS rebinding, what /health shows ------------------------------------------

@pytest.mark.parametrize("content_type, status", [
    ("text/plain", 415), (None, 415), ("application/x-www-form-urlencoded", 415),
    ("application/json; charset=utf-8", 200), ("Application/JSON", 200)])
def test_json_endpoints_take_only_json(open_server, content_type, status):
    url, _ = open_server
    headers = {"Content-Type": content_type} if content_type else {}
    response = httpx.post(f"{url}/v1/completions", content=json.dumps(_completion()), headers=headers, timeout=30)
    if status == 415:
        assert _error(response, 415)["code"] == "unsupported_media_type"
    else:
        assert response.status_code == 200, response.text


def test_host_must_name_this_server_without_a_key(open_server):
    url, port = open_server
    for host in ("evil.example", f"evil.example:{port}", "127.0.0.1:1"):
        error = _error(httpx.post(f"{url}/v1/completions", json=_completion(), headers={"Host": host}, timeout=30),
                       403)
        assert error["code"] == "host_not_allowed" and "--allow-host" in error["message"]
        _error(httpx.get(f"{url}/v1/models", headers={"Host": host}, timeout=30), 403)
    assert httpx.get(f"{url}/health", headers={"Host": "10.1.2.3:1"}, timeout=30).status_code == 200   # probes
    for host in (f"localhost:{port}", f"127.0.0.1:{port}", f"proxy.internal:{port}"):
        assert httpx.post(f"{url}/v1/completions", json=_completion(), headers={"Host": host},
                          timeout=30).status_code == 200


def test_allowed_host_values():
    assert allowed_hosts("0.0.0.0", 8000, ["box.lan", "gw:9000", "[fe80::1]:81"]) == {
        "127.0.0.1:8000", "localhost:8000", "[::1]:8000", "box.lan:8000", "gw:9000", "[fe80::1]:81"}
    assert allowed_hosts("10.0.0.5", 80) >= {"10.0.0.5:80", "10.0.0.5", "localhost"}


def test_with_a_key_the_key_decides_not_the_host(loaded):
    from starlette.testclient import TestClient
    model, tok = loaded
    server = build_server(model, tok, BASE, api_key="k")
    with TestClient(create_app(server, None), base_url="http://evil.example") as client:
        assert client.get("/v1/models").status_code == 401
        assert client.get("/v1/models", headers={"Authorization": "Bearer k"}).status_code == 200


def test_health_shows_counts_not_names_or_paths(loaded, files):
    model, tok = loaded
    name = str(files["base"])     # `velotune serve DIR` names the base after its path
    with running(build_server(model, tok, name)) as (url, _):
        health = httpx.get(f"{url}/health", timeout=30)
        models = httpx.get(f"{url}/v1/models", timeout=30).json()
    assert name not in health.text and "tiny" not in health.text
    assert health.json()["status"] == "ok" and health.json()["model_count"] == 1
    assert [m["id"] for m in models["data"]] == [name]     # the names stay on /v1/models


# ---- item 8: values that crashed the worker ------------------------------------------------------------------

@pytest.mark.parametrize("extra, param", [
    ({"seed": 2 ** 64}, "seed"), ({"seed": 2 ** 63}, "seed"), ({"seed": -1}, "seed"),
    ({"repetition_penalty": 1e-300}, "repetition_penalty"), ({"repetition_penalty": 1e6}, "repetition_penalty"),
    ({"stop": [str(i) for i in range(17)]}, "stop"), ({"stop": "x" * 1025}, "stop"),
    ({"stop": ["y" * 1025]}, "stop.0")])
def test_out_of_range_values_are_refused(open_server, extra, param):
    url, _ = open_server
    error = _error(httpx.post(f"{url}/v1/completions", json=_completion(temperature=1.0, **extra), timeout=30), 400)
    assert error["param"] == param
    reply = httpx.post(f"{url}/v1/completions", json=_completion(seed=2 ** 63 - 1), timeout=30)
    assert reply.status_code == 200, reply.text


def test_nan_and_infinity_are_not_json(open_server):
    url, _ = open_server
    body = json.dumps(_completion()).replace('"temperature": 0', '"temperature": Infinity')
    assert _error(httpx.post(f"{url}/v1/completions", content=body, headers=JSON, timeout=30), 400)["code"] \
        == "invalid_json"


@pytest.fixture(scope="module")
def poisoned(files, loaded):
    """The same model with NaN in the embedding of one token ([INST]): any prompt holding it gives NaN logits."""
    model, tok = vt.load(files["base"], dtype="float32", device="cpu")
    bad = tok.convert_tokens_to_ids("[INST]")
    with torch.no_grad():
        model.model.embed_tokens.weight[bad] = float("nan")
    return model.eval(), tok, bad


def test_nonfinite_logits_fail_only_their_request(poisoned, loaded):
    from velotune.infer.server_adapters import AdapterSet
    from velotune.infer.server_queue import Job, Scheduler
    model, tok, bad = poisoned
    good_ids, bad_ids = tok("The quick brown fox").input_ids, tok("Hello there").input_ids + [bad]
    settings = resolve_sampling({"temperature": 0.0, "max_new_tokens": 6}, None, model).values
    results, done = [[], []], threading.Semaphore(0)

    def sink(i):
        return lambda item: (results[i].append(item), item[0] != "text" and done.release())

    scheduler = Scheduler(model, tok, AdapterSet(model), start=False)
    try:
        for i, ids in enumerate((bad_ids, good_ids)):
            scheduler.submit(Job(None, ids, settings, sink(i)))
        scheduler.start()
        assert done.acquire(timeout=60) and done.acquire(timeout=60)
    finally:
        scheduler.close()
    assert scheduler.batch_sizes == [2] and scheduler.stats["jobs_failed"] == 1
    kind, error = results[0][-1]
    assert kind == "error" and "NaN or infinite" in str(error)
    clean, _ = loaded
    want = generate_batch(clean, tok, [good_ids], max_new_tokens=6, temperature=0.0)[0]
    assert "".join(v for k, v in results[1] if k == "text") == want and results[1][-1][1].reason == "length"


def test_nonfinite_logits_are_a_clear_error_over_http(poisoned):
    model, tok, bad = poisoned
    with running(build_server(model, tok, BASE)) as (url, _):
        error = _error(httpx.post(f"{url}/v1/completions", json=_completion(prompt=[5, bad, 7]), timeout=30), 500)
        assert error["code"] == "generation_failed" and "NaN or infinite" in error["message"]
        assert httpx.post(f"{url}/v1/completions", json=_completion(prompt=[5, 7]), timeout=30).status_code == 200


# ---- item 9: every request bounded -----------------------------------------------------------------------------

def test_requests_are_bounded_when_the_model_states_no_context(loaded, monkeypatch, caplog):
    from velotune.infer.server_jobs import JobBuilder
    model, tok = loaded
    monkeypatch.setattr(model, "max_seq_length", None)
    with caplog.at_level(logging.WARNING, logger="velotune"):
        builder = JobBuilder(model, tok, BASE)
    assert "held to 4096 tokens" in caplog.text
    with pytest.raises(APIError, match="maximum context length is 4096") as info:
        builder.build(validate(CompletionRequest, _completion(max_tokens=10 ** 9)), print)
    assert info.value.code == "context_length_exceeded"
    job = builder.build(validate(CompletionRequest, {"model": BASE, "prompt": "Vell"}), print)
    assert job.sampling["max_new_tokens"] <= 4096 - len(job.prompt_ids)
    capped = JobBuilder(model, tok, BASE, max_tokens_limit=50)
    with pytest.raises(APIError, match="at most 50") as info:
        capped.build(validate(CompletionRequest, _completion(max_tokens=51)), print)
    assert (info.value.param, info.value.code) == ("max_tokens", "invalid_value")
    assert capped.build(validate(CompletionRequest, {"model": BASE, "prompt": "Vell"}), print).sampling[
        "max_new_tokens"] == 50


@pytest.fixture
def loader_calls(monkeypatch):
    """Records calls of the model loader `velotune serve` uses (and loads nothing)."""
    import velotune.infer.chat_cli as chat_cli
    calls = []

    def load(*args, **kwargs):
        calls.append(args)
        raise AssertionError("the model was loaded")
    monkeypatch.setattr(chat_cli, "load_for_inference", load)
    return calls


@pytest.mark.parametrize("option, value", [("--max-seq-length", "-5"), ("--max-batch-size", "0"),
                                           ("--port", "70000"), ("--threads", "0"), ("--max-body-bytes", "0"),
                                           ("--max-tokens-limit", "x")])
def test_serve_refuses_bad_numbers_before_loading(loader_calls, capsys, option, value):
    from velotune.cli import main
    with pytest.raises(SystemExit) as info:
        main(["serve", "some/model", option, value])
    assert info.value.code == 2 and not loader_calls
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith(f"velotune serve: error: argument {option}: expected an integer")


# ---- issue 11 item 3: the serve extra, checked first -------------------------------------------------------

def test_serve_checks_its_extra_before_loading(loader_calls, capsys, monkeypatch):
    import importlib.util
    from velotune.cli import main
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "uvicorn" else real(name, *a))
    assert main(["serve", "some/model"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["velotune: error: velotune serve needs uvicorn, which is not installed: "
                   "pip install 'velotune[serve]' (or bash scripts/setup.sh)"]
    assert not loader_calls


# ---- item 13: a client that leaves mid-body --------------------------------------------------------------------

def test_client_leaving_mid_body_logs_one_line(open_server, caplog):
    url, port = open_server
    caplog.set_level(logging.INFO)
    part = f'{{"model": "{BASE}", '.encode()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
                  f"Content-Length: 5000\r\n\r\n".encode() + part)
        time.sleep(0.2)
    deadline = time.monotonic() + 10
    while not any("disconnected" in r.getMessage() for r in caplog.records):
        assert time.monotonic() < deadline, caplog.text
        time.sleep(0.05)
    time.sleep(0.2)      # anything else it would log comes now
    assert [r.levelname for r in caplog.records if r.levelno >= logging.WARNING or r.exc_info] == []
    lines = [r.getMessage() for r in caplog.records if "disconnect" in r.getMessage().lower()]
    assert lines == [f"client disconnected while sending the request body ({len(part)} bytes received)"]
    assert httpx.post(f"{url}/v1/completions", json=_completion(), timeout=30).status_code == 200


# ---- issue 11 item 1: each adapter's own chat template ---------------------------------------------------------

MESSAGES = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Who rules Vell?"}]


def _rendered(tok, template):
    text = tok.apply_chat_template(MESSAGES, chat_template=template, add_generation_prompt=True, tokenize=False)
    return tok(text, add_special_tokens=False).input_ids


def _chat_job(server, name):
    return server.builder.build(validate(ChatRequest, {"model": name, "messages": MESSAGES}), print)


def test_each_adapter_chats_with_its_own_template(loaded, files):
    model, tok = loaded
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    server = build_server(model, tok, BASE, {"alp": files["adapter"]})
    try:
        base_job, adapter_job = _chat_job(server, BASE), _chat_job(server, "alp")
    finally:
        server.close()
    assert base_job.prompt_ids == _rendered(tok, CHATML) and "<|im_start|>" in tok.decode(base_job.prompt_ids)
    assert adapter_job.prompt_ids == _rendered(tok, ALPACA) and "### Instruction:" in tok.decode(adapter_job.prompt_ids)
    assert base_job.sampling["eos_token_ids"] == [im_end]      # ChatML turns end at <|im_end|>
    assert "eos_token_ids" not in adapter_job.sampling         # alpaca's end at EOS, which always ends a reply


@pytest.mark.parametrize("override, template", [("alpaca", ALPACA), ("chatml", CHATML)])
def test_chat_template_option_serves_every_model(files, monkeypatch, override, template):
    import velotune.infer.server as server_module
    from velotune.cli import main
    served = []
    monkeypatch.setattr(server_module, "serve", lambda server, *a, **k: served.append(server))
    assert main(["serve", str(files["base"]), "--name", BASE, "--adapter", f"alp={files['adapter']}",
                 "--chat-template", override, "--dtype", "float32", "--device", "cpu"]) == 0
    server = served[0]
    try:
        tok = server.builder.tokenizer
        assert _chat_job(server, BASE).prompt_ids == _chat_job(server, "alp").prompt_ids == _rendered(tok, template)
    finally:
        server.close()
