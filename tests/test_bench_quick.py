"""The training benchmark keeps working: its quick mode runs end to end once (no speed is asserted), and its
pieces that need no process (plan, sequence search, FLOP count, `velotune bench` wiring) behave."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))

import train_bench  # noqa: E402
from bench_worker import flops_per_step, step_work  # noqa: E402


@pytest.fixture(scope="module")
def quick_report(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "train_bench.py"), "--quick", "--out", str(out)],
                          capture_output=True, text=True, timeout=600, cwd=str(REPO))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    report = json.loads((out / "train-cpu-tiny.json").read_text())
    assert report["machine"]["command"] == f"python benchmarks/train_bench.py --quick --out {out}"
    return report, (out / "train-cpu-tiny.md").read_text()


def test_quick_mode_reports_every_case(quick_report):
    report, text = quick_report
    assert {"machine", "settings", "cases", "seq_search"} <= set(report)
    machine = report["machine"]
    assert machine["cpu_count"] >= 1 and machine["versions"]["torch"] and machine["versions"]["peft"]
    assert len(machine["velotune"]["commit"]) == 40
    assert [c["name"] for c in report["cases"]] == ["lora", "qlora", "full"]
    for case in report["cases"]:
        for name in ("velotune", "hf"):
            system = case["systems"][name]
            assert system["ok"], system
            assert system["target_tokens_per_s"] > 0 and system["input_tokens_per_s"] >= system["target_tokens_per_s"]
            assert system["peak_rss_mb"] >= system["rss_before_train_mb"] > 0
            assert system["peak_memory_mb"] == system["peak_rss_mb"]
        assert case["same_batches"], case["name"]
        assert set(case["ratios"]["velotune"]["hf"]) == {"speed", "memory", "train_extra"}
        assert case["ratios"]["velotune"]["hf"]["speed"] > 0


def test_quick_mode_trains_the_same_model_on_the_same_batches(quick_report):
    """Same random weights (the same NF4 codes for QLoRA), same first batch: the first loss of velotune and
    transformers agree in fp32 (the spread measured is ~1e-7)."""
    report, _ = quick_report
    spread = {c["name"]: c["first_loss_rel_spread"] for c in report["cases"]}
    assert all(s < 1e-5 for s in spread.values()), spread


def test_quick_mode_writes_the_markdown_table(quick_report):
    _, text = quick_report
    assert "| case | system | target tok/s | vs hf |" in text
    assert "| lora (128x1) | velotune |" in text and "## Machine" in text


def test_plan_filters_and_overrides():
    ns = train_bench.parse_args(["--methods", "full,lora", "--systems", "velotune,hf-gc", "--seq", "512",
                                 "--reps", "3"])
    plan = train_bench.make_plan(ns)
    assert [(c.method, c.seq, c.batch) for c in plan["cases"]] == [("lora", 512, 1), ("full", 512, 1)]
    assert plan["systems"] == ["velotune", "hf-gc"] and plan["reps"] == 3 and plan["dtype"] == "float32"
    with pytest.raises(SystemExit, match="unknown dora"):
        train_bench.make_plan(train_bench.parse_args(["--methods", "lora,dora"]))
    assert train_bench.make_plan(train_bench.parse_args(["--dtype", "bfloat16"]))["dtype"] == "bfloat16"
    with pytest.raises(SystemExit):
        train_bench.parse_args(["--dtype", "float16"])


def test_seq_search_doubles_then_bisects(monkeypatch):
    """Peak memory 100 MB + 1 MB per 10 tokens, budget 1000 MB: the longest fitting length on a 256 grid is 8960."""
    calls = []

    def fake_worker(spec, plan):
        calls.append(spec["seq"])
        return {"ok": True, "memory": {"peak_rss_mb": 100 + spec["seq"] / 10}}

    monkeypatch.setattr(train_bench, "run_worker", fake_worker)
    monkeypatch.setattr(train_bench, "make_spec", lambda case, system, plan, cache, **kw: {"seq": kw["seq"]})
    plan = dict(grain=256, seq_limit=65536, budget_mb=1000, device="cpu")
    case = train_bench.Case("lora", "tiny", 1024, 1)
    result = train_bench.seq_search(case, "velotune", plan, Path("unused"))
    assert result["longest"] == 8960 and not result["limit_reached"]
    assert calls[:5] == [1024, 2048, 4096, 8192, 16384]
    assert all(p["fits"] == (p["seq"] <= 9000) for p in result["probes"])


def test_flop_count_of_a_step():
    """6 N per token for full fine-tuning, 4 N + 6 N_lora for LoRA, plus causal attention 12 L d per context."""
    config = type("C", (), dict(hidden_size=8, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                                intermediate_size=16, vocab_size=10))
    n = 2 * (8 * (8 + 2 * 4) + 8 * 8 + 3 * 8 * 16) + 10 * 8
    assert flops_per_step(config, "full", 0, tokens=3, context_sum=6) == 6 * n * 3 + 12 * 2 * 8 * 6
    assert flops_per_step(config, "lora", 5, tokens=3, context_sum=6) == (4 * n + 30) * 3 + 12 * 2 * 8 * 6
    import torch
    batch = {"input_ids": torch.tensor([[5, 6, 7, 8, 0]]), "position_ids": torch.tensor([[0, 1, 0, 1, 0]])}
    assert step_work(batch) == (4, 1 + 2 + 1 + 2)


def test_velotune_bench_command(monkeypatch):
    from velotune import bench_cli
    from velotune.cli import build_parser
    from velotune.errors import VelotuneError
    ns = build_parser().parse_args(["bench", "--quick", "--methods", "lora", "--no-save"])
    assert ns.func is bench_cli._cmd_bench and ns.quick and ns.methods == "lora" and not ns.save
    module = bench_cli.load_bench_module()
    assert callable(module.run) and module.make_plan(ns)["cases"][0].shape == "tiny"
    monkeypatch.delitem(sys.modules, "velotune_train_bench")
    monkeypatch.setattr(bench_cli, "SCRIPT", Path("/nonexistent/benchmarks/train_bench.py"))
    with pytest.raises(VelotuneError, match="clone of the repository"):
        bench_cli._cmd_bench(ns)
