"""The loop benchmark: one transformers-style loop (`model(input_ids=ids, labels=ids)`, backward, AdamW) trains
velotune's model and transformers + peft alike, in this process on a tiny Qwen2 shape (the benchmark itself runs
each system in a process of its own), and its report says what it compares."""
import argparse
import json

import pytest

from velotune.bench import assets, loop, loop_worker
from velotune.bench.options import add_bench_arguments
from velotune.bench.flops import lora_params
from velotune.errors import ConfigError


def parse(argv):
    return add_bench_arguments(argparse.ArgumentParser()).parse_args(argv)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return assets.checkpoint_dir("qwen2-tiny", "float32", "cpu", tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="module")
def results(model_dir):
    spec = dict(model_dir=str(model_dir), seq=32, batch=2, steps=1, warmup=1, lr=1e-3, device="cpu",
                dtype="float32", seed=0, threads=1)
    out = {}
    for system in ("velotune", "velotune-gc", "hf", "hf-gc"):
        out[system] = dict(loop_worker.run_system(dict(spec, system=system)), ok=True, system=system, wall_s=1.0)
    return out


def test_the_same_loop_trains_both_models_alike(results, model_dir):
    """Same weights, same batches, LoRA's B at zero: the first loss agrees across systems (fp32: ~1e-7), with and
    without gradient checkpointing turned on through transformers' method names; LoRA sizes agree too."""
    config = json.loads((model_dir / "config.json").read_text())
    first = results["hf"]["first_loss"]
    assert all(abs(r["first_loss"] - first) <= 1e-5 * first for r in results.values()), results
    assert {r["trainable_params"] for r in results.values()} == {lora_params(config, 16)}
    for r in results.values():
        assert len(r["losses"]) == 2 and r["step_target_tokens"] == [2 * 31, 2 * 31]
        assert r["input_tokens_per_s"] > r["target_tokens_per_s"] > 0 and r["tflops"] > 0
        assert r["memory"]["peak_rss_mb"] >= r["memory"]["rss_before_train_mb"] > 0


def test_report_names_the_loop_and_the_goals(results):
    plan = loop.make_plan(parse(["--loop", "--quick", "--systems", "velotune,hf,hf-gc"]))
    peaks = [{"ok": True, "matmul_tflops": 0.1, "shapes": [], "device_name": "cpu", "dtype": "float32",
              "threads": 1}]
    runs = {s: [results[s]] for s in plan["systems"]}
    built = loop.build(plan, runs, peaks, info={})
    case = built["cases"][0]
    assert set(case["ratios"]["velotune"]) == {"hf", "hf-gc"}
    assert case["systems"]["velotune"]["utilisation"] == round(results["velotune"]["tflops"] / 0.1, 4)
    built["machine"] = {"command": "velotune bench --loop --quick", "cpu": "x", "cpu_count": 2, "platform": "p",
                        "python": "3", "devices": [], "versions": {}, "load_average_before": None,
                        "load_average_after": None, "duration_s": 1.0, "date": "d",
                        "velotune": {"version": "0", "commit": None, "uncommitted_changes": None}}
    text = loop.markdown(built)
    assert "        out = model(input_ids=ids, labels=ids)\n        out.loss.backward()" in text
    assert "## Goals: >= 1.5x tokens/s and <= 0.5x peak memory" in text
    assert "| system | tokens/s | peak RSS MB |" in text and "speed, memory vs hf-gc |" in text


def test_loop_plan():
    plan = loop.make_plan(parse(["--loop"]))
    assert (plan["shape"], plan["seq"], plan["batch"], plan["dtype"]) == ("qwen2-384", 1024, 2, "float32")
    assert plan["systems"] == ["velotune", "hf", "hf-gc"] and plan["threads"] == 1
    assert loop.make_plan(parse(["--loop", "--dtype", "bfloat16"]))["dtype"] == "bfloat16"
    with pytest.raises(ConfigError, match="the loop benchmark takes no --methods"):
        loop.make_plan(parse(["--loop", "--methods", "lora"]))
    with pytest.raises(ConfigError, match="--systems: unknown liger"):
        loop.make_plan(parse(["--loop", "--systems", "velotune,liger"]))
    shape = assets.SHAPES[plan["shape"]]
    assert (shape["model_type"], shape["hidden_size"], shape["num_hidden_layers"], shape["vocab_size"]) == (
        "qwen2", 384, 6, 49152)
