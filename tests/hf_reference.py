"""Shrunk configs of each supported architecture, and Hugging Face reference checkpoints built from them."""
from __future__ import annotations

import torch

BASE = dict(vocab_size=211, hidden_size=64, intermediate_size=112, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-6, tie_word_embeddings=False)

# model_type -> config overrides: each exercises what is special about the family.
SHRUNK = {
    "llama": dict(head_dim=24, rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                            "high_freq_factor": 4.0, "original_max_position_embeddings": 128}),
    "llama_tied": dict(tie_word_embeddings=True),
}


def hf_config(model_type: str, **overrides):
    from transformers import AutoConfig
    family = model_type.split("_")[0]
    kwargs = {**BASE, **SHRUNK.get(model_type, {}), **overrides}
    return AutoConfig.for_model(family, **kwargs)


def make_checkpoint(tmp_path, model_type: str, dtype=torch.float32, **overrides):
    """Builds a random transformers model, saves it in Hugging Face layout, returns (dir, hf_model)."""
    from transformers import AutoModelForCausalLM
    torch.manual_seed(1234)
    config = hf_config(model_type, **overrides)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="eager")
    # Random norms: ones/zeros at init would hide a wrong norm convention.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(0.0 if "gemma" in model_type else 1.0, 0.1)
            elif p.dim() == 1:
                p.normal_(0.0, 0.05)
    out = tmp_path / model_type
    model.save_pretrained(str(out))
    return out, model.eval()
