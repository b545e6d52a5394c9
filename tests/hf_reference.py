"""Shrunk configs of each supported architecture, and Hugging Face reference checkpoints built from them."""
from __future__ import annotations

import json

import torch

BASE = dict(vocab_size=211, hidden_size=64, intermediate_size=112, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-6, tie_word_embeddings=False)

# Parity inputs are 19 tokens long: every sliding window below is 8, so the window cuts off most keys.
WINDOW = 8


def _longrope(dim_half: int) -> dict:
    return {"rope_type": "longrope", "short_factor": [1.0 + 0.1 * i for i in range(dim_half)],
            "long_factor": [1.0 + 0.7 * i for i in range(dim_half)], "original_max_position_embeddings": 12}


# case name -> config overrides; the family is the part before the first "_". Each case exercises what is
# special about the family: head_dim != hidden/heads, tied/untied, sliding windows, soft-capping, RoPE types.
SHRUNK = {
    "llama": dict(head_dim=24, rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                            "high_freq_factor": 4.0, "original_max_position_embeddings": 128}),
    "llama_tied": dict(tie_word_embeddings=True),
    "mistral": dict(head_dim=24, sliding_window=WINDOW),
    "mistral_tied": dict(tie_word_embeddings=True, sliding_window=None),
    "qwen2": dict(use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1),
    "qwen2_tied": dict(tie_word_embeddings=True, head_dim=24),
    "qwen2_legacywindow": dict(use_sliding_window=True, sliding_window=WINDOW, max_window_layers=0),
    "qwen2_yarn": dict(rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}),
    "qwen3": dict(head_dim=24),
    "qwen3_window": dict(tie_word_embeddings=True, attention_bias=True, use_sliding_window=True,
                         sliding_window=WINDOW, max_window_layers=0),
    "gemma": dict(head_dim=24, tie_word_embeddings=False, pad_token_id=3),
    "gemma_tied": dict(tie_word_embeddings=True, num_key_value_heads=1),
    # initializer_range 0.1: attention scores large enough for the 1.0 soft-cap to bite.
    "gemma2": dict(head_dim=24, tie_word_embeddings=False, sliding_window=WINDOW, query_pre_attn_scalar=16,
                   initializer_range=0.1, attn_logit_softcapping=1.0, final_logit_softcapping=2.0),
    "gemma2_tied": dict(head_dim=16, sliding_window=WINDOW, query_pre_attn_scalar=20,
                        layer_types=["full_attention", "sliding_attention"],
                        attn_logit_softcapping=None, final_logit_softcapping=None),
    "phi3": dict(pad_token_id=0, partial_rotary_factor=0.5, sliding_window=WINDOW),
    "phi3_tied": dict(pad_token_id=0, tie_word_embeddings=True, head_dim=24),
    "phi3_longrope": dict(pad_token_id=0, partial_rotary_factor=0.75, rope_scaling=_longrope(6),
                          original_max_position_embeddings=12),
}


def _legacy_rope(config: dict, rope_type_name: str | None = None):
    """Rewrites transformers 5's `rope_parameters` the way older hub configs spell it: top-level
    `rope_theta` / `partial_rotary_factor` and a `rope_scaling` dict keyed by "type"."""
    params = dict(config.pop("rope_parameters"))
    config["rope_theta"] = params.pop("rope_theta")
    if "partial_rotary_factor" in params:
        config["partial_rotary_factor"] = params.pop("partial_rotary_factor")
    kind = params.pop("rope_type")
    config["rope_scaling"] = {"type": rope_type_name or kind, **params}


# case -> edit of the saved config.json: the shapes older checkpoints have, which transformers reads the same way.
CONFIG_EDITS = {
    "qwen2_legacywindow": lambda c: c.pop("layer_types"),     # the window layers come from max_window_layers
    "qwen2_yarn": lambda c: _legacy_rope(c),
    "gemma_tied": lambda c: (c.pop("head_dim"), c.update(hidden_act="gelu")),  # head_dim 256 by default; gelu = tanh
    "gemma2": lambda c: c.pop("layer_types"),                 # alternating, sliding first, by default
    "phi3_longrope": lambda c: _legacy_rope(c, "su"),          # Phi-3's old name for longrope
}


