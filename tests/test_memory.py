"""What training keeps for backward, measured with saved_tensors_hooks: the bytes of every distinct storage saved
by the autograd graph, parameters excluded (they are in memory anyway). The fused path against the plain one,
per block, with the expected byte counts written out."""
import pytest
import torch
from torch.autograd.graph import saved_tensors_hooks

from test_kernels_lora import kernels, lora_mlp_module, qlora_mlp, randomize_b
from velotune.lora import add_lora
from velotune.models.attention import Attention, AttentionMask
from velotune.models.base import next_token_loss
from velotune.models.llama import Args, Model
from velotune.models.rope import RotaryEmbedding

B, T, H, I, R = 2, 9, 64, 128, 4
N = B * T  # tokens
# Real-model shapes for the ratios quoted below (Llama-3-8B MLP, r=16): H=4096, I=14336.


def saved_bytes(run, module):
    """(bytes saved for backward by run(), parameters excluded; the saved shapes; run's result)."""
    params = {p.untyped_storage().data_ptr() for p in module.parameters()}
    storages, shapes = {}, []

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params and storage.data_ptr() not in storages:
            storages[storage.data_ptr()] = storage.nbytes()
            shapes.append(tuple(t.shape))
        return t
    with saved_tensors_hooks(pack, lambda t: t):
        out = run()
    return sum(storages.values()), shapes, out


def fused_and_plain(run, module):
    with kernels("auto"):
        fused = saved_bytes(run, module)
    with kernels("reference"):
        plain = saved_bytes(run, module)
    return fused, plain


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lora_mlp_block_saves_x_gate_up_only(dtype):
    """Plain LoRA MLP: x, x A_g, x A_u (gate/up adapters), gate (silu's input), silu(gate) and up (the product's
    operands), h (down's adapter input), h A_d: N (H + 4I + 3r) values. Fused: x, gate, up: N (H + 2I); act and
    h are recomputed in backward. Ratio (H + 2I) / (H + 4I + 3r): 0.544 here, 0.533 for Llama-3-8B at r=16.
    With bf16 bases and fp32 adapters, the plain path also keeps bf16 copies of every A and B."""
    torch.manual_seed(0)
    mlp = lora_mlp_module("silu", hidden=H, inter=I, r=R) if dtype == torch.float32 else None
    if mlp is None:
        from velotune.models.mlp import GatedMLP
        mlp = randomize_b(add_lora(GatedMLP(H, I, "silu").to(dtype), r=R, alpha=8, seed=1))  # fp32 adapters
    x = torch.randn(B, T, H, dtype=dtype, requires_grad=True)
    (fused, shapes, _), (plain, _, _) = fused_and_plain(lambda: mlp(x), mlp)
    size = dtype.itemsize
    assert fused == N * (H + 2 * I) * size and shapes == [(B, T, H), (N, I), (N, I)]
    adapter_copies = 0 if dtype == torch.float32 else 3 * R * (H + I) * size  # A.to(bf16), B.to(bf16)
    assert plain == N * (H + 4 * I + 3 * R) * size + adapter_copies
    assert fused / plain < (0.545 if dtype == torch.float32 else 0.45)


def test_qlora_mlp_block_saves_no_dequantized_weight():
    """NF4 bases: the same x, gate, up (the bases are dequantized again in backward), nothing of [out, in]."""
    pytest.importorskip("bitsandbytes")
    mlp = qlora_mlp()
    x = torch.randn(B, T, H, requires_grad=True)
    (fused, shapes, _), (plain, _, _) = fused_and_plain(lambda: mlp(x), mlp)
    assert fused == N * (H + 2 * I) * 4 and plain == N * (H + 4 * I + 3 * R) * 4
    assert not any(s in ((I, H), (H, I)) for s in shapes)


def _attention():
    args = Args(hidden_size=H, num_attention_heads=4, num_key_value_heads=2, head_dim=16, intermediate_size=I,
                num_hidden_layers=1, vocab_size=11)
    args.validate()
    torch.manual_seed(0)
    attn = randomize_b(add_lora(Attention(args, 0), r=R, alpha=8, seed=1))
    rope = RotaryEmbedding(16, 10000.0, None, 1.0, 64)(torch.arange(T)[None].expand(B, T), torch.float32)
    return attn, rope


