"""GradCache: the loss of a large batch of embeddings with the activation memory of a small one.

1. Embed every column in mini-batches without building a graph, remembering the RNG state before each mini-batch
   (dropout then draws the same masks again in step 3).
2. Compute the loss on those embeddings (leaves that require grad) and the loss's gradient with respect to them:
   the in-batch negatives see the whole batch.
3. When the loop calls backward on the loss, a hook replays each mini-batch's forward with a graph, under the
   run's autocast and the remembered RNG state, and backpropagates its cached embedding gradient (times the
   gradient the loop sends, which carries its normalisation). The parameters receive exactly the gradient of the
   plain loss computed on those embeddings.
"""
from __future__ import annotations

from contextlib import contextmanager, nullcontext
from typing import Callable

import torch


def cached_loss(embed: Callable, columns: list[str], size: int, mini_batch_size: int, loss_fn: Callable,
                autocast: Callable = nullcontext) -> torch.Tensor:
    """`loss_fn(*embeddings of columns)` as a tensor whose backward runs the replay. `embed(column, start, stop)`
    gives the embeddings of rows start..stop of a column (under the caller's autocast in step 1)."""
    device_states, parts = [], []
    with torch.no_grad():
        for column in columns:
            pieces = []
            for start in range(0, size, mini_batch_size):
                stop = min(size, start + mini_batch_size)
                state = _rng_state()
                pieces.append(embed(column, start, stop))
                device_states.append((len(parts), column, start, stop, state))
            parts.append(torch.cat(pieces).detach().requires_grad_())
    with torch.enable_grad():
        loss = loss_fn(*parts)
        grads = torch.autograd.grad(loss, parts)
    value = loss.detach().requires_grad_()

    def replay(grad_out: torch.Tensor):
        with torch.enable_grad(), autocast():
            for index, column, start, stop, state in device_states:
                with _rng_restored(state):
                    emb = embed(column, start, stop)
                surrogate = (emb.float() * grads[index][start:stop].float()).sum() * grad_out.float()
                surrogate.backward()
        return None

    value.register_hook(replay)
    return value


def _rng_state():
    cuda = [torch.cuda.get_rng_state(i) for i in range(torch.cuda.device_count())] \
        if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    return torch.get_rng_state(), cuda


@contextmanager
def _rng_restored(state):
    """The RNG as it was before a mini-batch's first forward, for its replay; the run's RNG is left as it was."""
    cpu, cuda = state
    with torch.random.fork_rng(devices=list(range(len(cuda)))):
        torch.set_rng_state(cpu)
        for i, s in enumerate(cuda):
            torch.cuda.set_rng_state(s, i)
        yield
