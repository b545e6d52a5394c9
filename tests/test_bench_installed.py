"""`velotune bench` works from an installed package: a copy of velotune/ alone (no benchmarks/ folder beside it,
as in a wheel) runs the quick benchmark from an unrelated directory and writes ./velotune-bench-results there."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "velotune"


def test_bench_runs_from_a_copy_of_the_package_alone(tmp_path):
    site, work = tmp_path / "site", tmp_path / "work"
    shutil.copytree(PACKAGE, site / "velotune", ignore=shutil.ignore_patterns("__pycache__"))
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(PYTHONPATH=str(site), OMP_NUM_THREADS="1")
    where = subprocess.run([sys.executable, "-c", "import velotune; print(velotune.__file__)"], env=env, cwd=work,
                           capture_output=True, text=True, timeout=60)
    assert where.stdout.strip() == str(site / "velotune" / "__init__.py")  # the copy, not this clone
    proc = subprocess.run([sys.executable, "-m", "velotune", "bench", "--quick", "--methods", "lora", "--systems",
                           "velotune"], env=env, cwd=work, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    report = json.loads((work / "velotune-bench-results" / "train-cpu-tiny.json").read_text())
    assert report["machine"]["command"] == "velotune bench --quick --methods lora --systems velotune"
    assert report["machine"]["velotune"]["commit"] is None  # an installed copy is not this clone's git checkout
    system = report["cases"][0]["systems"]["velotune"]
    assert system["ok"] and system["target_tokens_per_s"] > 0 and system["utilisation"] > 0
    assert sorted(p.name for p in work.iterdir()) == ["velotune-bench-results"]  # nothing else written here
