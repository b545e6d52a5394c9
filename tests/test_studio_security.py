"""The Studio attacked as a hostile web page, a hostile network neighbour or a careless user would: where it
listens and who may call it, cross-site requests, paths out of the roots (.., absolute, symlinks planted in a root,
in a data folder or under the runs root), form values that would point a job elsewhere or name Python code,
template saves, and the cost of one request (body, uploads, renders, tokens, models, jobs).

Each test passes when the Studio defends. Where it does not yet, the test is marked xfail(strict=True) with the
hole in its reason, so the suite stays green and turns red the day the hole is closed (then drop the mark).
No test trains: job starts are stubbed, or a sleeping stand-in process takes the job's place.
"""
from __future__ import annotations

import ast
import contextlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from studio_fixtures import QUICK_RUN, STUDIO_HEADERS, make_client, make_world

pytest.importorskip("fastapi")

from fastapi.testclient import TestClient  # noqa: E402

BASE_URL = "http://127.0.0.1:7860"
STUDIO_DIR = Path(__file__).resolve().parents[1] / "velotune" / "studio"
SECRET = "TOP-SECRET"
PLAIN = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"


# ---- worlds and clients ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def base_world(tmp_path_factory):
    return make_world(tmp_path_factory.mktemp("security"))   # the tiny model is built once per module


@pytest.fixture()
def world(base_world, tmp_path):
    """This test's own copy of the roots (tests plant links and write files), a fresh home, and files outside
    every root that must never be read: outside/secret.jsonl and outside/secret.jinja."""
    models, datasets, outside = tmp_path / "models", tmp_path / "datasets", tmp_path / "outside"
    shutil.copytree(base_world["models"], models)
    shutil.copytree(base_world["datasets"], datasets)
    outside.mkdir()
    record = {"messages": [{"role": "user", "content": f"{SECRET} question"},
                           {"role": "assistant", "content": f"{SECRET} answer"}]}
    (outside / "secret.jsonl").write_text(json.dumps(record) + "\n")
    (outside / "secret.jinja").write_text(f"{SECRET} " + PLAIN)
    return {**base_world, "models": models, "datasets": datasets, "home": tmp_path / "home", "tmp": tmp_path,
            "outside": outside}


def open_studio(world, **settings):
    """A client that turns a server error into its 500 answer (not a raised exception), and the Studio."""
    client, studio = make_client(world, **settings)
    return TestClient(client.app, base_url=BASE_URL, raise_server_exceptions=False), studio


@pytest.fixture()
def app(world):
    client, studio = open_studio(world)
    with client:
        yield client, studio


@pytest.fixture()
def no_jobs(app, monkeypatch):
    """Runs are created (config.yaml written) but their jobs are not started: the runs started, by id."""
    started = []
    monkeypatch.setattr(app[1].jobs, "start", lambda run_id, resume=False: started.append(run_id))
    return started


class JobSpy:
    """Stands in for subprocess.Popen in jobs.py: records how a job would start, and starts a sleeping process
    (with the job runner's name in its command line) instead of training."""

    def __init__(self):
        self.calls, self.processes, self._popen = [], [], subprocess.Popen

    def __call__(self, command, **kwargs):
        self.calls.append((command, kwargs))
        stand_in = [sys.executable, "-c", "import time; time.sleep(60)", "velotune.studio.job_runner",
                    str(kwargs.get("cwd", ""))]
        process = self._popen(stand_in, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, start_new_session=True)
        self.processes.append(process)
        return process

    def close(self):
        for process in self.processes:
            process.kill()
            process.wait()
        for thread in threading.enumerate():   # the Studio's watchers record the end while the store is open
            if thread.name.startswith("studio-job-"):
                thread.join(timeout=5)


@pytest.fixture()
def job_spy(app, monkeypatch):
    from velotune.studio import jobs
    spy = JobSpy()
    monkeypatch.setattr(jobs.subprocess, "Popen", spy)
    yield spy
    spy.close()


def post(client, path, body=None, **kw):
    return client.post(path, json=body if body is not None else {}, headers=STUDIO_HEADERS, **kw)


def start_run(client, values, **body):
    return post(client, "/api/runs", {"model": "models:tiny", "data": "datasets:chat.jsonl", "values": values,
                                      **body})


def refused(response) -> bool:
    return response.status_code in (400, 403, 409, 413, 415, 422, 429)


