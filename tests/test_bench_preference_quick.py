"""The DPO and GRPO benchmarks keep working: their quick modes run end to end from the clone's scripts (no speed is
asserted: the real figures are in benchmarks/results/dpo-cpu-llama-56m.md and grpo-cpu-llama-56m.md)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_quick_dpo_benchmark_runs_both_systems(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "dpo_bench.py"), "--quick", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=600, cwd=str(REPO))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    report = json.loads((tmp_path / "dpo-cpu-tiny.json").read_text())
    case = report["cases"][0]
    assert set(case["systems"]) == {"velotune", "trl"} and all(s["ok"] for s in case["systems"].values())
    # The policy starts as the reference on both sides: the first DPO loss is log 2.
    assert [s["first_loss"] for s in case["systems"].values()] == pytest.approx([0.693147] * 2, abs=1e-5)
    assert case["ratios"]["trl"]["speed"] > 0 and report["machine"]["versions"]["trl"]
    assert "## Peak memory as the vocabulary grows" in (tmp_path / "dpo-cpu-tiny.md").read_text()


@pytest.mark.slow
def test_quick_grpo_benchmark_runs_both_systems(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "grpo_bench.py"), "--quick", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=600, cwd=str(REPO))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    report = json.loads((tmp_path / "grpo-cpu-tiny.json").read_text())
    systems = report["systems"]
    assert set(systems) == {"velotune", "trl"} and all(s["ok"] for s in systems.values())
    # Both sampled completions of the set length (random weights rarely sample EOS) and trained on them.
    for runs in report["runs"].values():
        assert all(length > 0 for length in runs[0]["completion_lengths"])
    assert "| trl |" in (tmp_path / "grpo-cpu-tiny.md").read_text()


@pytest.mark.slow
def test_grpo_addition_comparison_runs(tmp_path):
    """The reward-reached comparison with TRL (benchmarks/grpo_addition.py) in a short form: it builds its model and
    data, runs the SFT, and both GRPO trainers, and writes its table."""
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "grpo_addition.py"), "--seeds", "1", "--steps",
                           "12", "--out", str(tmp_path)], capture_output=True, text=True, timeout=600, cwd=str(REPO))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    report = json.loads((tmp_path / "grpo-addition-cpu.json").read_text())
    assert set(report["seeds"]["1"]) == {"velotune", "trl"} and report["steps"] == 12
    assert "| mean |" in (tmp_path / "grpo-addition-cpu.md").read_text()
