"""What the Studio's attack tests share: a world per test (its own roots, with files outside them that must never be
read), a Studio client that answers server errors as 500s, job stand-ins, and request helpers. The fixtures are
imported by name into tests/test_studio_security*.py."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from studio_fixtures import STUDIO_HEADERS, make_client, make_world

BASE_URL = "http://127.0.0.1:7860"
STUDIO_DIR = Path(__file__).resolve().parents[1] / "velotune" / "studio"
SECRET = "TOP-SECRET"
PLAIN = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"


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
