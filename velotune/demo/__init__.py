"""`velotune demo`: a tiny Llama, a tokenizer trained on the spot, and a bundled chat data set about an invented
island, so fine-tuning shows an effect on a CPU in minutes. This package holds those assets; the run itself
(`run_demo`) is wired to the trainer separately."""
from .dataset import DATASET_PATH, DEMO_QUESTIONS, FACTS, corpus_texts, load_dataset, write_dataset
from .tokenizer import CHAT_TEMPLATE, train_demo_tokenizer

# Names from tiny_model, imported on first use: it needs torch, the data set and tokenizer do not.
_LAZY = ("DEMO_RECIPE", "QUICK_STEPS", "SIZES", "build_demo_checkpoint")


def __getattr__(name):
    if name in _LAZY:
        from . import tiny_model
        return getattr(tiny_model, name)
    raise AttributeError(f"module 'velotune.demo' has no attribute {name!r}")


def run_demo(out_dir="runs/demo", steps=None, quick=False, threads=None):
    from .run import run_demo as _run
    return _run(out_dir=out_dir, steps=steps, quick=quick, threads=threads)
