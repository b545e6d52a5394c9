"""The mixture-of-experts benchmark keeps working: its quick mode runs both systems end to end from the clone's script
on tiny Qwen3-MoE and Mixtral shapes (no speed is asserted: the real figures are in benchmarks/results/moe-cpu-*.md),
both train the same batches with the same trainable parameters from the same first loss, and its plan is what the
report says it is."""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest

from velotune.bench.cli import add_bench_parser, run_bench_command
from velotune.bench.moe import SHAPES, make_plan
from velotune.bench.options import add_bench_arguments
from velotune.errors import ConfigError

REPO = Path(__file__).resolve().parent.parent


def _ns(*argv):
    return add_bench_arguments(argparse.ArgumentParser()).parse_args(list(argv))


def test_the_plan_and_what_it_refuses():
    plan = make_plan(_ns())
    assert (plan["seq"], plan["batch"], plan["warmup"], plan["steps"], plan["reps"]) == (512, 2, 1, 3, 3)
    assert plan["cases"] == ["qwen3-moe", "mixtral"] and plan["shapes"] is SHAPES
    assert plan["methods"] == ["lora", "experts", "qlora"]
    assert (plan["dtype"], plan["precision"], plan["systems"], plan["threads"]) == ("float32", "fp32",
                                                                                     ["velotune", "hf"], 1)
    for shape in SHAPES.values():   # the shape: 8 experts, top-2, hidden 512, vocabulary 32k
        assert (shape["hidden_size"], shape["num_experts_per_tok"], shape["vocab_size"]) == (512, 2, 32000)
        assert shape.get("num_experts", shape.get("num_local_experts")) == 8
    assert make_plan(_ns("--cases", "mixtral", "--seq", "1024"))["cases"] == ["mixtral"]
    cuda = make_plan(_ns("--device", "cuda"))
    assert (cuda["precision"], cuda["dtype"]) == ("bf16", "float32")
    assert make_plan(_ns("--methods", "qlora"))["methods"] == ["qlora"]
    with pytest.raises(ConfigError, match="--methods: unknown full"):
        make_plan(_ns("--methods", "full"))
    with pytest.raises(ConfigError, match="takes no --max-seq-search"):
        make_plan(_ns("--max-seq-search"))
    with pytest.raises(ConfigError, match="--cases: unknown gpt"):
        make_plan(_ns("--cases", "gpt"))


def test_velotune_bench_takes_moe_alone():
    parser = argparse.ArgumentParser()
    add_bench_parser(parser.add_subparsers())
    with pytest.raises(ConfigError, match="choose one of .*--moe"):
        run_bench_command(parser.parse_args(["bench", "--moe", "--vision"]))


@pytest.mark.slow
def test_quick_moe_benchmark_runs_both_systems_on_the_same_batches(tmp_path):
    pytest.importorskip("peft")
    # Every method and both families, but not every pair (each pair takes ~15 s in CI): Qwen3-MoE with LoRA and
    # QLoRA, Mixtral with the experts adapted.
    cells = ((("qwen3-moe", "qwen3_moe"), "lora"), (("qwen3-moe", "qwen3_moe"), "qlora"),
             (("mixtral", "mixtral"), "experts"))
    for cases, methods in (("qwen3-moe", "lora,qlora"), ("mixtral", "experts")):
        proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "moe_bench.py"), "--quick", "--cases", cases,
                               "--methods", methods, "--out", str(tmp_path)],
                              capture_output=True, text=True, timeout=300, cwd=str(REPO))
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    for (case, model_type), method in cells:
        stem = f"moe-cpu-{case}{'' if method == 'lora' else '-' + method}-quick"
        report = json.loads((tmp_path / f"{stem}.json").read_text())
        runs = {name: results[0] for name, results in report["runs"].items()}
        assert set(runs) == {"velotune", "hf"}
        assert all(r["ok"] for r in runs.values()), {n: r.get("error") for n, r in runs.items()}
        velotune, hf = runs["velotune"], runs["hf"]
        assert velotune["timed_tokens"] == hf["timed_tokens"] == 64 * 2
        assert velotune["step_target_tokens"] == hf["step_target_tokens"] == [63] * 3
        # LoRA on q/k/v/o, both sides: 2 layers x r=16 x (64+64 + 64+32 + 64+32 + 64+64); with the experts
        # (8 a layer, hidden 64, width 64) velotune's gate, up and down each r x (64 + 64), PEFT's fused gate_up
        # r x (64 + 128) (one A for both) and down r x (64 + 64).
        attention = 2 * 16 * (128 + 96 + 96 + 128)
        mine, theirs = (2 * 8 * 16 * 3 * 128, 2 * 8 * 16 * (192 + 128)) if method == "experts" else (0, 0)
        assert (velotune["trainable_params"], hf["trainable_params"]) == (attention + mine, attention + theirs)
        assert report["same_batches"] is True and report["same_trainable_params"] is (method != "experts")
        # The same weights and tokens: fp32 rounding only (LoRA); the same NF4 codes computing in bf16 (QLoRA).
        assert report["first_loss_rel_diff"] < (1e-5 if method == "lora" else 1e-3)
        # transformers as it loads by default: its own attention and experts implementations, recorded.
        assert hf["attn_implementation"] and hf["experts_implementation"]
        for name in ("velotune", "hf"):
            s = report["systems"][name]
            assert s["ok"] and s["input_tokens_per_s"] > 0 and s["tokens_per_cpu_s"] > 0
            assert s["peak_memory_mb"] >= s["rss_before_train_mb"] > 0 and s["train_extra_mb"] is not None
        assert set(report["ratios"]) == {"speed", "tokens_per_s", "input_tokens_per_s", "tokens_per_cpu_s", "memory",
                                          "train_extra"}
        assert all(v is not None and v > 0 for k, v in report["ratios"].items() if k != "train_extra")
        settings = report["settings"]
        assert settings["model"]["model_type"] == model_type and settings["quick"] is True
        # QLoRA computes in bf16 where the CPU has bf16 instructions, else in fp32 (emulated bf16 is ~40x slower).
        from velotune.bench.moe import qlora_dtype
        assert settings["method"] == method and settings["dtype"] == (qlora_dtype("cpu") if method == "qlora"
                                                                      else "float32")
        if method == "qlora":
            words = {"bfloat16": "NF4 base, bf16 compute", "float32": "NF4 base, fp32 compute"}[settings["dtype"]]
            assert words in (tmp_path / f"{stem}.md").read_text()
        assert settings["lora_targets"] == ["q_proj", "k_proj", "v_proj", "o_proj"] and settings["parameters"] > 0
        assert settings["goals"] == {"speed": 2.0, "memory": 0.5}
        assert report["machine"]["versions"]["transformers"] and report["machine"]["load_average_before"] is not None
        text = (tmp_path / f"{stem}.md").read_text()
        assert "| velotune |" in text and "| hf |" in text and "| velotune / hf |" in text
        assert ("target_parameters" if method == "experts" else "not on the experts") in text
        assert "load average before / after" in text
