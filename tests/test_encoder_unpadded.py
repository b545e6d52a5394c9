"""Attention over real tokens by groups of similar length equals masked attention over the padded batch, values
and gradients, for any padding (right, left, a row with no real token)."""
import pytest
import torch
import torch.nn.functional as F

from velotune.models.encoders.unpadded import TokenLayout


@pytest.mark.parametrize("side", ["right", "left"])
def test_grouped_attention_equals_masked_padded_attention(side):
    g = torch.Generator().manual_seed(0)
    lengths, seq, heads, dim = [9, 1, 3, 0, 9, 5, 8, 2], 9, 2, 4
    mask = torch.zeros(len(lengths), seq, dtype=torch.long)
    for row, n in enumerate(lengths):
        if side == "right":
            mask[row, :n] = 1
        elif n:
            mask[row, -n:] = 1
    padded = [torch.randn(len(lengths), seq, heads, dim, generator=g, dtype=torch.float64, requires_grad=True)
              for _ in range(3)]
    layout = TokenLayout(mask)
    assert len(layout.groups) > 1  # the lengths span several groups
    flat = [layout.gather(t) for t in padded]
    ours = layout.attend(*flat, dropout_p=0.0)
    key = mask.bool()[:, None, None, :]
    reference = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in padded), attn_mask=key).transpose(1, 2)
    expected = layout.gather(reference)
    torch.testing.assert_close(ours, expected, rtol=1e-12, atol=1e-12)
    weights = torch.randn(ours.shape, generator=g, dtype=torch.float64)
    grads = torch.autograd.grad((ours * weights).sum(), padded)
    expected_grads = torch.autograd.grad((expected * weights).sum(), padded)
    for a, b in zip(grads, expected_grads):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert torch.equal(layout.pad(ours)[~mask.bool()], torch.zeros_like(layout.pad(ours)[~mask.bool()]))
