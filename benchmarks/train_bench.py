"""Training speed, memory and utilisation: velotune against transformers + peft, side by side.

The code is velotune.bench.train (so `velotune bench` runs it from an installed package too); this script runs it
from a clone, with the same options:

    python benchmarks/train_bench.py                  # CPU: LoRA, QLoRA, full on a 56M Llama shape (~10 min)
    python benchmarks/train_bench.py --quick          # tiny shapes, under a minute
    python benchmarks/train_bench.py --device cuda    # Llama-3.1-8B-shaped QLoRA / LoRA, 1B full, long context
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this clone's velotune, installed or not

from velotune.bench.train import main  # noqa: E402

if __name__ == "__main__":
    main()
