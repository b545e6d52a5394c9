"""A Studio over a temporary world: a models root with a tiny chat model, a datasets root with a chat data set,
and the Studio's home; as an in-process client or as a real `velotune studio` process."""
from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

from train_fixtures import chat_records, make_model_dir, write_jsonl

STUDIO_HEADERS = {"X-Velotune-Studio": "1"}
# Keeps the tests' training jobs small and quick: the form's values for a 6-step LoRA run on the CPU.
QUICK_RUN = {"model.dtype": "float32", "model.device": "cpu", "data.chat_template": "chatml",
             "data.max_seq_length": 64, "data.packing": False, "lora.r": 4, "lora.alpha": 8,
             "train.batch_size": 2, "train.max_steps": 6, "train.lr": 0.01, "train.progress": False,
             "train.save_every": 2, "train.seed": 3}


def make_world(tmp_path: Path) -> dict:
    from velotune.data.templates import resolve_chat_template
    models, datasets, home = tmp_path / "models", tmp_path / "datasets", tmp_path / "home"
    for d in (models, datasets, home):
        d.mkdir()
    target = make_model_dir(models, "llama").rename(models / "tiny")
    config_path = target / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(str(target))
    config["chat_template"] = resolve_chat_template("chatml", tok)
    config_path.write_text(json.dumps(config))
    write_jsonl(datasets / "chat.jsonl", chat_records(16))
    return {"models": models, "datasets": datasets, "home": home, "model_ref": "models:tiny",
            "data_ref": "datasets:chat.jsonl"}


def make_client(world: dict, **settings):
    from fastapi.testclient import TestClient

    from velotune.studio.app import Studio, create_app
    from velotune.studio.settings import StudioSettings
    studio = Studio(StudioSettings(home=world["home"], roots={"models": world["models"],
                                                              "datasets": world["datasets"]}, **settings))
    client = TestClient(create_app(studio), base_url="http://127.0.0.1:7860")
    return client, studio


def wait_for_status(client, run_id: str, statuses, timeout: float = 180) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        run = client.get(f"/api/runs/{run_id}").json()
        if run["status"] in statuses:
            return run
        assert time.monotonic() < deadline, f"run {run_id} still {run['status']} after {timeout} s"
        time.sleep(0.3)


@contextlib.contextmanager
def studio_process(world: dict, port: int, *extra, wait_s: float = 60):
    """`velotune studio` as a real process on `port`; yields (the origin it answers on, the URL it printed) once it
    answers. Its output is read all along (a full pipe would stall the server) and shown when it fails to start."""
    import httpx
    args = [sys.executable, "-m", "velotune", "studio", "--port", str(port), "--models-dir", str(world["models"]),
            "--datasets-dir", str(world["datasets"]), "--home", str(world["home"]), *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    output: list[str] = []
    try:
        printed = ""
        for line in proc.stdout:   # the URL is printed before the server starts
            output.append(line)
            if line.startswith("velotune studio: "):
                printed = line.split(": ", 1)[1].strip()
                break
        assert printed, f"no URL printed (exit {proc.poll()}):\n{''.join(output)}"
        threading.Thread(target=lambda: output.extend(proc.stdout), daemon=True).start()
        origin = printed.split("?")[0].rstrip("/")
        deadline = time.monotonic() + wait_s
        while True:
            try:
                httpx.get(origin + "/api/info", timeout=2)
                break
            except httpx.HTTPError:
                assert proc.poll() is None, "".join(output)
                assert time.monotonic() < deadline, f"no answer from {origin} after {wait_s:.0f} s"
                time.sleep(0.3)
        yield origin, printed
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
