"""The embedding objectives' losses and pooling against sentence-transformers 6.2.0 on the same embeddings, and
GradCache's loss and gradients against the plain loss (dropout included)."""
import pytest
import torch
from torch import nn

from velotune.embeddings.pooling import Pooling
from velotune.training.objectives.contrastive_losses import cosent_loss, in_batch_negatives_sum, triplet_sum
from velotune.training.objectives.grad_cache import cached_loss

st_losses = pytest.importorskip("sentence_transformers.sentence_transformer.losses")


def _embeddings(n, rows=6, dim=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(rows, dim, generator=g, dtype=torch.float64).float() for _ in range(n)]


@pytest.mark.parametrize("negatives", [0, 1])
@pytest.mark.parametrize("scale", [20.0, 7.5])
def test_in_batch_negatives_equals_multiple_negatives_ranking(negatives, scale):
    emb = _embeddings(2 + negatives)
    ours = in_batch_negatives_sum(emb[0], emb[1], emb[2:], scale=scale) / emb[0].shape[0]
    theirs = st_losses.MultipleNegativesRankingLoss(None, scale=scale).compute_loss_from_embeddings(emb, None)
    assert abs(float(ours) - float(theirs)) <= 1e-6 * max(1.0, abs(float(theirs)))


def test_symmetric_form_equals_both_directions_per_direction():
    emb = _embeddings(2)
    ours = in_batch_negatives_sum(emb[0], emb[1], scale=20.0, symmetric=True) / 6
    loss = st_losses.MultipleNegativesRankingLoss(None, directions=("query_to_doc", "doc_to_query"),
                                                 partition_mode="per_direction")
    assert abs(float(ours) - float(loss.compute_loss_from_embeddings(emb, None))) <= 1e-5


def test_triplet_and_cosent_equal_sentence_transformers():
    a, p, n = _embeddings(3)
    theirs = st_losses.TripletLoss(None).compute_loss_from_embeddings([a, p, n], None)
    assert abs(float(triplet_sum(a, p, n) / 6) - float(theirs)) <= 1e-5
    scores = torch.tensor([0.1, 0.9, 0.5, 0.5, 0.0, 1.0])
    theirs = st_losses.CoSENTLoss(None).compute_loss_from_embeddings([a, p], scores)
    assert abs(float(cosent_loss(a, p, scores)) - float(theirs)) <= 1e-5


def test_cosent_equals_its_definition_over_pairs():
    a, b = _embeddings(2, rows=5)
    labels = torch.tensor([0.2, 0.8, 0.8, 0.1, 0.5])
    cos = torch.nn.functional.cosine_similarity(a.double(), b.double()) * 20
    terms = [cos[j] - cos[i] for i in range(5) for j in range(5) if labels[i] > labels[j]]
    expected = torch.logsumexp(torch.stack([torch.zeros((), dtype=torch.float64), *terms]), 0)
    assert abs(float(cosent_loss(a, b, labels)) - float(expected)) <= 1e-5


# ---- pooling ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["mean", "cls", "max", "mean_sqrt_len_tokens", "weightedmean", "lasttoken"])
@pytest.mark.parametrize("side", ["right", "left"])
def test_pooling_equals_sentence_transformers(mode, side):
    from sentence_transformers.sentence_transformer.modules import Pooling as StPooling
    states = torch.randn(3, 7, 8, generator=torch.Generator().manual_seed(1))
    lengths = [7, 4, 2]
    mask = torch.zeros(3, 7, dtype=torch.long)
    for row, n in enumerate(lengths):
        if side == "right":
            mask[row, :n] = 1
        else:
            mask[row, 7 - n:] = 1
    ours = Pooling((mode,))(states, mask)
    theirs = StPooling(8, pooling_mode=mode)({"token_embeddings": states, "attention_mask": mask})
    torch.testing.assert_close(ours, theirs["sentence_embedding"], rtol=1e-6, atol=1e-6)


def test_pooling_reads_both_config_forms():
    assert Pooling.from_config({"pooling_mode_mean_tokens": True, "pooling_mode_cls_token": False}).modes == ("mean",)
    assert Pooling.from_config({"pooling_mode": ["cls", "mean"]}).modes == ("cls", "mean")
    with pytest.raises(Exception, match="unknown mode 'sum'"):
        Pooling.from_config({"pooling_mode": "sum"}, "x/config.json")


# ---- GradCache ----------------------------------------------------------------------------------------------------
class _Embedder(nn.Module):
    """A small embedder with dropout: its masks must replay exactly for the cached gradients to be right."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.table = nn.Embedding(50, 16)
        self.proj = nn.Linear(16, 16)
        self.drop = nn.Dropout(0.3)

    def forward(self, ids):
        return self.proj(self.drop(self.table(ids))).mean(dim=1)


def _batch(size=8, seed=3):
    g = torch.Generator().manual_seed(seed)
    return {c: torch.randint(0, 50, (size, 5), generator=g) for c in ("anchor", "positive")}


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def _loss_fn(a, p):
    return in_batch_negatives_sum(a, p, scale=20.0)


@pytest.mark.parametrize("mini", [8, 3])
def test_grad_cache_gives_the_plain_loss_and_gradients_with_dropout(mini):
    model, batch = _Embedder(), _batch()
    model.train()
    # The plain loss, embedding mini-batch by mini-batch in the same order: the same dropout draws as the cache.
    torch.manual_seed(11)
    parts = {c: torch.cat([model(batch[c][s:s + mini]) for s in range(0, 8, mini)]) for c in ("anchor", "positive")}
    plain = _loss_fn(parts["anchor"], parts["positive"])
    (plain / 8).backward()
    expected = _grads(model)
    model.zero_grad()
    torch.manual_seed(11)
    cached = cached_loss(lambda c, a, b: model(batch[c][a:b]), ["anchor", "positive"], 8, mini, _loss_fn)
    assert abs(float(cached.detach()) - float(plain.detach())) <= 1e-6 * abs(float(plain.detach()))
    (cached / 8).backward()
    for name, grad in _grads(model).items():
        torch.testing.assert_close(grad, expected[name], rtol=1e-5, atol=1e-7, msg=name)


def test_grad_cache_leaves_the_run_rng_where_the_cached_pass_left_it():
    model, batch = _Embedder(), _batch()
    torch.manual_seed(5)
    cached = cached_loss(lambda c, a, b: model(batch[c][a:b]), ["anchor", "positive"], 8, 4, _loss_fn)
    after_forward = torch.get_rng_state()
    cached.backward()
    assert torch.equal(torch.get_rng_state(), after_forward)
