"""The utilisation figure's parts: the model-FLOP count against a hand count, the work of a batch, and which peak
it divides by (measured torch.mm, a GPU's table peak, or --peak-tflops)."""
import torch

from velotune.bench.flops import device_peak_tflops, lora_params, matmul_params, step_work, training_flops
from velotune.bench.report import choose_peak

# hidden 8, 2 layers, 2 heads of 4 (q width 8), 1 kv head (k, v width 4), MLP 16, vocabulary 10
TINY = dict(hidden_size=8, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, intermediate_size=16,
            vocab_size=10)


def test_weights_in_matmuls_by_hand():
    per_layer = 8 * 8 + 8 * 4 + 8 * 4 + 8 * 8 + 8 * 16 + 8 * 16 + 16 * 8   # q k v o gate up down = 576
    assert matmul_params(TINY) == 2 * per_layer + 8 * 10 == 1232           # + the head, not the embedding
    lora_per_layer = 2 * ((8 + 8) + (8 + 4) + (8 + 4) + (8 + 8) + (8 + 16) + (8 + 16) + (16 + 8))  # r = 2: 256
    assert lora_params(TINY, rank=2) == 2 * lora_per_layer == 512          # no adapter on the head


def test_training_flops_by_hand():
    """4 real tokens attending to 1, 2, 1, 2 keys (two packed documents): full 6N per token, LoRA 4N + 6N_lora,
    plus attention 12 x layers x q width x keys."""
    attention = 12 * 2 * 8 * (1 + 2 + 1 + 2)                                # 1152
    assert training_flops(TINY, "full", tokens=4, context_sum=6) == 6 * 1232 * 4 + attention == 30720
    assert training_flops(TINY, "lora", 4, 6, lora_rank=2) == (4 * 1232 + 6 * 512) * 4 + attention == 33152
    assert training_flops(TINY, "qlora", 4, 6, lora_rank=2) == 33152  # dequantization is not model arithmetic


def test_causal_attention_matches_the_usual_estimate():
    """A full causal row of T tokens: 12 d sum(t + 1) = 6 d T (T + 1), the usual 2*2*T*d per token x3 / 2 up to
    the (T + 1) / T of the diagonal."""
    T, d, layers = 1024, 8, 2
    tokens, context = step_work({"input_ids": torch.ones(1, T, dtype=torch.long)})
    assert (tokens, context) == (T, T * (T + 1) // 2)
    ours = training_flops(TINY, "full", tokens, context) - 6 * matmul_params(TINY) * T
    usual = layers * T * (2 * 2 * T * d * 3 / 2)
    assert ours == usual * (T + 1) / T


def test_step_work_counts_real_tokens_and_their_keys():
    packed = {"input_ids": torch.tensor([[5, 6, 7, 8, 0]]), "position_ids": torch.tensor([[0, 1, 0, 1, 0]])}
    assert step_work(packed) == (4, 1 + 2 + 1 + 2)                         # the pad (id 0) does no work
    padded = {"input_ids": torch.tensor([[0, 6, 7]]), "attention_mask": torch.tensor([[0, 1, 1]])}
    assert step_work(padded) == (2, 1 + 2)
    assert step_work({"input_ids": torch.zeros(2, 3, dtype=torch.long)}) == (6, 2 * (1 + 2 + 3))


def test_gpu_peak_table():
    assert device_peak_tflops("NVIDIA H100 80GB HBM3", "bfloat16") == 989.0
    assert device_peak_tflops("NVIDIA H100 PCIe", "float16") == 756.0
    assert device_peak_tflops("NVIDIA H200", "bfloat16") == 989.0
    assert device_peak_tflops("NVIDIA H20", "bfloat16") == 148.0
    assert device_peak_tflops("NVIDIA A100-SXM4-80GB", "bfloat16") == 312.0
    assert device_peak_tflops("NVIDIA H100 80GB HBM3", "float32") is None   # no table for fp32: measured instead
    assert device_peak_tflops("Some Future GPU", "bfloat16") is None


def test_which_peak_utilisation_divides_by():
    measured = [{"ok": True, "matmul_tflops": m, "shapes": [], "device_name": "NVIDIA H100 80GB HBM3"}
                for m in (600.0, 640.0, 620.0)]
    cuda = dict(device="cuda", dtype="bfloat16", peak_tflops=None)
    assert choose_peak(cuda, measured)["tflops"] == 989.0
    assert choose_peak(cuda, measured)["matmul_tflops"] == 620.0               # the median, kept beside it
    assert choose_peak(dict(cuda, peak_tflops=500.0), measured)["source"] == "--peak-tflops"
    cpu = choose_peak(dict(device="cpu", dtype="float32", peak_tflops=None),
                      [{"ok": True, "matmul_tflops": 0.1, "shapes": [], "device_name": "cpu"}, {"ok": False}])
    assert cpu["tflops"] == 0.1 and "measured" in cpu["source"]
    assert choose_peak(dict(device="cpu", dtype="float32", peak_tflops=None), [{"ok": False}])["tflops"] is None
