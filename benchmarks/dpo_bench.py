"""DPO training, velotune vs TRL + PEFT, side by side (each system in its own process).

The code is velotune.bench.preference (also `velotune bench --preference`); this script runs it from a clone, with
the same options:

    python benchmarks/dpo_bench.py             # CPU, fp32: the 56M Llama at vocab 32000 and 128256, 2 x 1024 tokens a pair
    python benchmarks/dpo_bench.py --quick     # tiny shapes, under a minute
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this clone's velotune, installed or not

from velotune.bench.preference import main  # noqa: E402

if __name__ == "__main__":
    main()
