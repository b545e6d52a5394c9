"""Linear + cross-entropy: loss of `hidden @ weight.T` against targets.

The reference builds the logits; the fused path (chunked) never holds the full [tokens, vocab] logits.
Targets are already shifted (position t holds the id that position t must predict) and `ignore_index`
marks positions without a target. Logits are soft-capped (Gemma 2) before the loss when `softcap` is set.

Chunked path: for each chunk of rows, logits -> loss and d loss / d logits at once, then the chunk's
gradient wrt hidden is written and its gradient wrt weight accumulated (in fp32). Backward only scales the
saved gradients by grad_output, so what is kept for backward is [tokens, hidden] + [vocab, hidden], never
[tokens, vocab]. The per-chunk softmax/grad step is PyTorch on the CPU and a Triton kernel on CUDA.

`reduction="none"` gives each row's loss (minus the target's log-probability), for objectives that weigh tokens
or sequences differently (preference and RL training): backward then builds each chunk's logits again, since
each row's gradient scale is known only there; still never [tokens, vocab] at once.
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from .dispatch import linear_ce_impl
from .shape_buckets import bucket_length, shape_keyed_kernels


def linear_cross_entropy_reference(hidden, weight, targets, *, softcap=None, ignore_index=-100,
                                   reduction="sum"):
    logits = hidden @ weight.t()
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    return F.cross_entropy(logits.float(), targets, ignore_index=ignore_index, reduction=reduction)


def _chunk_rows(n_rows: int, vocab: int, hidden: torch.Tensor, softcap, use_triton: bool = False) -> int:
    """Rows per chunk so the chunk's logits and temporaries stay under a budget (MB: VELOTUNE_CE_CHUNK_MB,
    default 256 on CUDA, 32 on the CPU). The Triton kernel works in place on logits in the input dtype; the
    PyTorch path adds an fp32 copy, and a tanh buffer when soft-capped."""
    default_mb = 256 if hidden.is_cuda else 32
    budget = float(os.environ.get("VELOTUNE_CE_CHUNK_MB", default_mb)) * 2**20
    acc = 8 if hidden.dtype == torch.float64 else 4
    per_row = vocab * hidden.element_size()
    if not use_triton:
        per_row += vocab * acc * (2 if softcap else 1)
    rows = max(1, int(budget // max(per_row, 1)))
    if rows >= 16:
        rows -= rows % 16
    return max(1, min(rows, n_rows))


def _ce_rows_grad_torch(logits, targets, scale, *, softcap, ignore_index, write_grad, grad_out=None):
    """PyTorch twin of the Triton kernel: per-row loss from fp32/fp64 logits (pre-cap, overwritten), and when
    `write_grad` d loss / d logits, in `grad_out` (another dtype) or else in `logits` itself.

    One exp per element: the shifted logits are exponentiated in place, their row sum gives the log-sum-exp
    and, divided out, the softmax; the one-hot target is subtracted before the last scaling, which writes the
    gradient straight into `grad_out` (no separate cast pass for bf16 activations)."""
    valid = targets != ignore_index
    safe = torch.where(valid, targets, torch.zeros_like(targets))[:, None]
    if softcap:
        t = torch.tanh(logits.div_(softcap))
        logits = torch.mul(t, softcap, out=logits)
    shift = logits.amax(dim=-1, keepdim=True)
    picked = logits.gather(1, safe)
    expd = logits.sub_(shift).exp_()
    total = expd.sum(dim=-1, keepdim=True)
    lse = shift + total.log()
    loss = torch.where(valid, (lse - picked)[:, 0], 0.0)
    if not write_grad:
        return loss, None
    expd.scatter_add_(1, safe, -total)  # softmax * total - onehot * total
    if softcap:
        expd.mul_(t.mul_(t).neg_().add_(1.0))
    factor = (valid.to(expd.dtype) * scale)[:, None] / total
    return loss, torch.mul(expd, factor, out=expd if grad_out is None else grad_out)


_MM_OUT_DTYPE = {"ok": True}


def _addmm_fp32_(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc += a @ b with acc in fp32 (or fp64) whatever a's and b's dtype: the products add up in acc."""
    if a.dtype == acc.dtype and b.dtype == acc.dtype:
        acc.addmm_(a, b)
        return
    half = a.dtype == b.dtype and a.dtype in (torch.bfloat16, torch.float16)
    if half and a.is_cuda and _MM_OUT_DTYPE["ok"]:
        try:  # half-precision inputs, fp32 accumulate and output (cuBLAS), no fp32 copies of a or b
            torch.addmm(acc, a, b, out_dtype=acc.dtype, out=acc)
            return
        except (RuntimeError, TypeError):
            _MM_OUT_DTYPE["ok"] = False
    # Elsewhere (the CPU has no fp32-output bf16 matmul) the chunk is upcast: an fp32 matmul, but the sum over
    # chunks stays exact to fp32 (adding bf16 products into an fp32 accumulator costs a [vocab, hidden]
    # conversion per chunk, which measured slower, and rounds every chunk).
    acc.addmm_(a.to(acc.dtype), b.to(acc.dtype))


