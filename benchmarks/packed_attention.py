"""Attention over packed rows on the CPU: sample by sample, short samples together (velotune's default), dense mask.

The code is velotune.bench.packed_attention; this script runs it from a clone, with the same options:

    python benchmarks/packed_attention.py           # 2 rows of 2048 tokens, three sample-length mixes, fp32 and bf16
    python benchmarks/packed_attention.py --quick   # 2 rows of 512, one repetition
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this clone's velotune, installed or not

from velotune.bench.packed_attention import main  # noqa: E402

if __name__ == "__main__":
    main()