def test_lora_attention_block_saves_no_adapter_activations():
    """Projections: plain q/k/v keep x and x A_q, x A_k, x A_v (N (H + 3r)), fused x only (N H): ratio H / (H + 3r),
    0.84 here, 0.988 at H=4096, r=16. o_proj: N (Hq D + r) against N Hq D. The whole block also holds what SDPA
    keeps (q, k, v, output, logsumexp, RoPE tables), identical in both: the block saves exactly 4 N r values
    less, a ratio of 0.957 here (attention's own activations dominate)."""
    attn, rope = _attention()
    x = torch.randn(B, T, H, requires_grad=True)
    (fused, _, _), (plain, _, _) = fused_and_plain(lambda: attn.project(x), attn)
    assert fused == N * H * 4 and plain == N * (H + 3 * R) * 4
    o_in = torch.randn(B, T, 64, requires_grad=True)
    (fused, _, _), (plain, _, _) = fused_and_plain(lambda: attn.o_proj(o_in), attn)
    assert fused == N * 64 * 4 and plain == N * (64 + R) * 4
    (fused, _, _), (plain, _, _) = fused_and_plain(lambda: attn(x, rope, AttentionMask(T, T, "cpu")), attn)
    assert plain - fused == 4 * N * R * 4 and fused / plain < 0.96


def test_loss_saves_nothing_of_vocab_size():
    """Chunked linear cross-entropy keeps d loss / d hidden [targets, H] (computed in forward) and the target
    mask; the reference keeps the logits [targets, V]. V = 1000, H = 16: ratio ~ H / V."""
    V, Hs = 1000, 16
    head = torch.nn.Linear(Hs, V, bias=False).requires_grad_(False)
    hidden = torch.randn(B, T, Hs, requires_grad=True)
    labels = torch.randint(0, V, (B, T))
    labels[0, :3] = -100
    n_targets = int((labels[:, 1:] != -100).sum())
    (fused, shapes, _), (plain, _, _) = fused_and_plain(
        lambda: next_token_loss(labels, hidden=hidden, weight=head.weight), head)
    # gradient [targets, H] fp32 + the boolean target mask [N] + the int64 target count (the mean's divisor)
    assert fused == n_targets * Hs * 4 + N + 8
    assert not any(V in s for s in shapes)
    assert plain > n_targets * V * 4 and fused / plain < 0.03


def tiny_model(layers=4, dropout=0.0, quantize=None, **overrides):
    """A mini Llama (widths multiples of 64, as NF4 on the CPU needs) with LoRA on every linear, B non-zero."""
    args = Args(vocab_size=101, hidden_size=H, intermediate_size=I, num_hidden_layers=layers,
                num_attention_heads=4, num_key_value_heads=2, head_dim=16, **overrides)
    args.validate()
    torch.manual_seed(0)
    model = Model(args)
    if quantize:
        from velotune.models.quantize import quantize_model
        quantize_model(model, quantize, compute_dtype=torch.float32)
    add_lora(model, r=R, alpha=8, dropout=dropout, seed=1)
    return randomize_b(model)


def test_offloaded_checkpointing_keeps_one_input_per_block():
    """With checkpointing + offload each block keeps only its input [B, T, H] (on the CPU it stays where it is;
    on CUDA it is a pinned host copy); then the final norm its input and 1/rms per token at the K positions with a
    target (the last block runs there only), the loss its gradient and target mask; nothing else is saved (the
    embeddings are frozen: the ids are not kept)."""
    model = tiny_model().train()
    ids = torch.randint(0, 101, (B, T), generator=torch.Generator().manual_seed(2))
    (everything, _, _), _ = fused_and_plain(lambda: model(ids, labels=ids, return_logits=False).loss, model)
    model.set_gradient_checkpointing("offload")
    with kernels("auto"):
        offloaded, shapes, loss = saved_bytes(lambda: model(ids, labels=ids, return_logits=False).loss, model)
    n_targets = N - B
    K = T - 1   # every position but the last has a target
    assert shapes.count((B, T, H)) == 4 and (B, K, H) in shapes
    assert offloaded == 4 * N * H * 4 + B * K * H * 4 + B * K * 4 + n_targets * H * 4 + B * K + 8
    assert offloaded / everything < 0.135  # measured 0.129: per block one [B, T, H] tensor instead of ~11 of its size
    loss.backward()
    assert model.model.layers[0].self_attn.q_proj.lora_A.weight.grad.abs().sum() > 0
