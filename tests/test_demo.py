"""The demo end to end: answers absent before training appear after it, and again after merging the adapter."""
import json

import torch

from velotune.cli import main


def test_demo_learns_answers_it_did_not_know(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--quick", "--threads", "1"]) == 0
    report = json.loads((out / "demo.json").read_text())
    rows = report["rows"]
    assert not any(r["expected"].lower() in r["before"].lower() for r in rows)
    learned = [r for r in rows if r["learned"]]
    # The quick run (150 steps) gets most answers right; half is a margin for the machine's arithmetic.
    assert len(learned) >= len(rows) // 2, rows
    assert all(r["merged_learned"] for r in learned), rows
    assert report["final_loss"] < 0.5
    printed = capsys.readouterr().out
    assert "before training" in printed and "after training" in printed and "merged adapter" in printed
    assert (out / "train" / "adapter" / "adapter_config.json").is_file()
    assert len((out / "train" / "metrics.jsonl").read_text().splitlines()) >= 10
    torch.set_num_threads(1)  # run_demo set the thread count for this process: restore the suite's setting
