"""The Studio attacked through what a training form, a template save or one request may ask: form values that would
point a job elsewhere or name Python code, how jobs and exports start, template saves, and the cost of one request
(body, uploads, renders, tokens, models, jobs). Each test passes when the Studio defends; no test trains (job starts
are stubbed, or a sleeping stand-in process takes the job's place).
"""
from __future__ import annotations

import ast
import json
import os
import re
import shutil
import time
from pathlib import Path

import pytest

from studio_fixtures import QUICK_RUN, STUDIO_HEADERS

pytest.importorskip("fastapi")
pytest.register_assert_rewrite("studio_attack")   # a plugin of these modules (below): rewritten like one

from studio_attack import PLAIN, SECRET, STUDIO_DIR, open_studio, post, refused, start_run  # noqa: E402

pytest_plugins = ["studio_attack"]   # its fixtures: world, app, no_jobs, job_spy


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


