"""Mixture-of-experts LoRA fine-tuning, velotune vs transformers + PEFT, side by side (each system in its own process).

The code is velotune.bench.moe (also `velotune bench --moe`); this script runs it from a clone, with the same options:

    python benchmarks/moe_bench.py                   # CPU, fp32: Qwen3-MoE and Mixtral shapes, LoRA on q/k/v/o
    python benchmarks/moe_bench.py --quick           # tiny MoE shapes, 1 + 2 steps: seconds
    python benchmarks/moe_bench.py --cases mixtral   # one case
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this clone's velotune, installed or not

from velotune.bench.moe import main  # noqa: E402

if __name__ == "__main__":
    main()