def hf_config(model_type: str, **overrides):
    from transformers import AutoConfig
    family = model_type.split("_")[0]
    kwargs = {**BASE, **SHRUNK.get(model_type, {}), **overrides}
    return AutoConfig.for_model(family, **kwargs)


def make_hf_model(model_type: str, dtype=torch.float32, **overrides):
    """A random transformers model of a shrunk config, eager attention, with random norms and biases."""
    from transformers import AutoModelForCausalLM
    torch.manual_seed(1234)
    config = hf_config(model_type, **overrides)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="eager")
    # Random norms: ones/zeros at init would hide a wrong norm convention.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(0.0 if model_type.startswith("gemma") else 1.0, 0.1)
            elif p.dim() == 1:
                p.normal_(0.0, 0.05)
    return model.eval()


def make_checkpoint(tmp_path, model_type: str, dtype=torch.float32, **overrides):
    """Builds a random transformers model, saves it in Hugging Face layout, returns (dir, hf_model)."""
    model = make_hf_model(model_type, dtype, **overrides)
    out = tmp_path / model_type
    model.save_pretrained(str(out))
    edit = CONFIG_EDITS.get(model_type)
    if edit is not None:
        path = out / "config.json"
        config = json.loads(path.read_text())
        edit(config)
        path.write_text(json.dumps(config, indent=2))
    return out, model


# case -> {feature: overrides that switch it off}: the report shows how far each feature moves the logits,
# i.e. that a model ignoring it would fail the 1e-5 parity bound by a wide margin.
ABLATIONS = {
    "llama": {"llama3 rope": dict(rope_scaling=None)},
    "mistral": {"sliding window": dict(sliding_window=None)},
    "qwen2": {"sliding window": dict(use_sliding_window=False)},
    "qwen2_legacywindow": {"sliding window": dict(use_sliding_window=False)},
    "qwen2_yarn": {"yarn rope": dict(rope_scaling=None)},
    "qwen3_window": {"sliding window": dict(use_sliding_window=False)},
    "gemma2": {"attn softcap": dict(attn_logit_softcapping=None), "final softcap": dict(final_logit_softcapping=None),
               "sliding window": dict(sliding_window=4096)},
    "gemma2_tied": {"sliding window": dict(sliding_window=4096)},
    "phi3": {"sliding window": dict(sliding_window=None), "partial rotary": dict(partial_rotary_factor=1.0)},
    "phi3_longrope": {"longrope": dict(rope_scaling=None)},
}


def _report():
    """Prints, per case, the measured fp32 relative errors against transformers and the ablation margins."""
    import tempfile
    from pathlib import Path

    import velotune as vt

    torch.set_num_threads(1)

    def rel(a, b):
        return ((a - b).norm() / b.norm().clamp(min=1e-30)).item()

    print(f"{'case':22} {'logits':>10} {'loss':>10} {'max grad':>10}  feature margins (logit change if ignored)")
    for case in SHRUNK:
        with tempfile.TemporaryDirectory() as tmp:
            path, hf = make_checkpoint(Path(tmp), case)
            ours, _ = vt.load(path, dtype="float32", device="cpu")
            g = torch.Generator().manual_seed(7)
            ids = torch.randint(0, hf.config.vocab_size, (2, 19), generator=g)
            hf_out, our_out = hf(input_ids=ids, labels=ids), ours(ids, labels=ids)
            hf_out.loss.backward()
            our_out.loss.backward()
            ref = dict(hf.named_parameters())
            grad = max(rel(p.grad, ref[n].grad) for n, p in ours.named_parameters())
            margins = []
            for feature, off in ABLATIONS.get(case, {}).items():
                with torch.no_grad():
                    other = make_hf_model(case, **off)(input_ids=ids).logits
                margins.append(f"{feature} {rel(other, hf_out.logits):.2g}")
            print(f"{case:22} {rel(our_out.logits, hf_out.logits):10.2e} "
                  f"{abs(our_out.loss.item() - hf_out.loss.item()) / hf_out.loss.item():10.2e} {grad:10.2e}  "
                  + ", ".join(margins))


if __name__ == "__main__":
    import logging
    import os
    import warnings

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    logging.disable(logging.WARNING)
    warnings.filterwarnings("ignore")
    _report()