def _autocast_dtype(x: torch.Tensor):
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None


REDUCTIONS = ("sum", "mean", "none")


def _chunked_pass(hidden, weight, targets, scale, *, softcap, ignore_index, need_h, need_w, use_triton,
                  chunk_rows=None, row_losses=None):
    """One pass over chunks of rows: the sum of the rows' losses (each row's loss also written into `row_losses`
    when given) and, when asked, the gradients of sum_i scale_i * loss_i: wrt hidden in hidden's dtype, wrt weight
    in fp32 (fp64). `scale` is a tensor of one element (every row) or one per row."""
    if use_triton:
        from .triton_cross_entropy import ce_rows_grad_ as rows_grad
    else:
        rows_grad = _ce_rows_grad_torch
    n, vocab = hidden.shape[0], weight.shape[0]
    acc_dtype = torch.float64 if torch.float64 in (hidden.dtype, weight.dtype) else torch.float32
    write_grad = need_h or need_w
    per_row = scale.numel() != 1
    grad_h = torch.empty_like(hidden, memory_format=torch.contiguous_format) if need_h else None
    grad_w = torch.zeros(weight.shape, dtype=acc_dtype, device=weight.device) if need_w else None
    total = torch.zeros((), dtype=acc_dtype, device=hidden.device)
    step = chunk_rows or _chunk_rows(n, vocab, hidden, softcap, use_triton)
    # One set of chunk buffers for the whole loop: a fresh multi-MB tensor per chunk costs a page fault per 4 KiB
    # touched, which on the CPU takes as long as the softmax itself.
    rows = min(step, n)
    # The logits matmul runs in the autocast dtype when autocast is on, as `hidden @ weight.T` would; the matmuls
    # below write into buffers (out=), which autocast leaves alone, so the operands are cast here, once.
    mm_dtype = _autocast_dtype(hidden) or hidden.dtype
    weight_mm = weight.to(mm_dtype)
    weight_h = weight_mm if mm_dtype == hidden.dtype else weight.to(hidden.dtype)  # for d hidden, also cast once
    logits_buf = torch.empty((rows, vocab), dtype=mm_dtype, device=hidden.device)
    upcast = not use_triton and logits_buf.dtype != acc_dtype
    acc_buf = torch.empty((rows, vocab), dtype=acc_dtype, device=hidden.device) if upcast else None
    grad_buf = (torch.empty((rows, vocab), dtype=hidden.dtype, device=hidden.device)
                if write_grad and not use_triton and hidden.dtype != acc_dtype else None)
    for start in range(0, n, step):
        h = hidden[start:start + step]
        tgt = targets[start:start + step]
        m = h.shape[0]
        chunk_scale = scale[start:start + m] if per_row else scale
        logits = torch.mm(h.to(mm_dtype), weight_mm.t(), out=logits_buf[:m])  # [chunk, vocab]
        if use_triton:  # in place: the logits become their gradient, in the input dtype
            loss = rows_grad(logits, tgt, chunk_scale, softcap=softcap, ignore_index=ignore_index,
                             write_grad=write_grad)
            grad = logits
        else:
            if upcast:
                logits = acc_buf[:m].copy_(logits)
            loss, grad = rows_grad(logits, tgt, chunk_scale, softcap=softcap, ignore_index=ignore_index,
                                   write_grad=write_grad, grad_out=None if grad_buf is None else grad_buf[:m])
        total += loss.sum()
        if row_losses is not None:
            row_losses[start:start + m] = loss
        if need_h:
            torch.mm(grad.to(hidden.dtype), weight_h, out=grad_h[start:start + step])
        if need_w:
            _addmm_fp32_(grad_w, grad.t(), h)
        del logits, grad
    return total, grad_h, grad_w


