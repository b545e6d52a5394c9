"""What the Studio adds to a chat, and how fast its chart draws.

Time to first token from the moment a client sends the message: `velotune serve` answering its own
/v1/chat/completions, against `velotune studio` answering /api/chat for the same model and messages (both real
processes on this machine, same tiny random model, greedy, 8 new tokens, requests one after another,
alternating so that drift hits both alike). The Studio's extra work is the hop through its API: building the
body, the chat-template render to count prompt tokens, the engine lookup. Then, in a real browser (Debian's
chromium, when installed), the time to draw one frame of the loss chart with 10,000 points.

    python benchmarks/studio_bench.py [--requests 40] [--out benchmarks/results/studio-cpu]
"""
import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))   # the tests' tiny model and process helpers

from server_process import free_port, serving  # noqa: E402
from studio_fixtures import make_world, studio_process  # noqa: E402


def first_token_ms(client, url: str, body: dict, headers: dict) -> float:
    started = time.perf_counter()
    first = None
    with client.stream("POST", url, json=body, headers=headers) as response:
        response.raise_for_status()
        for line in response.iter_lines():   # read to the end: the next request starts on a quiet server
            if first is None and line.startswith("data: ") and line != "data: [DONE]":
                chunk = json.loads(line[6:])
                if any((c.get("delta") or {}).get("content") for c in chunk.get("choices", [])):
                    first = (time.perf_counter() - started) * 1000
    if first is not None:
        return first
    raise RuntimeError(f"{url}: no text came back")


def api_ms(client, url: str) -> float:
    started = time.perf_counter()
    client.get(url).raise_for_status()
    return (time.perf_counter() - started) * 1000


def while_training(client, url: str, world: dict, chat_body: dict, headers: dict, requests: int) -> dict:
    """The page's calls and a chat while a training job runs (the job is a process of its own: on this 2-core
    machine it takes one core, which the numbers include)."""
    from studio_fixtures import QUICK_RUN
    idle_api = [api_ms(client, url + "/api/runs") for _ in range(requests)]
    run = client.post(url + "/api/runs", headers=headers, json={
        "model": world["model_ref"], "data": world["data_ref"],
        "values": {**QUICK_RUN, "train.max_steps": 100000, "train.save_every": 100000}}).json()
    try:
        deadline = time.monotonic() + 120
        while client.get(url + f"/api/runs/{run['id']}").json()["summary"].get("step", 0) < 3:
            assert time.monotonic() < deadline, "the training job did not start"
            time.sleep(0.2)
        busy_api = [api_ms(client, url + "/api/runs") for _ in range(requests)]
        busy_chat = [first_token_ms(client, url + "/api/chat", chat_body, headers) for _ in range(requests)]
    finally:
        client.post(url + f"/api/runs/{run['id']}/stop", headers=headers)
    return {"api_ms_idle_median": statistics.median(idle_api), "api_ms_training_median": statistics.median(busy_api),
            "studio_ttft_ms_training_median": statistics.median(busy_chat)}


def arena_round(client, url: str, world: dict, headers: dict, rounds: int = 5) -> dict:
    """Two panes of an arena round (two engines: each its own model copy and worker thread), each request's
    whole answer timed alone and then both at once, as the page sends them."""
    import shutil
    from concurrent.futures import ThreadPoolExecutor
    if not (world["models"] / "tiny2").exists():
        shutil.copytree(world["models"] / "tiny", world["models"] / "tiny2")
    bodies = [{"model": ref, "messages": [{"role": "user", "content": "Who rules Vell?"}],
               "settings": {"max_new_tokens": 64, "temperature": 0}} for ref in ("models:tiny", "models:tiny2")]

    def whole(body) -> float:
        started = time.perf_counter()
        with client.stream("POST", url + "/api/chat", json=body, headers=headers) as response:
            for _ in response.iter_lines():
                pass
        return (time.perf_counter() - started) * 1000
    for body in bodies:   # load both engines
        whole(body)
    alone, together = [], []
    with ThreadPoolExecutor(2) as pool:
        for _ in range(rounds):
            alone.append(sum(whole(b) for b in bodies))
            started = time.perf_counter()
            list(pool.map(whole, bodies))
            together.append((time.perf_counter() - started) * 1000)
    return {"arena_two_panes_one_after_another_ms": statistics.median(alone),
            "arena_two_panes_at_once_ms": statistics.median(together)}


