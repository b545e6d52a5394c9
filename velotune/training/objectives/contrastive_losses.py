"""The losses of embedding objectives, on embeddings already computed. Each returns a SUM over the batch's units
(anchors, triplets) or, for CoSENT (one ranking over the whole batch), the batch's loss with one unit: the loop
divides by the units of the whole step. Definitions as sentence-transformers' losses of the same name, so the
same batch gives the same number.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def cosine_matrix(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """[len(a), len(b)] cosine similarities, in fp32."""
    return F.normalize(a.float(), p=2, dim=-1) @ F.normalize(b.float(), p=2, dim=-1).T


def pairwise_cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """cos(a[i], b[i]), in fp32."""
    return (F.normalize(a.float(), p=2, dim=-1) * F.normalize(b.float(), p=2, dim=-1)).sum(dim=-1)


def in_batch_negatives_sum(anchors: torch.Tensor, positives: torch.Tensor, negatives: list | tuple = (), *,
                           scale: float = 20.0, symmetric: bool = False) -> torch.Tensor:
    """Multiple-negatives ranking (InfoNCE) summed over anchors: anchor i against every positive of the batch and
    every hard negative, its own positive the right answer. `symmetric` also ranks the anchors for each positive
    and averages the two softmax denominators (sentence-transformers' symmetric form: both directions share the
    positive's score)."""
    candidates = torch.cat([positives, *negatives], dim=0)
    scores = cosine_matrix(anchors, candidates) * scale
    rows = torch.arange(anchors.shape[0], device=anchors.device)
    positive = scores[rows, rows]
    log_z = torch.logsumexp(scores, dim=1)
    if symmetric:
        backward = cosine_matrix(positives, anchors) * scale
        log_z = (log_z + torch.logsumexp(backward, dim=1)) / 2
    return (log_z - positive).sum()


def triplet_sum(anchors, positives, negatives, *, margin: float = 5.0, distance: str = "euclidean") -> torch.Tensor:
    """max(0, d(a, p) - d(a, n) + margin) summed over triplets."""
    def dist(x, y):
        x, y = x.float(), y.float()
        if distance == "euclidean":
            return torch.linalg.vector_norm(x - y, dim=-1)
        if distance == "manhattan":
            return (x - y).abs().sum(dim=-1)
        return 1 - pairwise_cosine(x, y)
    return F.relu(dist(anchors, positives) - dist(anchors, negatives) + margin).sum()


def cosent_loss(first: torch.Tensor, second: torch.Tensor, scores: torch.Tensor, *, scale: float = 20.0):
    """CoSENT: log(1 + sum over pairs (i, j) with score_i > score_j of exp(s * (cos_j - cos_i))), the loss of the
    whole batch. Computed by sorting the labels (no [batch, batch] matrix): for each pair i, the log-sum of
    exp(-s * cos_k) over the pairs k with a strictly higher label."""
    cos = pairwise_cosine(first, second) * scale
    labels, order = scores.float().view(-1).sort()
    cos = cos[order]
    higher = torch.searchsorted(labels, labels, right=True)
    suffix = torch.logcumsumexp(-cos.flip(0), dim=0).flip(0)
    suffix = torch.cat([suffix, cos.new_full((1,), float("-inf"))])
    terms = torch.cat([cos.new_zeros(1), cos + suffix[higher]])
    return torch.logsumexp(terms, dim=0)
