"""Every shell line and Python block of the README runs, as written, on tiny models standing in for the ones it
names: a README that lies fails CI. The only changes are the stand-ins below (paths to models this machine does
not have, a GPU count this machine does not have); lines that cannot run here are listed with the reason."""
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from hf_reference import make_checkpoint
from server_process import free_port, serving
from tiny_tokenizer import make_tokenizer
from train_fixtures import FACTS

README = Path(__file__).resolve().parent.parent / "README.md"
REPO = README.parent

# README line (its start) -> why it is not run here
NOT_RUN = {
    "bash scripts/setup.sh && .venv/bin/velotune demo": "CI runs scripts/setup.sh itself (scripts/test.sh); "
                                                        "tests/test_demo.py runs the demo",
    "bash scripts/test.sh": "the command that runs this test",
    "torchrun --nnodes 2": "needs two machines and a rendezvous host",
    "python benchmarks/": "minutes of benchmarking: tests/test_bench_*.py run the benchmarks' --quick modes",
    "bash benchmarks/gpu_suite.sh": "needs a GPU",
    "velotune studio": "a server that runs until stopped: tests/test_studio_browser.py starts it and drives it in "
                       "a browser",
}
# text in the README -> its stand-in here (the model stand-ins are built by the fixture)
STAND_INS = {"--nproc_per_node 4": "--nproc_per_node 2",
             # an epoch of the embedding example is minutes on this CPU: two small steps show the same path
             "data.path=docstrings/train.jsonl": "data.path=docstrings/train.jsonl train.max_steps=2 train.batch_size=16",
             # the speech examples: two small steps on a few espeak clips, the real tiny.en; a random tiny codec
             "data.eval_path=clips/eval.jsonl": "data.eval_path=clips/eval.jsonl train.max_steps=2 train.batch_size=2",
             "data.path=speech.jsonl": "data.path=speech.jsonl train.max_steps=2 train.batch_size=2",
             "--out hello.wav": "--out hello.wav --max-new-tokens 21"}
MODELS = {"/models/Llama-3.2-1B": ("llama", {}), "/models/Qwen2.5-7B": ("qwen2", {}),
          "/models/gemma-2-2b": ("gemma2", {"num_hidden_layers": 4})}  # full_pretrain trains the last 4 blocks


def readme_blocks():
    return re.findall(r"```(bash|python)\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S)


def shell_lines(code: str) -> list[str]:
    joined = code.replace("\\\n", " ")
    lines = [re.sub(r"\s+#\s.*$", "", line).strip() for line in joined.splitlines()]
    return [re.sub(r"\s+", " ", line) for line in lines if line and not line.startswith("#")]


def skipped(line: str) -> bool:
    return any(line.startswith(prefix) for prefix in NOT_RUN)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A directory holding what the README's commands read: the stand-in models, the data files, a cfg.yaml."""
    root = tmp_path_factory.mktemp("readme")
    texts = [q + " " + a for q, a in FACTS] * 2
    stand_ins = {}
    for name, (model_type, overrides) in MODELS.items():
        tokenizer = make_tokenizer(texts=texts, vocab_size=300)
        tokenizer.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
                                   "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
                                   "{% endif %}")
        path, _ = make_checkpoint(root / "models" / model_type, model_type, vocab_size=len(tokenizer),
                                  max_position_embeddings=2048, **overrides)
        tokenizer.save_pretrained(str(path))
        stand_ins[name] = str(path)
    chats = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]} for q, a in FACTS]
    (root / "chats.jsonl").write_text("".join(json.dumps(r) + "\n" for r in chats * 6), encoding="utf-8")
    alpaca = [{"instruction": q, "input": "", "output": a} for q, a in FACTS] * 6
    (root / "alpaca.json").write_text(json.dumps(alpaca), encoding="utf-8")
    wrong = [a for _, a in FACTS][1:] + [FACTS[0][1]]
    pairs = [{"prompt": [{"role": "user", "content": q}], "chosen": a, "rejected": w}
             for (q, a), w in zip(FACTS, wrong)] * 3
    (root / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in pairs), encoding="utf-8")
    rows = [{"prompt": q, "completion": " " + c, "label": good} for (q, a), w in zip(FACTS, wrong)
            for c, good in ((a, True), (w, False))] * 2
    (root / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    prompts = [{"prompt": [{"role": "user", "content": q}], "answer": a} for q, a in FACTS]
    (root / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in prompts), encoding="utf-8")
    (root / "corpus.jsonl").write_text("".join(json.dumps({"text": " ".join(texts[i:i + 4])}) + "\n"
                                               for i in range(0, 16, 2)) * 4, encoding="utf-8")
    (root / "examples").symlink_to(REPO / "examples")
    speech_files(root)
    stand_ins["/models/Qwen2-VL-2B-Instruct"] = str(vision_files(root))
    (root / "cfg.yaml").write_text(
        f"model: {{path: {stand_ins['/models/Llama-3.2-1B']}, dtype: float32}}\n"
        "data: {path: chats.jsonl, max_seq_length: 64}\n"
        "lora: {r: 4, alpha: 8}\n"
        "train: {output_dir: runs/ddp, max_steps: 2, batch_size: 2, progress: false}\n", encoding="utf-8")
    return root, stand_ins


