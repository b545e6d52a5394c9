"""Whisper fine-tuning, velotune vs transformers' Seq2SeqTrainer + PEFT, side by side (each system in its own process).

The code is velotune.bench.whisper (also `velotune bench --whisper`); this script runs it from a clone, with the same
options:

    python benchmarks/whisper_bench.py           # CPU, fp32: the real tiny.en, LoRA r=32 on q/v, 48 clips, 8 a step
    python benchmarks/whisper_bench.py --quick   # 8 clips, 4 a step, 1 + 3 steps: about a minute
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this clone's velotune, installed or not

from velotune.bench.whisper import main  # noqa: E402

if __name__ == "__main__":
    main()
