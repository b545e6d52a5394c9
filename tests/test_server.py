"""The OpenAI-compatible server: the real `velotune serve` process called with the official `openai` client
(answers equal to `vt.generate`'s greedy output, for the base and for two adapters), bad requests, API keys,
16 concurrent requests, client disconnects; plus the adapter switching and batching pieces in-process."""
import json
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import torch

import velotune as vt
from hf_reference import make_checkpoint
from tiny_tokenizer import make_tokenizer
from velotune.data.templates import CHATML
from velotune.infer import generate_batch
from velotune.lora import lora_layers

API_KEY = "test-key-123"
BASE = "tiny-base"
CONTEXT = 8192          # long enough that an unstopped 8000-token request would run for many seconds
MAX_TOKENS = 8


# ---- fixtures: a tiny llama with a chat template, two adapters, references, the server process --------------

def _randomize_adapter(model, seed):
    g = torch.Generator().manual_seed(seed)
    for layer in lora_layers(model).values():
        layer.lora_B.weight.data.normal_(0.0, 0.3, generator=g)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """The base checkpoint and two adapters of different shape: alpha (every linear, r=4) and beta (q/v only,
    r=2, with its own trained lm_head)."""
    root = tmp_path_factory.mktemp("serve")
    tok = make_tokenizer(chat_template=CHATML)
    base, _ = make_checkpoint(root, "llama", vocab_size=len(tok), max_position_embeddings=CONTEXT)
    tok.save_pretrained(str(base))
    model, _ = vt.load(base, dtype="float32", device="cpu")
    vt.add_lora(model, r=4, alpha=8)
    _randomize_adapter(model, 1)
    vt.save_adapter(model, root / "alpha")
    model, _ = vt.load(base, dtype="float32", device="cpu")
    vt.add_lora(model, r=2, alpha=4, targets=["q_proj", "v_proj"], modules_to_save=["lm_head"])
    _randomize_adapter(model, 2)
    with torch.no_grad():
        model.lm_head.weight.add_(torch.randn(model.lm_head.weight.shape, generator=torch.Generator().manual_seed(3)))
    vt.save_adapter(model, root / "beta")
    return {"base": base, "alpha": root / "alpha", "beta": root / "beta", "root": root}


@pytest.fixture(scope="module")
def models(files):
    """Reference models, loaded the ordinary way: served name -> (model, tokenizer)."""
    out = {}
    for name in (BASE, "alpha", "beta"):
        model, tok = vt.load(files["base"], dtype="float32", device="cpu")
        if name != BASE:
            vt.load_adapter(model, files[name], trainable=False)
        out[name] = (model.eval(), tok)
    return out


def reference(models, name, prompt, max_new_tokens=MAX_TOKENS):
    """The greedy completion of `prompt` alone (text, prompt tokens, completion tokens, OpenAI finish reason)."""
    model, tok = models[name]
    c = generate_batch(model, tok, [prompt], max_new_tokens=max_new_tokens, temperature=0.0, return_details=True)[0]
    return c.text, c.prompt_tokens, c.completion_tokens, ("length" if c.finish_reason == "length" else "stop")


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(files):
    """`python -m velotune serve` with both adapters and an API key; its base URL while it runs."""
    port = _free_port()
    log_path = files["root"] / "server.log"
    cmd = [sys.executable, "-m", "velotune", "serve", str(files["base"]), "--name", BASE, "--port", str(port),
           "--adapter", f"alpha={files['alpha']}", "--adapter", f"beta={files['beta']}", "--api-key", API_KEY,
           "--threads", "1", "--log-level", "warning"]
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=Path(__file__).parent)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                pytest.fail(f"the server exited ({proc.returncode}):\n{log_path.read_text()}")
            try:
                if httpx.get(f"{url}/v1/models", headers=AUTH, timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"the server did not answer in 60 s:\n{log_path.read_text()}")
            time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()


AUTH = {"Authorization": f"Bearer {API_KEY}"}


@pytest.fixture(scope="module")
def client(server):
    from openai import OpenAI
    return OpenAI(base_url=f"{server}/v1", api_key=API_KEY, max_retries=0, timeout=60)