def _chunked_forward(hidden, weight, targets, *, softcap, ignore_index, reduction, need_h, need_w,
                     use_triton, chunk_rows=None):
    """Loss, and (when asked) d loss / d hidden in hidden's dtype and d loss / d weight in weight's dtype."""
    if reduction not in ("sum", "mean"):
        raise ValueError(f"reduction must be 'sum' or 'mean' here, got {reduction!r}")
    acc_dtype = torch.float64 if torch.float64 in (hidden.dtype, weight.dtype) else torch.float32
    n_valid = (targets != ignore_index).sum()
    if reduction == "mean":
        scale = 1.0 / n_valid.clamp(min=1).to(acc_dtype)
    else:
        scale = torch.ones((), dtype=acc_dtype, device=hidden.device)
    total, grad_h, grad_w = _chunked_pass(hidden, weight, targets, scale.reshape(1), softcap=softcap,
                                          ignore_index=ignore_index, need_h=need_h, need_w=need_w,
                                          use_triton=use_triton, chunk_rows=chunk_rows)
    loss = total.float() if acc_dtype == torch.float32 else total
    if reduction == "mean":
        loss = loss / n_valid  # 0/0 = nan when every target is ignored, as F.cross_entropy
    return loss, grad_h, None if grad_w is None else grad_w.to(weight.dtype)


def _row_losses(hidden, weight, targets, *, softcap, ignore_index, use_triton, chunk_rows):
    """Each row's loss (0 where the target is ignored), fp32 (fp64 for fp64 inputs); no gradients."""
    acc_dtype = torch.float64 if torch.float64 in (hidden.dtype, weight.dtype) else torch.float32
    out = torch.empty(hidden.shape[0], dtype=acc_dtype, device=hidden.device)
    one = torch.ones(1, dtype=acc_dtype, device=hidden.device)
    _chunked_pass(hidden, weight, targets, one, softcap=softcap, ignore_index=ignore_index, need_h=False,
                  need_w=False, use_triton=use_triton, chunk_rows=chunk_rows, row_losses=out)
    return out


class ChunkedLinearCrossEntropy(torch.autograd.Function):
    """Scalar losses ("sum", "mean"): the gradients are computed in forward, while each chunk's logits exist,
    and backward only scales them: logits are built once."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, softcap, ignore_index, reduction, use_triton, chunk_rows):
        loss, grad_h, grad_w = _chunked_forward(
            hidden, weight, targets, softcap=softcap, ignore_index=ignore_index, reduction=reduction,
            need_h=ctx.needs_input_grad[0], need_w=ctx.needs_input_grad[1], use_triton=use_triton,
            chunk_rows=chunk_rows)
        ctx.save_for_backward(grad_h, grad_w)
        return loss

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w = ctx.saved_tensors
        if not torch.equal(grad_out, torch.ones_like(grad_out)):  # the usual loss.backward() skips the copies
            grad_h = None if grad_h is None else grad_h * grad_out.to(grad_h.dtype)
            grad_w = None if grad_w is None else grad_w * grad_out.to(grad_w.dtype)
        return grad_h, grad_w, None, None, None, None, None, None


class ChunkedLinearCrossEntropyPerRow(torch.autograd.Function):
    """Per-row losses ("none"), for objectives that weigh sequences differently (preference, RL): the gradient
    of each row depends on its own grad_output, unknown in forward, so backward builds each chunk's logits
    again (one more matmul) instead of keeping [tokens, vocab]. Saved: hidden, weight and targets only."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, softcap, ignore_index, use_triton, chunk_rows):
        ctx.save_for_backward(hidden, weight, targets)
        ctx.options = dict(softcap=softcap, ignore_index=ignore_index, use_triton=use_triton, chunk_rows=chunk_rows)
        losses = _row_losses(hidden, weight, targets, **ctx.options)
        return losses.float() if losses.dtype == torch.float32 else losses

    @staticmethod
    def backward(ctx, grad_out):
        hidden, weight, targets = ctx.saved_tensors
        acc_dtype = torch.float64 if torch.float64 in (hidden.dtype, weight.dtype) else torch.float32
        _, grad_h, grad_w = _chunked_pass(hidden, weight, targets, grad_out.to(acc_dtype).contiguous(),
                                          need_h=ctx.needs_input_grad[0], need_w=ctx.needs_input_grad[1],
                                          **ctx.options)
        return grad_h, None if grad_w is None else grad_w.to(weight.dtype), None, None, None, None, None