def speech_files(root: Path):
    """What the speech lines read: espeak-ng clips with train/eval manifests, and a codec directory (SNAC with
    random weights: no codec weights ship offline) with a text-to-speech data set of those clips."""
    from speech_fixtures import make_clips
    clips = make_clips(root / "clips", [q for q, _ in FACTS[:4]])
    for name, part in (("train.jsonl", clips[:3]), ("eval.jsonl", clips[3:])):
        (root / "clips" / name).write_text("".join(json.dumps({"audio": c.path.name, "text": c.text}) + "\n"
                                                   for c in part), encoding="utf-8")
    (root / "speech.jsonl").write_text("".join(json.dumps({"text": c.text, "audio": f"clips/{c.path.name}"}) + "\n"
                                               for c in clips), encoding="utf-8")
    from velotune.audio.codecs.snac import SnacCodec
    SnacCodec.from_config(seed=0).save(root / "codecs" / "snac_24khz")


def vision_files(root: Path) -> Path:
    """What the vision lines read: digit images with their conversations, a short video, and a tiny Qwen2-VL
    (random weights)."""
    from test_vision_video import tiny_video
    from velotune.bench.tiny_vlm_families import make_tiny_qwen2_vl
    from vision_fixtures import QUESTION, digit_pngs, digit_records, write_jsonl
    tiny_video(root / "clip.mp4", frames=6, size=28)
    items = digit_pngs(root / "digits", 8, size=24)
    write_jsonl(root / "digits" / "train.jsonl", digit_records(items, root / "digits"))
    return make_tiny_qwen2_vl(root / "models" / "qwen2_vl", [QUESTION, " ".join("0123456789")] * 30)


def substitute(text: str, stand_ins: dict) -> str:
    for old, new in {**STAND_INS, **stand_ins}.items():
        text = text.replace(old, new)
    return text


def env():
    bin_dir = str(Path(sys.executable).parent)
    return dict(os.environ, PATH=bin_dir + os.pathsep + os.environ.get("PATH", ""), OMP_NUM_THREADS="1",
                PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))


