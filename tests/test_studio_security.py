"""The Studio attacked as a hostile web page, a hostile network neighbour or a careless user would: where it
listens and who may call it, cross-site requests, paths out of the roots (.., absolute, symlinks planted in a root,
in a data folder or under the runs root), and what reaches its store. What a run's form may set, template saves and
the cost of one request are in test_studio_security_runs.py. Each test passes when the Studio defends.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import socket

import pytest

from server_process import free_port
from studio_fixtures import QUICK_RUN, STUDIO_HEADERS, studio_process

pytest.importorskip("fastapi")
pytest.register_assert_rewrite("studio_attack")   # a plugin of these modules (below): rewritten like one

from studio_attack import PLAIN, SECRET, STUDIO_DIR, open_studio, post, refused, start_run  # noqa: E402

pytest_plugins = ["studio_attack"]   # its fixtures: world, app, no_jobs, job_spy


# ---- where it listens, who may call it -------------------------------------------------------------------------
def _can_bind(host: str) -> bool:
    with socket.socket() as s:
        try:
            s.bind((host, 0))
        except OSError:
            return False
    return True


@pytest.mark.skipif(not _can_bind("127.0.0.2"), reason="needs a second loopback address (Linux)")
def test_the_cli_listens_on_loopback_by_default_and_any_other_address_needs_the_printed_token(world):
    import httpx
    with studio_process(world, free_port()) as (origin, printed):
        assert origin.startswith("http://127.0.0.1:") and "token" not in printed
        assert httpx.get(origin + "/api/info").status_code == 200
        with pytest.raises(httpx.ConnectError):   # bound to 127.0.0.1 only, not every address
            httpx.get(origin.replace("127.0.0.1", "127.0.0.2") + "/api/info")
    # 127.0.0.2 is not a name the Studio counts as loopback: as good as a LAN address for this check
    with studio_process(world, free_port(), "--host", "127.0.0.2") as (origin, printed):
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