def chunked_linear_cross_entropy(hidden, weight, targets, *, softcap=None, ignore_index=-100, reduction="sum",
                                 use_triton=False, chunk_rows=None):
    """Fused linear cross-entropy that never holds [tokens, vocab]; same arguments and result as the
    reference. `reduction="none"` gives each row's loss (0 where ignored): minus the target's log-probability.
    `use_triton` runs the per-chunk softmax/grad as a Triton kernel; `chunk_rows` overrides the memory-budget
    chunking."""
    if hidden.dim() != 2 or weight.dim() != 2 or targets.shape != hidden.shape[:1]:
        raise ValueError(f"expected hidden [N, H], weight [V, H], targets [N]; got {tuple(hidden.shape)}, "
                         f"{tuple(weight.shape)}, {tuple(targets.shape)}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {', '.join(REDUCTIONS)}, got {reduction!r}")
    grads = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    if reduction == "none":
        if grads:
            return ChunkedLinearCrossEntropyPerRow.apply(hidden, weight, targets, softcap, ignore_index,
                                                         use_triton, chunk_rows)
        losses = _row_losses(hidden, weight, targets, softcap=softcap, ignore_index=ignore_index,
                             use_triton=use_triton, chunk_rows=chunk_rows)
        return losses.float() if losses.dtype == torch.float32 else losses
    if grads:
        return ChunkedLinearCrossEntropy.apply(hidden, weight, targets, softcap, ignore_index, reduction,
                                               use_triton, chunk_rows)
    loss, _, _ = _chunked_forward(hidden, weight, targets, softcap=softcap, ignore_index=ignore_index,
                                  reduction=reduction, need_h=False, need_w=False, use_triton=use_triton,
                                  chunk_rows=chunk_rows)
    return loss


def linear_cross_entropy(hidden, weight, targets, *, softcap=None, ignore_index=-100, reduction="sum"):
    impl = linear_ce_impl(hidden)
    fits = hidden.dim() == 2 and reduction in REDUCTIONS  # else the reference's own behaviour
    if impl != "reference" and fits:
        n = hidden.shape[0]
        hidden, targets = _rows_to_bucket(hidden, targets, ignore_index)
        loss = chunked_linear_cross_entropy(hidden, weight, targets, softcap=softcap, ignore_index=ignore_index,
                                            reduction=reduction, use_triton=impl == "triton")
        return loss[:n] if reduction == "none" and loss.shape[0] != n else loss  # the bucket's rows dropped
    return linear_cross_entropy_reference(hidden, weight, targets, softcap=softcap,
                                          ignore_index=ignore_index, reduction=reduction)


def _rows_to_bucket(hidden, targets, ignore_index):
    """Where matmul kernels are cached per shape (shape_buckets.py), rows padded to a bucket count with ignored
    targets: the number of target tokens changes at every step, and each new count would cost a set of kernels."""
    mm_dtype = _autocast_dtype(hidden) or hidden.dtype
    extra = bucket_length(hidden.shape[0]) - hidden.shape[0]
    if not extra or not shape_keyed_kernels(hidden.device, mm_dtype):
        return hidden, targets
    return F.pad(hidden, (0, 0, 0, extra)), F.pad(targets, (0, extra), value=ignore_index)
