"""GRPO training, velotune vs TRL + PEFT, side by side (each system in its own process).

The code is velotune.bench.grpo (also `velotune bench --grpo`); this script runs it from a clone, with
the same options:

    python benchmarks/grpo_bench.py            # CPU, fp32: the 56M Llama, 2 prompts x 8 completions a step
    python benchmarks/grpo_bench.py --quick    # tiny shapes, under a minute
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this clone's velotune, installed or not

from velotune.bench.grpo import main  # noqa: E402

if __name__ == "__main__":
    main()
