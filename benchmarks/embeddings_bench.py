"""Embedding training, velotune vs sentence-transformers' trainer, side by side (each system in its own process).

The code is velotune.bench.embeddings (also `velotune bench --embeddings`); this script runs it from a clone, with
the same options:

    python benchmarks/embeddings_bench.py           # CPU, fp32: all-MiniLM-L6-v2, 64 pairs a step; GradCache at 1024
    python benchmarks/embeddings_bench.py --quick   # small batches and lengths, about a minute (5 processes)
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this clone's velotune, installed or not

from velotune.bench.embeddings import main  # noqa: E402

if __name__ == "__main__":
    main()
