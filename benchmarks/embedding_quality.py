"""Retrieval quality after fine-tuning all-MiniLM-L6-v2: velotune vs sentence-transformers' trainer, same data,
settings and evaluator. The code is velotune.bench.embedding_quality; this script runs it from a clone:

    python benchmarks/embedding_quality.py             # ~10 min on the CPU
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this clone's velotune, installed or not

from velotune.bench.embedding_quality import main  # noqa: E402

if __name__ == "__main__":
    main()
