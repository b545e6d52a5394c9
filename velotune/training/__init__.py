"""Training: explicit state, one loop for LoRA / QLoRA / full fine-tuning, atomic checkpoints, exact resume.

`plan_run(config)` is what a run will do, found without loading weights (what `velotune train --dry-run` prints).
It is imported on first use, so that the command line's `--help` does not import torch.
"""


def __getattr__(name):
    if name == "plan_run":
        from .plan import plan_run
        return plan_run
    raise AttributeError(f"module 'velotune.training' has no attribute {name!r}")