def chat(text):
    return [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": text}]


# ---- answers equal vt.generate's -----------------------------------------------------------------------------

def test_models_lists_base_and_adapters(client):
    assert [m.id for m in client.models.list().data] == [BASE, "alpha", "beta"]


@pytest.mark.parametrize("name", [BASE, "alpha", "beta"])
def test_chat_equals_generate(client, models, name):
    messages = chat("What colour is the sky on Vell?")
    text, prompt_tokens, completion_tokens, finish = reference(models, name, messages)
    reply = client.chat.completions.create(model=name, messages=messages, max_tokens=MAX_TOKENS, temperature=0)
    assert reply.choices[0].message.content == text
    assert reply.choices[0].message.role == "assistant"
    assert reply.choices[0].finish_reason == finish
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (prompt_tokens, completion_tokens)
    assert reply.usage.total_tokens == prompt_tokens + completion_tokens
    assert reply.model == name and reply.object == "chat.completion"


def test_adapters_change_the_answer(models):
    """The adapter checks above mean something only if each adapter's answer differs from the base's."""
    answers = {name: reference(models, name, chat("Who rules Vell?"))[0] for name in (BASE, "alpha", "beta")}
    assert len(set(answers.values())) == 3, answers


@pytest.mark.parametrize("name", [BASE, "beta"])
def test_chat_stream_equals_generate(client, models, name):
    messages = chat("How many moons has Vell?")
    text, prompt_tokens, completion_tokens, finish = reference(models, name, messages)
    chunks = list(client.chat.completions.create(model=name, messages=messages, max_tokens=MAX_TOKENS,
                                                 temperature=0, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [finish]
    assert chunks[-1].choices == []
    assert (chunks[-1].usage.prompt_tokens, chunks[-1].usage.completion_tokens) == (prompt_tokens, completion_tokens)
    assert len({c.id for c in chunks}) == 1 and all(c.object == "chat.completion.chunk" for c in chunks)


@pytest.mark.parametrize("stream", [False, True])
def test_completion_equals_generate(client, models, stream):
    prompt = "The quick brown fox"
    text, prompt_tokens, completion_tokens, finish = reference(models, "alpha", prompt, 10)
    if stream:
        chunks = list(client.completions.create(model="alpha", prompt=prompt, max_tokens=10, temperature=0,
                                                stream=True))
        assert "".join(c.choices[0].text for c in chunks) == text
        assert [c.choices[0].finish_reason for c in chunks if c.choices[0].finish_reason] == [finish]
    else:
        reply = client.completions.create(model="alpha", prompt=prompt, max_tokens=10, temperature=0)
        assert reply.choices[0].text == text and reply.choices[0].finish_reason == finish
        assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (prompt_tokens, completion_tokens)


def test_token_id_prompt_and_stop_string(client, models):
    model, tok = models[BASE]
    ids = tok("Write a haiku about the sea.").input_ids
    text = reference(models, BASE, ids, 12)[0]
    reply = client.completions.create(model=BASE, prompt=ids, max_tokens=12, temperature=0)
    assert reply.choices[0].text == text
    stop = text[3:5]      # a stop string the greedy text contains: the answer ends before its first match
    assert stop and stop in text
    reply = client.completions.create(model=BASE, prompt=ids, max_tokens=12, temperature=0, stop=[stop])
    assert reply.choices[0].text == text[:text.index(stop)] and reply.choices[0].finish_reason == "stop"


def test_seeded_sampling_repeats(client):
    kwargs = dict(model="alpha", prompt="Vell", max_tokens=12, temperature=1.0, top_p=1.0, seed=7)
    first = client.completions.create(**kwargs).choices[0].text
    assert client.completions.create(**kwargs).choices[0].text == first


# ---- bad requests: OpenAI's error shape, the right status, and the server keeps serving ----------------------

def _post(server, path, headers=AUTH, **kwargs):
    return httpx.post(f"{server}{path}", headers=headers, timeout=30, **kwargs)


def _error(response, status):
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    return error


def test_bad_requests(server, client, models):
    error = _error(_post(server, "/v1/chat/completions", content=b'{"model": "tiny-base", "messages": [',
                         headers={**AUTH, "Content-Type": "application/json"}), 400)
    assert error["code"] == "invalid_json"
    error = _error(_post(server, "/v1/chat/completions", json={"model": BASE}), 400)
    assert error["param"] == "messages"
    error = _error(_post(server, "/v1/chat/completions", json={"model": BASE, "messages": chat("x"),
                                                               "temperature": "hot"}), 400)
    assert error["param"] == "temperature"
    error = _error(_post(server, "/v1/chat/completions", json={"model": BASE, "messages": chat("x"), "n": 2}), 400)
    assert error["param"] == "n"
    error = _error(_post(server, "/v1/completions", json={"model": "gamma", "prompt": "x"}), 404)
    assert (error["code"], error["param"]) == ("model_not_found", "model") and "gamma" in error["message"]
    error = _error(_post(server, "/v1/completions", json={"model": BASE, "prompt": "x", "max_tokens": CONTEXT}), 400)
    assert error["code"] == "context_length_exceeded" and str(CONTEXT) in error["message"]
    _error(_post(server, "/v1/completions", json={"model": BASE, "prompt": [10 ** 6]}), 400)
    _error(_post(server, "/v1/nothing", json={}), 404)
    from openai import NotFoundError
    with pytest.raises(NotFoundError):
        client.chat.completions.create(model="gamma", messages=chat("x"), max_tokens=2)
    # still serving, and still right
    text = reference(models, BASE, chat("What is the capital of Vell?"))[0]
    reply = client.chat.completions.create(model=BASE, messages=chat("What is the capital of Vell?"),
                                           max_tokens=MAX_TOKENS, temperature=0)
    assert reply.choices[0].message.content == text


def test_api_key_is_required(server):
    body = {"model": BASE, "prompt": "x", "max_tokens": 1}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": API_KEY}):
        assert _error(_post(server, "/v1/completions", headers=headers, json=body), 401)["code"] == "invalid_api_key"
    assert httpx.get(f"{server}/v1/models", timeout=10).status_code == 401
    assert _post(server, "/v1/completions", json=body).status_code == 200


# ---- concurrency and disconnects -----------------------------------------------------------------------------

def test_sixteen_concurrent_requests_each_get_their_own_answer(client, models):
    facts = ["the sky", "the queen", "the moons", "the bread", "the river", "the age", "the sport", "the capital"]
    jobs = []
    for i in range(16):
        name = (BASE, "alpha", "beta")[i % 3]
        words = " ".join(["Tell me about", facts[i % 8]] + ["please"] * (i // 8) + [f"({i})"])
        jobs.append((name, chat(words) if i % 2 else words))
    expected = [reference(models, name, prompt)[0] for name, prompt in jobs]
    assert len(set(expected)) >= 12      # mostly different answers: a mix-up would show
    start = threading.Barrier(16)

    def call(job):
        name, prompt = job
        start.wait()
        if isinstance(prompt, str):
            return client.completions.create(model=name, prompt=prompt, max_tokens=MAX_TOKENS,
                                             temperature=0).choices[0].text
        return client.chat.completions.create(model=name, messages=prompt, max_tokens=MAX_TOKENS,
                                              temperature=0).choices[0].message.content

    with ThreadPoolExecutor(16) as pool:
        got = list(pool.map(call, jobs))
    assert got == expected


def _health(server):
    return httpx.get(f"{server}/health", timeout=10).json()


def _wait_for_cancelled(server, count, timeout=20.0):
    deadline = time.monotonic() + timeout
    while _health(server)["jobs_cancelled"] < count:
        assert time.monotonic() < deadline, _health(server)
        time.sleep(0.05)
    return _health(server)


def test_client_disconnect_stops_generation(server, client, models):
    """Each request below asks for 8000 tokens with EOS ignored; the clients leave early, so their jobs end
    cancelled with far fewer tokens generated."""
    before = _health(server)
    body = {"model": BASE, "prompt": "Vell", "max_tokens": 8000, "ignore_eos": True, "temperature": 0}
    with httpx.stream("POST", f"{server}/v1/completions", json={**body, "stream": True}, headers=AUTH,
                      timeout=30) as response:
        lines = [line for _, line in zip(range(3), (x for x in response.iter_lines() if x.startswith("data:")))]
    assert len(lines) == 3 and json.loads(lines[0][5:])["choices"][0]["text"] is not None
    after_stream = _wait_for_cancelled(server, before["jobs_cancelled"] + 1)
    with pytest.raises(httpx.ReadTimeout):      # a non-streaming client that gives up waiting
        httpx.post(f"{server}/v1/completions", json=body, headers=AUTH, timeout=1.0)
    after = _wait_for_cancelled(server, after_stream["jobs_cancelled"] + 1)
    assert after["cancelled_tokens"] - before["cancelled_tokens"] < 2 * 8000 - 1000
    text = reference(models, "alpha", chat("Who rules Vell?"))[0]     # and the worker serves the next request
    reply = client.chat.completions.create(model="alpha", messages=chat("Who rules Vell?"), max_tokens=MAX_TOKENS,
                                           temperature=0)
    assert reply.choices[0].message.content == text


# ---- the pieces, in-process -----------------------------------------------------------------------------------

def test_adapter_set_switches_without_merging(files, models):
    from velotune.infer.server_adapters import AdapterSet
    model, _ = vt.load(files["base"], dtype="float32", device="cpu")
    adapters = AdapterSet(model)
    adapters.add("alpha", files["alpha"])
    adapters.add("beta", files["beta"])
    ids = torch.tensor([[5, 17, 42, 7, 99, 3]])
    with torch.no_grad():
        for name in (None, "beta", "alpha", "beta", None, "alpha", None):
            adapters.activate(name)
            want = models[name or BASE][0](ids).logits
            torch.testing.assert_close(model(ids).logits, want, rtol=1e-6, atol=1e-6)
    assert not lora_layers(model)      # the base alone again: no LoRA layer left in the tree
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in models[BASE][0].parameters())


def test_scheduler_batches_compatible_jobs_in_order(models):
    """Five jobs queued before the worker starts: the three that share adapter and settings decode together;
    a job cancelled while queued never runs; every job gets its own answer."""
    from velotune.infer.defaults import resolve_sampling
    from velotune.infer.server_adapters import AdapterSet
    from velotune.infer.server_queue import Job, Scheduler
    model, tok = models[BASE]
    prompts = [tok(p).input_ids for p in ("Hello there", "The lazy dog sleeps", "Vell", "What is", "Paris")]
    greedy = resolve_sampling({"temperature": 0.0, "max_new_tokens": 6}, None, model).values
    longer = dict(greedy, max_new_tokens=7)
    results = [[] for _ in prompts]
    done = threading.Semaphore(0)

    def sink(i):
        def deliver(item):
            results[i].append(item)
            if item[0] != "text":
                done.release()
        return deliver

    settings = [greedy, greedy, longer, greedy, greedy]
    jobs = [Job(None, p, s, sink(i)) for i, (p, s) in enumerate(zip(prompts, settings))]
    jobs[3].cancel()
    scheduler = Scheduler(model, tok, AdapterSet(model), max_batch_size=8, start=False)
    try:
        for job in jobs:
            scheduler.submit(job)
        scheduler.start()
        for _ in jobs:
            assert done.acquire(timeout=60)
    finally:
        scheduler.close()
    assert scheduler.batch_sizes == [3, 1]      # jobs 0, 1, 4 together, then job 2; job 3 never ran
    assert results[3] == [("done", results[3][0][1])] and results[3][0][1].reason == "cancelled"
    for i in (0, 1, 2, 4):
        text = "".join(v for kind, v in results[i] if kind == "text")
        finish = results[i][-1][1]
        want = reference(models, BASE, prompts[i], settings[i]["max_new_tokens"])
        assert (text, finish.prompt_tokens, finish.completion_tokens, finish.reason) == want


def test_sampling_fields_reach_the_engine(client, models):
    """Penalties, top_k / min_p (extras, sent in the body) and max_completion_tokens mean what vt.generate does."""
    model, tok = models[BASE]
    extras = dict(repetition_penalty=1.5, top_k=5, min_p=0.05)
    want = generate_batch(model, tok, ["Vell is"], max_new_tokens=12, temperature=0.0, presence_penalty=0.8,
                          frequency_penalty=0.6, **extras)[0]
    assert want != reference(models, BASE, "Vell is", 12)[0]     # the penalties change this answer
    reply = client.completions.create(model=BASE, prompt="Vell is", max_tokens=12, temperature=0,
                                      presence_penalty=0.8, frequency_penalty=0.6, extra_body=extras)
    assert reply.choices[0].text == want
    reply = client.chat.completions.create(model=BASE, messages=chat("Vell?"), max_completion_tokens=3,
                                           temperature=0, extra_body={"ignore_eos": True})
    assert (reply.usage.completion_tokens, reply.choices[0].finish_reason) == (3, "length")


def test_job_settings_from_defaults_and_the_context(models):
    from velotune.infer.server_jobs import JobBuilder
    from velotune.infer.server_schema import APIError, CompletionRequest, validate
    model, tok = models[BASE]
    builder = JobBuilder(model, tok, BASE, sampling_config={"temperature": 0.0, "max_new_tokens": 10 ** 6})
    job = builder.build(validate(CompletionRequest, {"model": BASE, "prompt": "Vell"}), print)
    assert job.sampling["temperature"] == 0.0                                     # the server's --set default
    assert job.sampling["max_new_tokens"] == CONTEXT - len(job.prompt_ids)         # a default fits the context
    asked = {"model": BASE, "prompt": "Vell", "temperature": 0.5, "max_tokens": 7, "top_k": -1}
    job = builder.build(validate(CompletionRequest, asked), print)
    assert (job.sampling["temperature"], job.sampling["max_new_tokens"], job.sampling["top_k"]) == (0.5, 7, 0)
    with pytest.raises(APIError, match="maximum context length is 8192") as info:
        builder.build(validate(CompletionRequest, {"model": BASE, "prompt": [5] * CONTEXT}), print)
    assert (info.value.status, info.value.code) == (400, "context_length_exceeded")


def test_serve_command_line_parsing():
    from velotune.errors import ConfigError
    from velotune.infer.serve_cli import parse_adapters, parse_settings
    assert parse_adapters(["a=/x/y", "/z/beta"]) == {"a": "/x/y", "beta": "/z/beta"}
    with pytest.raises(ConfigError, match="given twice"):
        parse_adapters(["a=/x", "a=/y"])
    assert parse_settings(["temperature=0.2", 'stop=["\\n"]', "seed=3"]) == {"temperature": 0.2, "stop": ["\n"],
                                                                           "seed": 3}
    with pytest.raises(ConfigError, match="tempreature"):
        parse_settings(["tempreature=0.2"])
