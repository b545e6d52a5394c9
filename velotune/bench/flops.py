"""How much arithmetic a training step is, and what the device's peak is, for the utilisation figure.

Model FLOPs per token (what the step must compute; recomputation by gradient checkpointing is not counted):

    N      = weights that take part in matmuls: every linear of every layer and the output head (tied or not);
             not the embedding lookup, not norms or biases.
    N_lora = LoRA's own weights, r * (in + out) for each adapted linear (all linears but the head).

    full fine-tuning:   6 N                 forward 2N, backward to activations 2N, weight gradients 2N
    LoRA / QLoRA:       4 N + 6 N_lora      forward 2N, backward to activations 2N, no weight gradient for the
                                            frozen base; LoRA's small matmuls x A and (x A) B cost 2 N_lora
                                            forward, 2 N_lora backward to activations, 2 N_lora weight gradients
    attention, per token and layer:  12 * d_q * c
                                            QK^T and AV are 2 * 2 * d_q * c forward (c keys attended, d_q = heads
                                            x head_dim), x3 for forward + backward; summed over a causal row of
                                            length T, c averages (T + 1) / 2: the usual 2*2*T*d*3/2 per token.

`c` is counted exactly from the batch's position ids (a packed row restarts at each document), so
`context_sum` is the sum over real tokens of (position + 1). No torch import here: the driver uses it too.
"""
from __future__ import annotations

# Dense (no sparsity) bf16 / fp16 tensor-core peaks in TFLOP/s, by device name; the first key found in the
# name wins, so longer names come before their prefixes ("H100 PCIe" before "H100", "H200" before "H20").
GPU_PEAK_TFLOPS = (("GH200", 989.0), ("H200", 989.0), ("H100 PCIe", 756.0), ("H100 NVL", 835.0),
                   ("H100", 989.0), ("H800", 989.0), ("H20", 148.0), ("B200", 2250.0), ("B100", 1750.0),
                   ("A100", 312.0), ("A800", 312.0), ("A10G", 70.0), ("A10", 125.0), ("L40S", 362.0),
                   ("L40", 181.0), ("L4", 121.0), ("RTX 4090", 165.0), ("RTX 3090", 71.0), ("RTX A6000", 155.0))


def device_peak_tflops(device_name: str, dtype: str):
    """The table's dense peak for a GPU name in bf16 / fp16, else None (fp32, or a GPU not in the table)."""
    if dtype not in ("bfloat16", "float16"):
        return None
    return next((peak for key, peak in GPU_PEAK_TFLOPS if key in device_name), None)


def linear_shapes(config: dict) -> list:
    """(name, in_features, out_features, count) of every weight matmul of one forward pass, from config.json."""
    h, layers = config["hidden_size"], config["num_hidden_layers"]
    head_dim = config.get("head_dim") or h // config["num_attention_heads"]
    q = config["num_attention_heads"] * head_dim
    kv = config.get("num_key_value_heads", config["num_attention_heads"]) * head_dim
    inter = config["intermediate_size"]
    return [("q_proj", h, q, layers), ("k_proj", h, kv, layers), ("v_proj", h, kv, layers),
            ("o_proj", q, h, layers), ("gate_proj", h, inter, layers), ("up_proj", h, inter, layers),
            ("down_proj", inter, h, layers), ("lm_head", h, config["vocab_size"], 1)]


def matmul_params(config: dict) -> int:
    """N: weights used in matmuls per token."""
    return sum(fin * fout * count for _, fin, fout, count in linear_shapes(config))


def lora_params(config: dict, rank: int) -> int:
    """N_lora: LoRA r on every linear but the output head (peft's and velotune's "all-linear")."""
    return sum(rank * (fin + fout) * count for name, fin, fout, count in linear_shapes(config) if name != "lm_head")


def attention_width(config: dict) -> int:
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    return config["num_attention_heads"] * head_dim


def training_flops(config: dict, method: str, tokens: int, context_sum: int, lora_rank: int = 16) -> float:
    """Model FLOPs of one training step over `tokens` real tokens whose attended-key counts sum to
    `context_sum` (see the module docstring). method: "full", or "lora" / "qlora" (frozen base)."""
    n = matmul_params(config)
    per_token = 6 * n if method == "full" else 4 * n + 6 * lora_params(config, lora_rank)
    attention = 12 * config["num_hidden_layers"] * attention_width(config) * context_sum
    return float(per_token * tokens + attention)


def step_work(batch: dict, pad_id: int = 0) -> tuple[int, int]:
    """(non-padding input tokens, sum over them of the keys each attends to) for one batch of tensors: packed
    rows carry position_ids (restarting per document), padded rows an attention_mask, plain rows neither."""
    ids = batch["input_ids"]
    if "position_ids" in batch:
        real, context = ids != pad_id, batch["position_ids"] + 1
    elif "attention_mask" in batch:
        real = batch["attention_mask"] != 0
        context = batch["attention_mask"].cumsum(-1)
    else:  # every token real, one causal row each
        rows, length = ids.shape
        return rows * length, rows * length * (length + 1) // 2
    return int(real.sum()), int((context * real).sum())


def utilisation(achieved_tflops, peak_tflops):
    return round(achieved_tflops / peak_tflops, 4) if achieved_tflops and peak_tflops else None
