"""Vision-language fine-tuning, velotune vs transformers' LLaVA + PEFT, side by side (each system in its own process).

The code is velotune.bench.vision (also `velotune bench --vision`); this script runs it from a clone, with the same
options:

    python benchmarks/vision_bench.py           # CPU, fp32: a 224 px LLaVA shape, LoRA r=16 on its language model
    python benchmarks/vision_bench.py --quick   # the tiny LLaVA, 2 conversations a step, 1 + 2 steps: seconds
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this clone's velotune, installed or not

from velotune.bench.vision import main  # noqa: E402

if __name__ == "__main__":
    main()