def run_line(line: str, cwd: Path, stand_ins: dict):
    line = substitute(line, stand_ins)
    if line.startswith("velotune serve "):
        return run_server(line, cwd)
    given = "Hello\n/quit\n" if line.startswith("velotune chat ") else None
    proc = subprocess.run(["bash", "-c", line], cwd=cwd, env=env(), input=given, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, f"{line}\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    return proc.stdout


def run_server(line: str, cwd: Path):
    """Starts the server line on a free port, asks it one chat question with the README's key, stops it."""
    import httpx
    port = free_port()
    args = shlex.split(line) + ["--port", str(port), "--threads", "1"]
    if "--embedding-model" in args:
        return ask_embeddings(args, port, cwd)
    if "--speech-model" in args:
        return ask_speech(args, port, cwd)
    if "--tts-model" in args:
        return ask_tts(args, port, cwd)
    with serving(args, port, cwd=cwd, env=env()) as url:
        key = args[args.index("--api-key") + 1]
        model = args[args.index("--adapter") + 1].partition("=")[0]
        answer = httpx.post(url + "/v1/chat/completions", headers={"Authorization": f"Bearer {key}"}, timeout=60,
                            json={"model": model, "messages": [{"role": "user", "content": "Who rules Vell?"}],
                                  "max_tokens": 4})
    assert answer.status_code == 200, answer.text
    assert answer.json()["choices"][0]["message"]["role"] == "assistant"
    return answer.text


def ask_speech(args: list, port: int, cwd: Path):
    """Starts a speech server line, asks it to transcribe a clip, stops it."""
    import httpx
    model = args[args.index("--speech-model") + 1].partition("=")[0]
    with serving(args, port, cwd=cwd, env=env()) as url:
        clip = (cwd / "clips" / "clip_00.wav").read_bytes()
        answer = httpx.post(url + "/v1/audio/transcriptions", timeout=120, data={"model": model},
                            files={"file": ("clip_00.wav", clip, "audio/wav")})
    assert answer.status_code == 200 and isinstance(answer.json()["text"], str), answer.text
    return answer.text


def ask_tts(args: list, port: int, cwd: Path):
    """Starts a text-to-speech server line, asks it to say a few words, stops it."""
    import httpx
    model = args[args.index("--tts-model") + 1].partition("=")[0]
    with serving(args + ["--tts-max-new-tokens", "21"], port, cwd=cwd, env=env()) as url:
        answer = httpx.post(url + "/v1/audio/speech", timeout=120, json={"model": model, "input": "Hello there.",
                                                                        "voice": ""})
    assert answer.status_code == 200 and answer.content[:4] == b"RIFF", answer.text[:300]
    return ""


def ask_embeddings(args: list, port: int, cwd: Path):
    """Starts an embedding server line, asks it for the embeddings of two texts, stops it."""
    import httpx
    model = args[args.index("--embedding-model") + 1].partition("=")[0]
    with serving(args, port, cwd=cwd, env=env()) as url:
        answer = httpx.post(url + "/v1/embeddings", timeout=60, json={"model": model, "input": ["a", "b"]})
    assert answer.status_code == 200, answer.text
    assert [len(d["embedding"]) for d in answer.json()["data"]] == [384, 384]
    return answer.text


def test_skip_list_names_lines_that_exist():
    lines = [line for lang, code in readme_blocks() if lang == "bash" for line in shell_lines(code)]
    for prefix in NOT_RUN:
        assert any(line.startswith(prefix) for line in lines), f"NOT_RUN entry {prefix!r} is no longer in the README"
    for text in STAND_INS:
        assert text in README.read_text(encoding="utf-8"), f"stand-in for {text!r} has nothing to stand in for"


@pytest.mark.slow
def test_every_readme_block_runs(workdir):
    """In README order, in one directory, as a user would paste them: later lines use what earlier ones wrote."""
    root, stand_ins = workdir
    ran = 0
    for lang, code in readme_blocks():
        if lang == "python":
            script = root / f"readme_block_{ran}.py"
            script.write_text(substitute(code, stand_ins), encoding="utf-8")
            run_line(f"{shlex.quote(sys.executable)} {script.name}", root, {})
            ran += 1
            continue
        for line in shell_lines(code):
            if not skipped(line):
                run_line(line, root, stand_ins)
                ran += 1
    assert ran >= 12
    # What the lines promised is there.
    assert (root / "runs" / "mine" / "adapter" / "adapter_config.json").is_file()
    assert (root / "runs" / "py" / "adapter" / "adapter_model.safetensors").is_file()
    assert (root / "merged" / "config.json").is_file() and (root / "mine.gguf").is_file()
    assert (root / "mine.Modelfile").is_file()
    assert (root / "runs" / "ddp" / "adapter" / "adapter_config.json").is_file()
    assert (root / "runs" / "embeddings" / "embedder" / "modules.json").is_file() and (root / "texts.npy").is_file()
    for method in ("dpo", "orpo", "simpo", "kto", "grpo"):
        assert (root / "runs" / method / "adapter" / "adapter_model.safetensors").is_file()
