"""A tiny Llama-shaped checkpoint for the demo, built from a config with seeded random weights.

The directory it writes is a complete Hugging Face checkpoint (config.json, model.safetensors, tokenizer files,
generation_config.json): `velotune.load` and `transformers.AutoModelForCausalLM` both load it.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

# Shapes by name. "demo" is what `velotune demo` trains: 3.4M parameters, untied embeddings so that LoRA plus a
# fully trained lm_head (modules_to_save) can fit the data set (the frozen random head of a random base caps the
# logits, and plain LoRA stalls). "test" is smaller still, with tied embeddings, for unit tests.
SIZES = {
    "demo": dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, tie_word_embeddings=False),
    "test": dict(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, tie_word_embeddings=True),
}
INIT_STD = 0.02  # transformers' `initializer_range` for Llama: every Linear and the embedding


def demo_config(tokenizer, size: str = "demo", max_position_embeddings: int = 512) -> dict:
    """config.json for a Llama of the named size whose vocabulary is exactly the tokenizer's."""
    if size not in SIZES:
        raise ValueError(f"size={size!r}: expected one of {', '.join(SIZES)}")
    shape = SIZES[size]
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": len(tokenizer),
        "hidden_size": shape["hidden_size"],
        "intermediate_size": shape["intermediate_size"],
        "num_hidden_layers": shape["num_hidden_layers"],
        "num_attention_heads": shape["num_attention_heads"],
        "num_key_value_heads": shape["num_key_value_heads"],
        "head_dim": shape["hidden_size"] // shape["num_attention_heads"],
        "hidden_act": "silu",
        "max_position_embeddings": max_position_embeddings,
        "initializer_range": INIT_STD,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "rope_scaling": None,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "pretraining_tp": 1,
        "tie_word_embeddings": shape.get("tie_word_embeddings", False),
        "use_cache": True,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        "torch_dtype": "float32",
    }
    return config


def init_weights(config: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights under checkpoint names, as transformers initialises a Llama: N(0, 0.02) for matrices and
    the embedding (its padding row zero), ones for norms. Seeded, so the same seed gives the same tensors."""
    from ..models.build import parameters_on_meta, skip_weight_init
    from ..models.llama import Args, Model
    args = Args.from_dict(config)
    with skip_weight_init(), parameters_on_meta():  # shapes only (see build.py: not `with torch.device("meta")`)
        shapes = {k: v.shape for k, v in Model(args).state_dict().items()}
    if args.tie_word_embeddings:
        shapes.pop("lm_head.weight", None)
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for name, shape in shapes.items():
        if name.endswith("norm.weight"):
            state[name] = torch.ones(shape)
        else:
            state[name] = torch.empty(shape).normal_(0.0, config["initializer_range"], generator=gen)
    pad = config.get("pad_token_id")
    if pad is not None:
        state["model.embed_tokens.weight"][pad] = 0.0
    return state


def build_demo_checkpoint(out_dir, tokenizer, seed: int = 0, size: str = "demo") -> Path:
    """Writes a randomly initialised tiny Llama with `tokenizer` to `out_dir` (replacing it) and returns the path."""
    from ..models import checkpoint as ckpt
    config = demo_config(tokenizer, size)
    state = init_weights(config, seed)
    out_dir = Path(out_dir)
    with ckpt.atomic_dir(out_dir, overwrite=True) as tmp:
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        generation = {"bos_token_id": config["bos_token_id"], "eos_token_id": config["eos_token_id"],
                      "pad_token_id": config["pad_token_id"]}
        (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n", encoding="utf-8")
        ckpt.save_safetensors(state, tmp)
        tokenizer.save_pretrained(str(tmp))
    return out_dir


# The training recipe measured to fit the bundled data set with the "demo" size (nested as velotune's config
# sections; model.path and output paths are the caller's). Measured with a plain loop (batches of 16 whole samples,
# loss on the answer and <|im_end|>), one torch thread: 300 steps take ~60 s on a shared 2-core machine, end near
# loss 0.003 and reproduce 389-390 of the 390 answers greedily (seeds 0-2). LoRA without the trained lm_head
# stalls at loss ~2.6: a frozen random head caps the logits. Two threads on a busy 2-core machine were 2x slower.
DEMO_RECIPE = {
    "finetune": {"method": "lora"},
    "lora": {"r": 16, "alpha": 16, "dropout": 0.0, "targets": "all-linear", "modules_to_save": ["lm_head"]},
    "data": {"format": "messages", "train_on": "assistant", "max_seq_length": 64, "packing": False},
    "train": {"seed": 0, "max_steps": 200, "batch_size": 16, "grad_accum": 1, "lr": 3e-3, "weight_decay": 0.0,
              "scheduler": "cosine", "warmup_steps": 10, "max_grad_norm": 1.0, "precision": "fp32"},
}
# A shorter run (same recipe, schedule over these steps): every DEMO_QUESTIONS answer right by step 75-100.
QUICK_STEPS = 150