def chart_frame_ms(url: str) -> float | None:
    chromium = shutil.which("chromium")
    if chromium is None:
        return None
    from playwright.sync_api import sync_playwright
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.goto(url + "/")
        page.wait_for_selector("body[data-ready='1']")
        took = page.evaluate("""() => { const c = window.velotuneStudio.charts.lossChart; c.clear();
            for (let i = 0; i < 10000; i++) c.add(i, Math.exp(-i / 3000) + 0.01 * Math.sin(i));
            const times = []; for (let k = 0; k < 20; k++) { const t = performance.now(); c.draw();
            times.push(performance.now() - t); } times.sort((a, b) => a - b); return times[10]; }""")
        browser.close()
    return took


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=40)
    parser.add_argument("--out", default=None, help="write OUT.json and OUT.md")
    ns = parser.parse_args()
    import httpx
    world = make_world(Path(tempfile.mkdtemp(prefix="studio-bench-")))
    messages = [{"role": "user", "content": "Who rules Vell?"}]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    serve_port, studio_port = free_port(), free_port()
    serve_args = [sys.executable, "-m", "velotune", "serve", str(world["models"] / "tiny"), "--port", str(serve_port),
                  "--name", "tiny"]
    with serving(serve_args, serve_port, env=env) as serve_url, studio_process(world, studio_port) as (studio_url, _):
        client = httpx.Client(timeout=120)
        serve_body = {"model": "tiny", "messages": messages, "max_tokens": 8, "temperature": 0, "stream": True}
        studio_body = {"model": world["model_ref"], "messages": messages,
                       "settings": {"max_new_tokens": 8, "temperature": 0}}
        studio_headers = {"X-Velotune-Studio": "1"}
        for _ in range(3):   # warm both: model load, first-call costs
            first_token_ms(client, serve_url + "/v1/chat/completions", serve_body, {})
            first_token_ms(client, studio_url + "/api/chat", studio_body, studio_headers)
        serve_ms, studio_ms = [], []
        for _ in range(ns.requests):
            serve_ms.append(first_token_ms(client, serve_url + "/v1/chat/completions", serve_body, {}))
            studio_ms.append(first_token_ms(client, studio_url + "/api/chat", studio_body, studio_headers))
        arena = arena_round(client, studio_url, world, studio_headers)
        busy = while_training(client, studio_url, world, studio_body, studio_headers, ns.requests)
        frame = chart_frame_ms(studio_url)
    import torch
    result = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores", "torch": torch.__version__,
        "python": platform.python_version(), "requests": ns.requests,
        "serve_ttft_ms_median": statistics.median(serve_ms), "studio_ttft_ms_median": statistics.median(studio_ms),
        "added_ms_median": statistics.median(studio_ms) - statistics.median(serve_ms),
        "serve_ttft_ms_p90": sorted(serve_ms)[int(0.9 * len(serve_ms))],
        "studio_ttft_ms_p90": sorted(studio_ms)[int(0.9 * len(studio_ms))],
        "chart_10k_points_frame_ms": frame, **busy, **arena, "command": "python benchmarks/studio_bench.py " + " ".join(sys.argv[1:])}
    lines = ["| | serve | studio | added |", "|---|---|---|---|",
             f"| time to first token, median (ms) | {result['serve_ttft_ms_median']:.1f} | "
             f"{result['studio_ttft_ms_median']:.1f} | {result['added_ms_median']:+.1f} |",
             f"| time to first token, p90 (ms) | {result['serve_ttft_ms_p90']:.1f} | "
             f"{result['studio_ttft_ms_p90']:.1f} | |",
             f"| while a training job runs: GET /api/runs, median (ms) | | {busy['api_ms_training_median']:.1f} "
             f"(idle {busy['api_ms_idle_median']:.1f}) | |",
             f"| while a training job runs: time to first token, median (ms) | | "
             f"{busy['studio_ttft_ms_training_median']:.1f} | |",
             f"| an arena round of two panes, 64 tokens each (ms) | one after another "
             f"{arena['arena_two_panes_one_after_another_ms']:.0f} | at once {arena['arena_two_panes_at_once_ms']:.0f} | |",
             "", f"chart frame with 10,000 points: {frame:.1f} ms (median of 20, chromium)" if frame is not None
             else "chart frame: chromium not installed"]
    print("\n".join(lines))
    if ns.out:
        Path(ns.out + ".json").write_text(json.dumps(result, indent=2) + "\n")
        Path(ns.out + ".md").write_text(f"# Studio overhead ({result['machine']})\n\n`{result['command']}`\n\n"
                                        + "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
