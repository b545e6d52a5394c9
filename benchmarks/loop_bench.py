"""A training loop written for transformers (`out = model(input_ids=ids, labels=ids); out.loss.backward();
optimizer.step()`), run unchanged over velotune's model and over transformers + peft, side by side.

The code is velotune.bench.loop (also `velotune bench --loop`); this script runs it from a clone, with the same
options:

    python benchmarks/loop_bench.py                     # CPU, fp32: Qwen2 shape, hidden 384, 6 layers, 2 x 1024
    python benchmarks/loop_bench.py --dtype bfloat16    # the same in bf16
    python benchmarks/loop_bench.py --quick             # tiny shapes, under a minute
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this clone's velotune, installed or not

from velotune.bench.loop import main  # noqa: E402

if __name__ == "__main__":
    main()
