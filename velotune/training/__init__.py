"""Training: explicit state, one loop for LoRA / QLoRA / full fine-tuning, atomic checkpoints, exact resume."""
