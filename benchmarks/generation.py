"""Generation speed: velotune's decoder against transformers' `generate`, same model, same prompts, greedy.

The code is velotune.bench.generation; this script runs it from a clone, with the same options:

    python benchmarks/generation.py            # CPU: a ~56M-parameter Llama shape, vocab 32000, random weights
    python benchmarks/generation.py --quick    # under 30 s
    python benchmarks/generation.py --device cuda
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this clone's velotune, installed or not

from velotune.bench.generation import main  # noqa: E402

if __name__ == "__main__":
    main()
