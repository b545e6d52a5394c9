"""The DPO benchmark keeps working: its quick mode runs end to end from the clone's script (no speed is asserted:
the real figures are in benchmarks/results/dpo-cpu-llama-56m.md), and both systems start from the same loss."""
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
