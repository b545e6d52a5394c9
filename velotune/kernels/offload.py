"""Activation checkpointing with the block inputs offloaded to the CPU.

A checkpointed block keeps only its input for backward and runs its forward again there. With offload, that
input goes to pinned CPU memory, copied on a side CUDA stream so the copy overlaps the next blocks' compute,
and comes back just before the recomputation: GPU memory then holds no activation of any block but the one
being differentiated. On the CPU there is nothing to offload to: the input is kept as it is (plain
recomputation).

The random state (dropout) is captured before the forward and restored for the recomputation, so both see
the same masks. Gradients of the block's parameters are accumulated by an inner backward through the
recomputed block, and the gradient of its input is returned.
"""
from __future__ import annotations

import torch

_SIDE_STREAMS: dict = {}


def _side_stream(device: torch.device):
    if device not in _SIDE_STREAMS:
        _SIDE_STREAMS[device] = torch.cuda.Stream(device)
    return _SIDE_STREAMS[device]


def _to_host(x: torch.Tensor):
    """(host copy, event marking the copy's end): pinned and asynchronous on CUDA, `x` itself elsewhere."""
    if not x.is_cuda:
        return x.detach(), None
    host = torch.empty(x.shape, dtype=x.dtype, pin_memory=True)
    stream = _side_stream(x.device)
    stream.wait_stream(torch.cuda.current_stream(x.device))  # x must be fully written first
    with torch.cuda.stream(stream):
        host.copy_(x, non_blocking=True)
        event = torch.cuda.Event()
        event.record(stream)
    x.record_stream(stream)  # the allocator must not hand x's memory out before the copy has read it
    return host, event


def _to_device(host: torch.Tensor, event, device: torch.device) -> torch.Tensor:
    if event is None:
        return host
    torch.cuda.current_stream(device).wait_event(event)
    return host.to(device, non_blocking=True)


def _rng_state(device: torch.device):
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


def _restore_rng(state, device: torch.device):
    cpu, cuda = state
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state(cuda, device)


class OffloadedCheckpoint(torch.autograd.Function):
    """run(x) with only x kept (on the CPU) for backward; `anchor` is an empty tensor that requires grad, so the
    output requires grad even when x does not (the first block's input, frozen embeddings under LoRA)."""

    @staticmethod
    def forward(ctx, run, x, anchor):
        ctx.run, ctx.device, ctx.x_requires_grad = run, x.device, x.requires_grad
        ctx.rng = _rng_state(x.device)
        ctx.autocast = (torch.is_autocast_enabled(x.device.type), torch.get_autocast_dtype(x.device.type))
        host, ctx.event = _to_host(x)
        ctx.save_for_backward(host)  # x itself on the CPU; a pinned host copy on CUDA
        with torch.no_grad():
            return run(x)

    @staticmethod
    def backward(ctx, grad_out):
        (host,) = ctx.saved_tensors
        x = _to_device(host, ctx.event, ctx.device).detach().requires_grad_(ctx.x_requires_grad)
        ctx.event = None
        enabled, dtype = ctx.autocast
        with torch.random.fork_rng(devices=[ctx.device] if ctx.device.type == "cuda" else []):
            _restore_rng(ctx.rng, ctx.device)
            with torch.enable_grad(), torch.autocast(ctx.device.type, dtype=dtype, enabled=enabled):
                out = ctx.run(x)
        if out.requires_grad:
            torch.autograd.backward(out, grad_out)
        return None, x.grad if ctx.x_requires_grad else None, None


def offloaded_checkpoint(run, x: torch.Tensor) -> torch.Tensor:
    """run(x) (one tensor in, one out: a decoder block with its other arguments bound), checkpointed with its
    input offloaded to the CPU."""
    anchor = torch.empty(0, device=x.device, requires_grad=True)
    return OffloadedCheckpoint.apply(run, x, anchor)
