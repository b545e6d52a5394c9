"""The vision-language benchmark keeps working: its quick mode runs both systems end to end from the clone's script
on the tiny LLaVA (no speed is asserted: the real figures are in benchmarks/results/vision-cpu-llava.md), both
train the same label tokens at every step from the same first loss, and its plan is what the report says it is."""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest

from velotune.bench.cli import add_bench_parser, run_bench_command
from velotune.bench.options import add_bench_arguments
from velotune.bench.vision import make_plan, scene
from velotune.errors import ConfigError

REPO = Path(__file__).resolve().parent.parent


def _ns(*argv):
    return add_bench_arguments(argparse.ArgumentParser()).parse_args(list(argv))


def test_the_plan_and_what_it_refuses():
    plan = make_plan(_ns())
    assert (plan["batch"], plan["warmup"], plan["steps"], plan["reps"]) == (8, 2, 6, 3)
    assert plan["samples"] == 8 * (2 + 6)   # one epoch of whole batches
    assert plan["case"] == dict(size="bench", image_size=224, patch_size=16)
    assert (plan["dtype"], plan["precision"], plan["systems"], plan["threads"]) == ("float32", "fp32",
                                                                                     ["velotune", "hf"], 1)
    quick = make_plan(_ns("--quick"))
    assert (quick["batch"], quick["warmup"], quick["steps"], quick["samples"]) == (2, 1, 2, 6)
    assert make_plan(_ns("--batch", "3", "--steps", "4", "--warmup", "0"))["samples"] == 12
    cuda = make_plan(_ns("--device", "cuda"))
    assert (cuda["precision"], cuda["dtype"], cuda["batch"]) == ("bf16", "float32", 32)
    with pytest.raises(ConfigError, match="takes no --seq"):
        make_plan(_ns("--seq", "128"))
    with pytest.raises(ConfigError, match="--systems: unknown trl"):
        make_plan(_ns("--systems", "trl"))


def test_scenes_are_fixed_by_their_index():
    a, b = scene(7, 64), scene(7, 64)
    assert a[1:] == b[1:] and a[0].tobytes() == b[0].tobytes()
    assert scene(7, 32)[1:] == a[1:]   # the conversation does not depend on the image size
    assert len({scene(i, 16)[0].size for i in range(12)}) > 1   # several sizes: the processors resize


def test_velotune_bench_takes_vision_alone():
    parser = argparse.ArgumentParser()
    add_bench_parser(parser.add_subparsers())
    ns = parser.parse_args(["bench", "--vision", "--whisper"])
    with pytest.raises(ConfigError, match="choose one of .*--vision"):
        run_bench_command(ns)


@pytest.mark.slow
def test_quick_vision_benchmark_runs_both_systems_on_the_same_batches(tmp_path):
    pytest.importorskip("peft")
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "vision_bench.py"), "--quick", "--out",
                           str(tmp_path)], capture_output=True, text=True, timeout=300, cwd=str(REPO))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    report = json.loads((tmp_path / "vision-cpu-llava-quick.json").read_text())
    runs = {name: results[0] for name, results in report["runs"].items()}
    assert set(runs) == {"velotune", "hf"}
    assert all(r["ok"] for r in runs.values()), {n: r.get("error") for n, r in runs.items()}
    velotune, hf = runs["velotune"], runs["hf"]
    # The same conversations in the same batches, masked the same way: as many label tokens, step by step.
    assert velotune["timed_samples"] == hf["timed_samples"] == 2 * 2
    assert velotune["step_target_tokens"] == hf["step_target_tokens"] and len(hf["step_target_tokens"]) == 3
    assert velotune["timed_tokens"] == hf["timed_tokens"] > 0
    assert velotune["trainable_params"] == hf["trainable_params"] > 0
    assert report["same_batches"] is True and report["same_trainable_params"] is True
    # The same weights, pixels and tokens: the first losses agree to fp32 rounding.
    assert report["first_loss_rel_diff"] < 1e-5
    assert hf["collate_s_per_batch"] > 0 and velotune["collate_s_per_batch"] is None
    for name in ("velotune", "hf"):
        s = report["systems"][name]
        assert s["ok"] and s["samples_per_s"] > 0 and s["model_samples_per_s"] >= s["samples_per_s"] * 0.999
        assert s["peak_memory_mb"] >= s["rss_before_train_mb"] > 0
    assert set(report["ratios"]) == {"speed", "tokens_per_s", "speed_without_collator", "speed_per_cpu_s", "memory",
                                      "train_extra"}
    assert all(v > 0 for v in report["ratios"].values())
    settings = report["settings"]
    assert settings["model"]["image_tokens"] == 16 and settings["samples"] == 6 and settings["quick"] is True
    assert report["machine"]["versions"]["transformers"] and report["machine"]["load_average_before"] is not None
    text = (tmp_path / "vision-cpu-llava-quick.md").read_text()
    assert "| velotune |" in text and "| hf |" in text and "| velotune / hf |" in text
    assert "load average before / after" in text