# ---- where it listens, who may call it -------------------------------------------------------------------------
def _can_bind(host: str) -> bool:
    with socket.socket() as s:
        try:
            s.bind((host, 0))
        except OSError:
            return False
    return True


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def cli_studio(world, *extra):
    """`velotune studio` as a process; yields the URL it printed once it answers."""
    import httpx
    port = _free_port()
    args = [sys.executable, "-m", "velotune", "studio", "--port", str(port), "--models-dir", str(world["models"]),
            "--datasets-dir", str(world["datasets"]), "--home", str(world["home"]), *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        printed = ""
        for line in proc.stdout:   # the URL is printed before the server starts
            if line.startswith("velotune studio: "):
                printed = line.split(": ", 1)[1].strip()
                break
        assert printed, f"no URL printed (exit {proc.poll()})"
        origin = printed.split("?")[0].rstrip("/")
        deadline = time.monotonic() + 60
        while True:
            try:
                httpx.get(origin + "/api/info", timeout=2)
                break
            except httpx.HTTPError:
                assert proc.poll() is None and time.monotonic() < deadline, "the studio did not answer"
                time.sleep(0.2)
        yield printed, origin
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.mark.skipif(not _can_bind("127.0.0.2"), reason="needs a second loopback address (Linux)")
def test_the_cli_listens_on_loopback_by_default_and_any_other_address_needs_the_printed_token(world):
    import httpx
    with cli_studio(world) as (printed, origin):
        assert origin.startswith("http://127.0.0.1:") and "token" not in printed
        assert httpx.get(origin + "/api/info").status_code == 200
        with pytest.raises(httpx.ConnectError):   # bound to 127.0.0.1 only, not every address
            httpx.get(origin.replace("127.0.0.1", "127.0.0.2") + "/api/info")
    # 127.0.0.2 is not a name the Studio counts as loopback: as good as a LAN address for this check
    with cli_studio(world, "--host", "127.0.0.2") as (printed, origin):
        token = printed.split("?token=")[1]
        assert len(token) >= 24
        assert httpx.get(origin + "/api/info").status_code == 401
        assert httpx.get(origin + "/", headers={"Host": "127.0.0.1"}).status_code == 401
        assert httpx.get(origin + "/api/info", headers={"Authorization": f"Bearer {token}"}).status_code == 200


def test_a_studio_built_off_loopback_without_a_token_refuses_or_makes_one(world):
    from velotune.errors import ConfigError
    try:
        client, studio = open_studio(world, host="0.0.0.0")
    except ConfigError:
        return
    with client:
        assert client.get("/api/info", headers={"Host": "127.0.0.1:7860"}).status_code == 401


def test_with_a_token_every_path_needs_it_and_it_never_comes_back_in_a_response(world):
    client, studio = open_studio(world, host="0.0.0.0", token="t0ken-t0ken-t0ken-t0ken")
    bearer = {"Authorization": "Bearer t0ken-t0ken-t0ken-t0ken"}
    with client:
        for path in ("/", "/static/main.js", "/api/info", "/api/files?ref=models:", "/api/runs",
                     "/api/info?token=t0ken-t0ken-t0ken-t0ken"):   # the URL token works on / only
            assert client.get(path).status_code == 401, path
        for value in ("Bearer t0ken", "Bearer t0ken-t0ken-t0ken-t0ken-x", "t0ken-t0ken-t0ken-t0ken", "Basic x"):
            assert client.get("/api/info", headers={"Authorization": value}).status_code == 401, value
        assert client.get("/api/info", headers={"Cookie": "velotune_studio_token=wrong"}).status_code == 401
        # the token is no excuse for a request without the page's header: a stolen cookie is not enough
        assert client.post("/api/chats", json={"messages": []}, headers=bearer).status_code == 403
        r = client.get("/?token=t0ken-t0ken-t0ken-t0ken", follow_redirects=False)
        cookie = r.headers["set-cookie"]
        assert r.status_code == 303 and "HttpOnly" in cookie and "SameSite=Strict" in cookie
        info = client.get("/api/info", headers=bearer)
        assert info.status_code == 200 and "t0ken" not in info.text and info.json()["token_required"] is True


def test_a_loopback_studio_answers_only_requests_addressed_to_it(app):
    client, _ = app
    for host in ("evil.example:7860", "127.0.0.1:7860.evil.example", "127.0.0.1.evil.example:7860",
                 "localhost:9999", "127.0.0.1", "", "0.0.0.0:7860"):
        assert client.get("/api/info", headers={"Host": host}).status_code == 403, host
        r = client.post("/api/chats", json={"messages": []}, headers={**STUDIO_HEADERS, "Host": host})
        assert r.status_code == 403, host
    for host in ("127.0.0.1:7860", "LOCALHOST:7860", "[::1]:7860"):
        assert client.get("/api/info", headers={"Host": host}).status_code == 200, host


# ---- cross-site requests ---------------------------------------------------------------------------------------
def test_a_page_elsewhere_cannot_change_anything_with_forms_text_or_multipart(app):
    client, studio = app
    changes = [("post", "/api/runs"), ("post", "/api/uploads?name=a.txt"), ("post", "/api/chats"),
               ("post", "/api/arena/votes"), ("post", "/api/templates/save"), ("post", "/api/settings"),
               ("post", "/api/runs/x/stop"), ("post", "/api/runs/x/resume"), ("delete", "/api/chats/x"),
               ("put", "/api/chats"), ("patch", "/api/chats")]
    bodies = [{"data": {"model_a": "a", "model_b": "b", "outcome": "a"}},                   # an HTML form
              {"content": b'{"messages": []}', "headers": {"Content-Type": "text/plain"}},   # text/plain JSON
              {"files": {"file": ("a.txt", b"hello", "text/plain")}}]                        # multipart
    for method, path in changes:
        for body in bodies:
            r = client.request(method.upper(), path, **body)
            assert r.status_code == 403, (method, path, r.text)
    # the browser's preflight for a custom header gets no permission back
    r = client.options("/api/chats", headers={"Origin": "http://evil.example", "Access-Control-Request-Method":
                                              "POST", "Access-Control-Request-Headers": "x-velotune-studio"})
    assert not any(k.lower().startswith("access-control-allow") for k in r.headers)
    assert studio.store.chats() == [] and studio.store.votes() == [] and studio.store.runs() == []
    assert list(studio.uploads.iterdir()) == []


def test_a_page_elsewhere_cannot_make_the_studio_load_a_model(app):
    client, studio = app
    r = client.get("/api/chat/settings", params={"model": "models:tiny"},
                   headers={"Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "no-cors", "Sec-Fetch-Dest": "image"})
    assert r.status_code == 403 and not studio.engines.loaded
    same = client.get("/api/chat/settings", params={"model": "models:tiny"}, headers={"Sec-Fetch-Site": "same-origin"})
    assert same.status_code == 200


def test_the_page_cannot_be_framed_by_another_site(app):
    client, _ = app
    headers = client.get("/").headers
    csp = headers.get("content-security-policy", "")
    assert headers.get("x-frame-options", "").upper() in ("DENY", "SAMEORIGIN") or "frame-ancestors" in csp


def test_the_page_builds_no_html_from_data_and_static_files_stay_in_static(app):
    client, _ = app
    for script in (STUDIO_DIR / "static").glob("*.js"):
        text = script.read_text()
        found = re.findall(r"innerHTML|outerHTML|insertAdjacentHTML|document\.write|\beval\(|new Function", text)
        assert not found, (script.name, found)   # names, titles, votes, model output are text nodes only
    for path in ("/static/..%2Fapp.py", "/static/%2e%2e/app.py", "/static/../app.py", "/static/..%5Capp.py"):
        r = client.get(path)
        assert r.status_code == 404 and "create_app" not in r.text, path


# ---- paths -----------------------------------------------------------------------------------------------------
BAD_REFS = ["models:../home", "models:/etc", "models:tiny/../../home", "datasets:..\\home", "models:C:/Windows",
            "models:tiny\x00", "nowhere:x", "models", "runs:../studio.sqlite3", "models:%2e%2e/home",
            "datasets:link-out.jsonl", "datasets:dir-out/secret.jsonl", "datasets:to-models/tiny"]


def test_no_endpoint_takes_a_path_out_of_its_root(world, app, no_jobs):
    client, studio = app
    outside = world["outside"]
    os.symlink(outside / "secret.jsonl", world["datasets"] / "link-out.jsonl")
    os.symlink(outside, world["datasets"] / "dir-out")
    os.symlink(world["models"], world["datasets"] / "to-models")   # into another root: still out
    names = [e["name"] for e in client.get("/api/files", params={"ref": "datasets:"}).json()["entries"]]
    assert names == ["chat.jsonl"]
    for ref in BAD_REFS:
        answers = [client.get("/api/files", params={"ref": ref}),
                   client.get("/api/templates", params={"model": ref}),
                   client.get("/api/chat/settings", params={"model": ref}),
                   client.get("/api/chat/settings", params={"model": "models:tiny", "adapter": ref}),
                   post(client, "/api/templates/preview", {"model": ref, "template": PLAIN, "messages": []}),
                   post(client, "/api/templates/save", {"directory": ref, "template": PLAIN}),
                   post(client, "/api/data/preview", {"model": "models:tiny", "data": ref}),
                   post(client, "/api/data/preview", {"model": ref, "data": "datasets:chat.jsonl"}),
                   post(client, "/api/chat/prompt", {"model": ref, "messages": []}),
                   start_run(client, QUICK_RUN, data=ref), start_run(client, QUICK_RUN, model=ref)]
        for r in answers:
            assert r.status_code == 403 and SECRET not in r.text, (ref, r.request.url, r.text)
    assert no_jobs == [] and studio.store.runs() == []
    assert not (outside / "chat_template.jinja").exists()


def test_a_link_planted_under_the_runs_root_is_not_followed(world, app):
    client, studio = app
    outside = world["outside"]
    shutil.copytree(world["models"] / "tiny", outside / "adapter-like")
    (studio.settings.runs_dir / "planted").mkdir()
    os.symlink(outside / "adapter-like", studio.settings.runs_dir / "planted" / "adapter")
    for r in (client.get("/api/chat/settings", params={"model": "models:tiny", "adapter": "runs:planted/adapter"}),
              client.get("/api/chat/settings", params={"model": "runs:planted/adapter"}),
              post(client, "/api/templates/save", {"directory": "runs:planted/adapter", "template": PLAIN})):
        assert r.status_code == 403, r.text
    assert not studio.engines.loaded and not (outside / "adapter-like" / "chat_template.jinja").exists()


def test_a_link_planted_inside_a_data_folder_is_not_read(world, app, no_jobs):
    client, studio = app
    folder = world["datasets"] / "folder"
    folder.mkdir()
    os.symlink(world["outside"] / "secret.jsonl", folder / "rows.jsonl")
    r = post(client, "/api/data/preview", {"model": "models:tiny", "data": "datasets:folder", "values": QUICK_RUN})
    assert refused(r) and SECRET not in r.text
    assert refused(start_run(client, QUICK_RUN, data="datasets:folder")) and no_jobs == []


def test_hidden_entries_are_as_unreachable_as_they_are_unlisted(app):
    client, studio = app
    hidden = studio.roots.roots["datasets"] / ".hidden"
    hidden.mkdir()
    shutil.copy(studio.roots.roots["datasets"] / "chat.jsonl", hidden / "rows.jsonl")
    assert ".hidden" not in [e["name"] for e in client.get("/api/files", params={"ref": "datasets:"}).json()["entries"]]
    r = post(client, "/api/data/preview", {"model": "models:tiny", "data": "datasets:.hidden/rows.jsonl"})
    assert r.status_code == 403


def test_the_studio_home_is_not_reachable_through_another_root(world):
    client, studio = open_studio({**world, "datasets": world["tmp"]})    # tmp holds home/
    with client:
        assert client.get("/api/files", params={"ref": "datasets:home"}).status_code == 403
        r = post(client, "/api/templates/save", {"directory": "datasets:home/uploads", "template": PLAIN})
        assert r.status_code == 403 and not (studio.uploads / "chat_template.jinja").exists()


# ---- what a run's form may set ---------------------------------------------------------------------------------
def test_the_studio_decides_where_a_job_reads_the_model_and_data_and_writes(app, no_jobs):
    client, studio = app
    values = {**QUICK_RUN, "model.path": "/etc", "data.path": ["/etc/passwd"], "train.output_dir": "/tmp/x",
              "train.resume": True, "train.overwrite": True}
    r = start_run(client, values)
    assert r.status_code == 200, r.text
    from velotune.config import load_config
    run_dir = studio.settings.runs_dir / r.json()["id"]
    config = load_config(str(run_dir / "config.yaml"))
    assert config.model.path == str(studio.roots.roots["models"] / "tiny")
    assert config.data.path == str(studio.roots.roots["datasets"] / "chat.jsonl")
    assert config.train.output_dir == "out" and not config.train.resume and not config.train.overwrite
    # transformers' name for the output directory is no way around it either: it is dropped like ours
    r = start_run(client, {**QUICK_RUN, "output_dir": "/tmp/x"})
    assert r.status_code == 200, r.text
    config = load_config(str(studio.settings.runs_dir / r.json()["id"] / "config.yaml"))
    assert config.train.output_dir == "out"


def test_an_output_dir_smuggled_past_the_form_is_still_refused_by_the_job(app, no_jobs):
    from velotune.errors import ConfigError
    from velotune.studio.job_runner import output_inside
    client, studio = app
    for train in ({"output_dir": "/tmp/velotune-escape"}, {"output_dir": "out/../../.."}):
        r = start_run(client, {**QUICK_RUN, "train": train})
        if refused(r):
            continue   # refused by the Studio already (the fix proposed below)
        run_dir = (studio.settings.runs_dir / r.json()["id"]).resolve()
        with pytest.raises(ConfigError, match="outside the run directory"):
            output_inside(run_dir / "config.yaml", run_dir)


@pytest.mark.parametrize("values", [
    pytest.param(lambda o: {"model": {"path": str(o)}}, id="model-section"),
    pytest.param(lambda o: {"data": {"path": str(o / "secret.jsonl")}}, id="data-section"),
    pytest.param(lambda o: {"train": {"output_dir": str(o)}}, id="train-section"),
    pytest.param(lambda o: {"data.eval_path": str(o / "secret.jsonl")}, id="eval-path"),
    pytest.param(lambda o: {"data.eval_path": "../../../outside/secret.jsonl"}, id="eval-path-relative"),
    pytest.param(lambda o: {"data.chat_template": str(o / "secret.jinja")}, id="template-file"),
    pytest.param(lambda o: {"data.chat_template": "../../../outside/secret.jinja"}, id="template-file-relative"),
    pytest.param(lambda o: {"embedding.retrieval_eval": str(o)}, id="retrieval-set"),
])
def test_a_run_form_cannot_name_a_file_outside_the_roots(world, app, no_jobs, values):
    client, studio = app
    r = start_run(client, {**QUICK_RUN, **values(world["outside"])})
    assert refused(r), r.text
    assert no_jobs == [] and studio.store.runs() == []


@pytest.mark.parametrize("values", [
    pytest.param(lambda o: {"data": {"path": str(o / "secret.jsonl")}}, id="data-section"),
    pytest.param(lambda o: {"data.chat_template": str(o / "secret.jinja")}, id="template-file"),
])
def test_the_data_preview_shows_nothing_from_outside_the_roots(world, app, values):
    client, _ = app
    r = post(client, "/api/data/preview", {"model": "models:tiny", "data": "datasets:chat.jsonl",
                                           "values": {**QUICK_RUN, **values(world["outside"])}})
    assert refused(r) and SECRET not in r.text, r.text[:300]


def test_a_run_form_cannot_name_python_code_to_run(app, no_jobs):
    client, studio = app
    for values in ({"objective": "grpo", "grpo.reward_funcs": ["os:system"]},
                   {"objective": "grpo", "grpo.reward_funcs": "exact_match,antigravity:geohash"},
                   {"objective": "grpo", "grpo": {"reward_funcs": ["os:system"]}}):
        r = start_run(client, {**QUICK_RUN, **values})
        assert refused(r), (values, r.text)
    assert no_jobs == [] and studio.store.runs() == []


def test_the_job_starts_without_a_shell_in_its_run_directory(app, job_spy):
    client, studio = app
    r = start_run(client, QUICK_RUN, name="$(touch pwned); `id`; rm -rf ~ #")
    assert r.status_code == 200, r.text
    run_dir = studio.settings.runs_dir / r.json()["id"]
    (command, kwargs), = job_spy.calls
    assert isinstance(command, list) and not kwargs.get("shell")
    assert command[1:] == ["-m", "velotune.studio.job_runner", str(run_dir)]
    assert Path(kwargs["cwd"]) == run_dir and kwargs.get("start_new_session")
    assert client.get(f"/api/runs/{r.json()['id']}").json()["status"] == "running"


def test_an_export_runs_only_formats_and_quants_from_its_lists(app, no_jobs, job_spy):
    client, studio = app
    run_id = start_run(client, QUICK_RUN).json()["id"]
    run_dir = studio.settings.runs_dir / run_id
    (run_dir / "out" / "adapter").mkdir(parents=True)   # a finished run, as its job would leave it
    (run_dir / "events.jsonl").write_text(json.dumps({"kind": "outputs", "adapter_dir": "out/adapter"}) + "\n")
    assert client.get(f"/api/runs/{run_id}").json()["status"] == "finished"
    for body in ({"format": "gguf", "quant": "q4_0; id"}, {"format": "gguf", "quant": "--help"},
                 {"format": "../../x"}, {"format": "merged", "quant": "f16"}, {"format": ["gguf"]}):
        r = post(client, f"/api/runs/{run_id}/exports", body)
        assert r.status_code == 400, (body, r.text)
    assert job_spy.calls == [] and not list(run_dir.glob("exports/*"))


def test_report_to_keeps_the_job_inside_its_run_directory(app, job_spy):
    client, studio = app
    r = start_run(client, {**QUICK_RUN, "train.report_to": ["wandb"]})
    if refused(r):
        return
    run_dir = str(studio.settings.runs_dir / r.json()["id"])
    env = job_spy.calls[-1][1]["env"]
    assert all(env.get(k, "").startswith(run_dir) for k in ("WANDB_DIR", "WANDB_CONFIG_DIR", "WANDB_CACHE_DIR"))


def test_training_jobs_at_once_are_bounded(app, job_spy):
    client, _ = app
    answers = [start_run(client, QUICK_RUN) for _ in range(3)]
    statuses = [run["status"] for run in client.get("/api/runs").json()["runs"]]
    assert statuses.count("running") <= 1, statuses
    assert all(r.status_code == 200 or refused(r) for r in answers)


def test_no_studio_code_runs_a_shell_or_unpickles():
    """Every process the Studio starts is an argv list without a shell; nothing evaluates text or unpickles."""
    banned = {"os.system", "os.popen", "eval", "exec", "pickle.load", "pickle.loads", "torch.load",
              "subprocess.getoutput", "subprocess.getstatusoutput", "os.execv", "os.execvp", "os.spawnl"}
    for path in STUDIO_DIR.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not isinstance(node, ast.Call):
                continue
            name = ast.unparse(node.func)
            assert name not in banned, f"{path.name}:{node.lineno}: {name}"
            shell = [k for k in node.keywords if k.arg == "shell"]
            assert not shell or ast.unparse(shell[0].value) == "False", f"{path.name}:{node.lineno}: shell"
            if name.startswith("subprocess."):
                assert node.args and isinstance(node.args[0], (ast.Name, ast.List)), f"{path.name}:{node.lineno}"


# ---- chat templates --------------------------------------------------------------------------------------------
def test_a_template_save_replaces_a_planted_link_and_never_writes_through_it(world, app):
    client, _ = app
    model, target = world["models"] / "tiny", world["outside"] / "secret.jinja"
    before = target.read_text()
    (model / "chat_template.jinja").unlink(missing_ok=True)
    os.symlink(target, model / "chat_template.jinja")
    r = post(client, "/api/templates/save", {"directory": "models:tiny", "template": PLAIN})
    assert r.status_code == 200, r.text
    assert target.read_text() == before
    assert not (model / "chat_template.jinja").is_symlink() and (model / "chat_template.jinja").read_text() == PLAIN


def test_a_template_is_saved_only_into_a_model_or_adapter_directory(app):
    client, studio = app
    (studio.roots.roots["datasets"] / "plain").mkdir()
    (studio.roots.roots["models"] / "plain").mkdir()
    for ref in ("datasets:", "datasets:plain", "models:", "models:plain", "runs:"):
        r = post(client, "/api/templates/save", {"directory": ref, "template": PLAIN})
        assert refused(r), (ref, r.text)
        assert not studio.roots.resolve(ref).path.joinpath("chat_template.jinja").exists(), ref
    assert post(client, "/api/templates/save", {"directory": "models:tiny", "template": PLAIN}).status_code == 200


def test_a_template_that_would_hang_every_chat_is_not_saved(app):
    client, studio = app
    slow = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}" + PLAIN
    r = post(client, "/api/templates/save", {"directory": "models:tiny", "template": slow})
    assert refused(r), r.text
    saved = studio.roots.roots["models"] / "tiny" / "chat_template.jinja"
    assert not saved.exists() or "range(100000)" not in saved.read_text()


def test_the_template_preview_is_bounded(app):
    client, _ = app
    slow = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}" + PLAIN
    began = time.monotonic()
    r = post(client, "/api/templates/preview", {"model": "models:tiny", "template": slow,
                                                "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 200 and r.json()["error"]["kind"] == "limit"
    assert time.monotonic() - began < 10


def test_the_data_preview_bounds_a_template_typed_in_the_form(app):
    client, _ = app
    # 120,000 range() numbers: over the Studio's bound per render (100,000), quick for jinja alone
    heavy = "{% for i in range(60000) %}{% endfor %}{% for i in range(60000) %}{% endfor %}" + PLAIN
    r = post(client, "/api/data/preview", {"model": "models:tiny", "data": "datasets:chat.jsonl",
                                           "values": {**QUICK_RUN, "data.chat_template": heavy}})
    assert refused(r) and ("range" in r.text or "limit" in r.text), r.text[:300]


# ---- the cost of one request -----------------------------------------------------------------------------------
def test_json_bodies_are_capped_even_when_their_length_is_not_declared(world):
    client, studio = open_studio(world, max_body_bytes=2000)
    with client:
        big = {"title": "t", "messages": [{"role": "user", "content": "x" * 5000}]}
        assert post(client, "/api/chats", big).status_code == 413
        chunks = (b'{"messages": ["' + b"x" * 1000, b"x" * 1000, b"x" * 1000 + b'"]}')
        r = client.post("/api/chats", content=iter(chunks), headers={**STUDIO_HEADERS,
                                                                     "Content-Type": "application/json"})
        assert r.status_code == 413 and studio.store.chats() == []


def test_uploads_are_capped_typed_and_their_names_are_only_labels(world):
    client, studio = open_studio(world, max_upload_bytes=1000)
    headers = {**STUDIO_HEADERS, "Content-Type": "application/octet-stream"}
    with client:
        r = client.post("/api/uploads", params={"name": "a.txt"}, content=iter([b"a" * 600, b"a" * 600]),
                        headers=headers)
        assert r.status_code == 413
        assert client.post("/api/uploads", params={"name": "a.exe"}, content=b"MZ", headers=headers).status_code == 415
        assert list(studio.uploads.iterdir()) == []
        for name in ("../../evil.txt", "/etc/cron.d/evil.txt", "..\\..\\evil.txt", "x" * 5000 + ".txt",
                     'a"><img src=x>.txt', "evil.txt\x00.exe"):
            r = client.post("/api/uploads", params={"name": name}, content=b"hello", headers=headers)
            if r.status_code == 200:
                label = r.json()["name"]
                assert "/" not in label and "\\" not in label and len(label) <= 255 and "<" not in label, label
            else:
                assert refused(r), (name, r.text)
        kept = list(studio.uploads.iterdir())
        assert all(re.fullmatch(r"[0-9a-f]{16}\.json", p.name) for p in kept), kept
        assert not list(world["tmp"].rglob("evil.txt"))


def test_a_chat_request_is_bounded_in_files_and_tokens(app):
    client, studio = app
    base = {"model": "models:tiny", "messages": [{"role": "user", "content": "hi"}]}
    r = post(client, "/api/chat/prompt", {**base, "attachments": ["a"] * 17})
    assert r.status_code == 400 and "at most 16" in r.text
    for upload_id in ("../studio", "uploads/x", "a.json", "", 12):
        assert post(client, "/api/chat/prompt", {**base, "attachments": [upload_id]}).status_code == 400
    r = post(client, "/api/chat", {**base, "settings": {"max_new_tokens": 10 ** 9, "temperature": 0}})
    assert r.status_code == 400 and "context" in r.text


def test_the_models_held_in_memory_are_bounded(world):
    shutil.copytree(world["models"] / "tiny", world["models"] / "tiny2")
    client, studio = open_studio(world, max_loaded_models=1)
    with client:
        for ref in ("models:tiny", "models:tiny2", "models:tiny"):
            assert client.get("/api/chat/settings", params={"model": ref}).status_code == 200
            assert len(studio.engines.loaded) <= 1


def test_a_yaml_bomb_is_refused(app):
    client, _ = app
    levels = ["a: &a [x, x, x, x, x, x, x, x, x, x]"]
    for prev, name in zip("abcd", "bcde"):
        levels.append(f"{name}: &{name} [{', '.join([f'*{prev}'] * 10)}]")   # 10**5 x's, ~0.2 s, ~0.5 MB
    r = post(client, "/api/config/from-yaml", {"yaml": "\n".join(levels)})
    assert len(r.content) < 100_000 and r.status_code in (200, 400)


def test_deeply_nested_bodies_are_a_clear_400(app):
    client, _ = app
    deep = ('{"messages": ' + "[" * 50000 + "]" * 50000 + "}").encode()
    r = client.post("/api/chats", content=deep, headers={**STUDIO_HEADERS, "Content-Type": "application/json"})
    assert r.status_code == 400, r.text[:200]
    r = post(client, "/api/config/from-yaml", {"yaml": "[" * 5000 + "]" * 5000})
    assert r.status_code == 400, r.text[:200]


# ---- the store -------------------------------------------------------------------------------------------------
def test_no_parameter_reaches_sqlite_as_sql(app):
    client, studio = app
    kept = post(client, "/api/chats", {"title": "keep", "messages": []}).json()["id"]
    for evil in ("' OR '1'='1", "x'); DROP TABLE chats; --", '" OR 1=1 --', "%", "*"):
        assert client.get(f"/api/chats/{evil}").status_code == 404
        assert client.delete(f"/api/chats/{evil}", headers=STUDIO_HEADERS).json() == {"deleted": False}
        assert client.get(f"/api/runs/{evil}").status_code in (400, 404)
        assert post(client, "/api/arena/votes", {"model_a": evil, "model_b": "b", "outcome": "a",
                                                 "prompt": evil}).status_code == 200
    assert [c["id"] for c in studio.store.chats()] == [kept]
    names = {r["name"] for r in client.get("/api/arena/leaderboard").json()["ratings"]}
    assert "x'); DROP TABLE chats; --" in names


def test_a_run_id_is_never_a_path(app):
    client, studio = app
    planted = studio.settings.runs_dir / "planted"   # a directory under runs/ the store does not know
    planted.mkdir()
    (planted / "events.jsonl").write_text('{"kind": "finished"}\n')
    (planted / "job.log").write_text(SECRET)
    for run_id in ("planted", "..", "%2e%2e", ".hidden", "..%2F..%2Fhome", "..%5C..", "x%00"):
        for suffix in ("/events", "/log", ""):
            r = client.get(f"/api/runs/{run_id}{suffix}")
            assert r.status_code in (400, 404) and SECRET not in r.text, (run_id, suffix, r.text)
        assert post(client, f"/api/runs/{run_id}/stop").status_code in (400, 404)


def test_the_page_settings_keep_only_known_short_strings(app):
    client, studio = app
    for values in ({"unknown": "x"}, {"chat-model": "m" * 2000}, {"chat-model": {"nested": 1}}):
        assert post(client, "/api/settings", {"values": values}).status_code == 400
    assert studio.store.setting("page", {}) == {}


def test_a_chat_title_is_capped(app):
    client, studio = app
    r = post(client, "/api/chats", {"title": "t" * 1_000_000, "messages": []})
    assert refused(r) or max(len(c["title"]) for c in studio.store.chats()) <= 1000


def test_saving_a_chat_under_an_unknown_id_does_not_lose_it(app):
    client, _ = app
    r = post(client, "/api/chats", {"id": "gone", "title": "t", "messages": [{"role": "user", "content": "x"}]})
    assert r.status_code == 404 or client.get(f"/api/chats/{r.json()['id']}").status_code == 200


def test_a_speech_manifest_may_name_audio_only_inside_its_root(world, app, no_jobs, tmp_path):
    client, studio = app
    outside = tmp_path / "elsewhere.wav"
    outside.write_bytes(b"RIFF")
    manifest = world["datasets"] / "speech.jsonl"
    manifest.write_text(json.dumps({"audio": str(outside), "text": "hello"}) + "\n")
    r = start_run(client, {**QUICK_RUN, "objective": "asr"}, data="datasets:speech.jsonl")
    assert r.status_code == 403 and "outside the datasets root" in r.text, r.text
    manifest.write_text(json.dumps({"audio": "../elsewhere.wav", "text": "hello"}) + "\n")
    r = start_run(client, {**QUICK_RUN, "objective": "asr"}, data="datasets:speech.jsonl")
    assert r.status_code == 403
    assert no_jobs == []
