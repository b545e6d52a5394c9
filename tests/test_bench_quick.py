"""The training benchmark keeps working: its quick mode runs end to end once from the clone's script (no speed is
asserted), and its pieces that need no process (plan, sequence search, `velotune bench` wiring) behave."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from velotune.bench import train
from velotune.bench.options import add_bench_arguments
from velotune.errors import ConfigError

REPO = Path(__file__).resolve().parent.parent


def parse(argv):
    import argparse
    return add_bench_arguments(argparse.ArgumentParser()).parse_args(argv)


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
            assert system["utilisation"] == round(system["tflops"] / case["peak"]["tflops"], 4) > 0
        assert case["same_batches"], case["name"]
        assert set(case["ratios"]["velotune"]["hf"]) == {"speed", "memory", "train_extra"}
        assert case["ratios"]["velotune"]["hf"]["speed"] > 0


def test_quick_mode_measures_the_matmul_peak_once_per_shape(quick_report):
    """On the CPU the peak is torch.mm at the model's shapes, in this run: the three cases share one shape and
    token count, so one measurement (per repetition) serves them all."""
    report, _ = quick_report
    peaks = [c["peak"] for c in report["cases"]]
    assert all(p == peaks[0] for p in peaks)
    assert peaks[0]["tflops"] == peaks[0]["matmul_tflops"] > 0 and "measured" in peaks[0]["source"]
    assert [s["name"] for s in peaks[0]["matmul_shapes"]] == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                              "up_proj", "down_proj", "lm_head"]
    assert peaks[0]["matmul_shapes"][-1]["shape"] == [128, 64, 2048]  # tokens x hidden x vocab


def test_quick_mode_trains_the_same_model_on_the_same_batches(quick_report):
    """Same random weights (the same NF4 codes for QLoRA), same first batch: the first loss of velotune and
    transformers agree in fp32 (the spread measured is ~1e-7)."""
    report, _ = quick_report
    spread = {c["name"]: c["first_loss_rel_spread"] for c in report["cases"]}
    assert all(s < 1e-5 for s in spread.values()), spread


def test_quick_mode_writes_the_markdown_table(quick_report):
    _, text = quick_report
    assert "| case | system | target tok/s | vs hf |" in text and "| utilisation |" in text
    assert "| lora (128x1) | velotune |" in text and "## Machine" in text
    assert "- lora: " in text and "(torch.mm at the model's shapes, measured in this run)" in text


def test_plan_filters_and_overrides():
    ns = parse(["--methods", "full,lora", "--systems", "velotune,hf-gc", "--seq", "512", "--reps", "3"])
    plan = train.make_plan(ns)
    assert [(c.method, c.seq, c.batch) for c in plan["cases"]] == [("lora", 512, 1), ("full", 512, 1)]
    assert plan["systems"] == ["velotune", "hf-gc"] and plan["reps"] == 3 and plan["dtype"] == "float32"
    with pytest.raises(ConfigError, match="--methods: unknown dora; expected some of lora, qlora, full"):
        train.make_plan(parse(["--methods", "lora,dora"]))
    assert train.make_plan(parse(["--dtype", "bfloat16"]))["dtype"] == "bfloat16"
    with pytest.raises(SystemExit):
        parse(["--dtype", "float16"])
    cuda = train.make_plan(parse(["--device", "cuda", "--cases", "qlora-long", "--seq-grain", "16384"]))
    assert [(c.name, c.seq, c.kind) for c in cuda["cases"]] == [("qlora-long", 16384, "long")]
    assert cuda["grain"] == 16384 and cuda["dtype"] == "bfloat16"
    with pytest.raises(ConfigError, match="--cases: unknown qlora-long"):
        train.make_plan(parse(["--cases", "qlora-long"]))  # a CUDA case only
    with pytest.raises(ConfigError, match="no case left to run: --methods full and --cases lora select none"):
        train.make_plan(parse(["--methods", "full", "--cases", "lora"]))
    with pytest.raises(ConfigError, match=r"--steps \(0\)"):
        train.make_plan(parse(["--steps", "0"]))


def test_bad_option_is_one_line_from_the_script():
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "train_bench.py"), "--methods", "dora"],
                          capture_output=True, text=True, timeout=60, cwd=str(REPO))
    assert proc.returncode == 2
    assert proc.stderr.strip() == ("train_bench.py: error: --methods: unknown dora; expected some of lora, qlora, "
                                   "full")


def test_seq_search_doubles_then_bisects(monkeypatch):
    """Peak memory 100 MB + 1 MB per 10 tokens, budget 1000 MB: the longest fitting length on a 256 grid is 8960."""
    calls = []

    def fake_worker(spec, plan):
        calls.append(spec["seq"])
        return {"ok": True, "memory": {"peak_rss_mb": 100 + spec["seq"] / 10}}

    monkeypatch.setattr(train, "run_worker", fake_worker)
    monkeypatch.setattr(train, "make_spec", lambda case, system, plan, cache, **kw: {"seq": kw["seq"]})
    plan = dict(grain=256, seq_limit=65536, budget_mb=1000, device="cpu")
    case = train.Case("lora", "tiny", 1024, 1)
    result = train.seq_search(case, "velotune", plan, Path("unused"))
    assert result["longest"] == 8960 and not result["limit_reached"]
    assert calls[:5] == [1024, 2048, 4096, 8192, 16384]
    assert all(p["fits"] == (p["seq"] <= 9000) for p in result["probes"])


def test_velotune_bench_command(monkeypatch):
    from velotune.bench import cli, loop
    from velotune.cli import build_parser
    ns = build_parser().parse_args(["bench", "--quick", "--methods", "lora", "--no-save"])
    assert ns.func is cli.run_bench_command and ns.quick and ns.methods == "lora" and not ns.save and not ns.loop
    assert train.make_plan(ns)["cases"][0].shape == "tiny"
    ran = []
    monkeypatch.setattr(train, "run", lambda ns: ran.append("train"))
    monkeypatch.setattr(loop, "run", lambda ns: ran.append("loop"))
    cli.run_bench_command(ns)
    cli.run_bench_command(build_parser().parse_args(["bench", "--loop", "--quick"]))
    assert ran == ["train", "loop"]
