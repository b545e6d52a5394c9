"""GRPO on 2-digit additions after a short SFT: velotune against TRL's GRPOTrainer from the same checkpoint, seeds
and step budget; the reward reached is compared (velotune/bench/grpo_addition.py holds the code).

    python benchmarks/grpo_addition.py          # ~2 min; writes benchmarks/results/grpo-addition-cpu.{json,md}
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this clone's velotune, installed or not

from velotune.bench.grpo_addition import main  # noqa: E402

if __name__ == "__main__":
    main()
