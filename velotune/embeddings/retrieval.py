"""Retrieval evaluation of an embedding model: a query set, a corpus and relevance judgements in, IR metrics out.

The metrics are those of sentence-transformers' InformationRetrievalEvaluator (binary relevance, its definitions of
accuracy/precision/recall@k, MRR@10, NDCG@10 and MAP@100; ranks by cosine similarity, ties broken by ascending
corpus id), so numbers can be compared with published ones. Scores are computed chunk by chunk over the corpus,
keeping a running top-k: the full [queries, corpus] score matrix is never built.

Files (`RetrievalSet.read`), either a folder in BEIR's layout:
  queries.jsonl   {"_id": ..., "text": ...} per line
  corpus.jsonl    {"_id": ..., "title": ... (optional), "text": ...}; a title is prepended to the text
  qrels.tsv       query-id <TAB> corpus-id <TAB> score, an optional header line; score > 0 means relevant
                  (or qrels.jsonl: {"query-id", "corpus-id", "score" (optional, 1)}; or BEIR's qrels/<split>.tsv)
or one .jsonl file of {"query": ..., "document": ...} pairs: each distinct query text is a query, each distinct
document a corpus entry, and a query is relevant to every document it is paired with.
"""
from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..data.readers import read_records
from ..errors import DataError

QRELS_HEADER = ("query-id", "corpus-id", "score")


@dataclass
class RetrievalSet:
    """queries {qid: text}, corpus {doc_id: text}, relevant {qid: {doc_id, ...}} (binary relevance)."""
    queries: dict[str, str]
    corpus: dict[str, str]
    relevant: dict[str, set[str]] = field(default_factory=dict)

    @classmethod
    def read(cls, path, *, split: str = "test") -> RetrievalSet:
        """A BEIR-style folder, or one .jsonl of {"query", "document"} pairs (formats in the module docstring)."""
        path = Path(path)
        if path.is_file():
            return _read_pairs(path)
        if not path.is_dir():
            raise DataError(f"{path}: no such file or folder")
        queries = _read_texts(path / "queries.jsonl", "query")
        corpus = _read_texts(path / "corpus.jsonl", "document")
        candidates = [path / "qrels.tsv", path / "qrels.jsonl", path / "qrels" / f"{split}.tsv"]
        found = [p for p in candidates if p.is_file()]
        if len(found) != 1:
            names = ", ".join(str(p.relative_to(path)) for p in (found or candidates))
            raise DataError(f"{path}: expected exactly one relevance file, {'found' if found else 'none of'} {names}")
        rows = _qrels_jsonl(found[0]) if found[0].suffix == ".jsonl" else _qrels_tsv(found[0])
        relevant: dict[str, set[str]] = {}
        for where, qid, doc_id, score in rows:
            if qid not in queries:
                raise DataError(f"{where}: query-id {qid!r} is not in {path / 'queries.jsonl'}")
            if doc_id not in corpus:
                raise DataError(f"{where}: corpus-id {doc_id!r} is not in {path / 'corpus.jsonl'}")
            if score > 0:
                relevant.setdefault(qid, set()).add(doc_id)
        if not relevant:
            raise DataError(f"{found[0]}: no relevant pair (a line with score > 0)")
        return cls(queries, corpus, relevant)

    def write(self, path) -> Path:
        """Write the BEIR-style folder `read` reads (qrels.tsv with a header and score 1); returns the folder."""
        bad = [key for key in (*self.queries, *self.corpus) if "\t" in str(key) or "\n" in str(key)]
        if bad:  # qrels.tsv could not be read back
            raise ValueError(f"id {bad[0]!r} holds a tab or a line break")
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        for name, texts in (("queries.jsonl", self.queries), ("corpus.jsonl", self.corpus)):
            lines = (json.dumps({"_id": key, "text": text}, ensure_ascii=False) + "\n" for key, text in texts.items())
            (path / name).write_text("".join(lines), encoding="utf-8")
        rows = ["\t".join(QRELS_HEADER)] + [f"{qid}\t{doc_id}\t1" for qid, docs in self.relevant.items()
                                           for doc_id in sorted(docs)]
        (path / "qrels.tsv").write_text("\n".join(rows) + "\n", encoding="utf-8")
        return path


def _read_texts(path: Path, kind: str) -> dict[str, str]:
    """{_id: text} from a BEIR queries/corpus jsonl; a title is prepended to its text, as BEIR evaluations do."""
    if not path.is_file():
        raise DataError(f"{path}: file not found (a retrieval folder holds queries.jsonl, corpus.jsonl, qrels.tsv)")
    records = read_records(path)
    texts, first_seen = {}, {}
    for record, where in zip(records, records.origins):
        key = _field_id(record, "_id", where)
        title = _field_text(record, "title", where) if record.get("title") is not None else ""
        text = f"{title} {_field_text(record, 'text', where)}".strip()
        if not text:
            raise DataError(f"{where}: field 'text' is empty: a {kind} needs text")
        if key in texts:
            raise DataError(f"{where}: duplicate _id {key!r} (first at {first_seen[key]})")
        texts[key], first_seen[key] = text, where
    return texts


def _field_id(record: dict, name: str, where: str) -> str:
    value = _present(record, name, where)
    if isinstance(value, bool) or not isinstance(value, (str, int)) or str(value).strip() == "":
        raise DataError(f"{where}: field {name!r} must be a non-empty string or integer, got {value!r}")
    return str(value).strip()


def _field_text(record: dict, name: str, where: str) -> str:
    """The field's string, stripped (possibly empty: callers decide)."""
    value = _present(record, name, where)
    if not isinstance(value, str):
        raise DataError(f"{where}: field {name!r} must be a string, got {type(value).__name__}")
    return value.strip()


def _present(record: dict, name: str, where: str):
    if name not in record:
        raise DataError(f"{where}: missing field {name!r} (fields here: {', '.join(map(repr, record)) or 'none'})")
    return record[name]


def _qrels_tsv(path: Path):
    """(file:line, query-id, corpus-id, score) per line of a BEIR qrels.tsv; a first line naming the columns is
    skipped."""
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip() or (number == 1 and line.split("\t")[0].strip() == "query-id"):
                continue
            cells = [cell.strip() for cell in line.rstrip("\r\n").split("\t")]
            where = f"{path}:{number}"
            if len(cells) != 3:
                raise DataError(f"{where}: expected 3 tab-separated columns (query-id, corpus-id, score), "
                                f"got {len(cells)}")
            yield where, cells[0], cells[1], _score(cells[2], where)


def _qrels_jsonl(path: Path):
    records = read_records(path)
    for record, where in zip(records, records.origins):
        score = record.get("score", 1)
        yield (where, _field_id(record, "query-id", where), _field_id(record, "corpus-id", where),
               _score(score, where))


def _score(value, where: str) -> float:
    try:
        score = float(value) if not isinstance(value, bool) else math.nan
    except (TypeError, ValueError):
        score = math.nan
    if math.isnan(score):
        raise DataError(f"{where}: field 'score' must be a number, got {value!r}")
    return score


def _read_pairs(path: Path) -> RetrievalSet:
    """One jsonl of {"query", "document"} pairs; ids q0, q1, ... and d0, d1, ... in order of first appearance."""
    if path.suffix.lower() not in (".jsonl", ".ndjson"):
        raise DataError(f"{path}: a single retrieval file must be .jsonl {{\"query\", \"document\"}} pairs; "
                        "otherwise give a folder with queries.jsonl, corpus.jsonl and qrels.tsv")
    records = read_records(path)
    query_ids, doc_ids, relevant = {}, {}, {}
    for record, where in zip(records, records.origins):
        query, document = _field_text(record, "query", where), _field_text(record, "document", where)
        for name, text in (("query", query), ("document", document)):
            if not text:
                raise DataError(f"{where}: field {name!r} is empty")
        qid = query_ids.setdefault(query, f"q{len(query_ids)}")
        doc_id = doc_ids.setdefault(document, f"d{len(doc_ids)}")
        relevant.setdefault(qid, set()).add(doc_id)
    return RetrievalSet({qid: text for text, qid in query_ids.items()},
                        {doc_id: text for text, doc_id in doc_ids.items()}, relevant)


def top_k_cosine(query_embeddings: torch.Tensor, corpus_embeddings: torch.Tensor, k: int, *,
                 chunk_size: int = 16384, query_block: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """(scores, corpus indices), each [queries, min(k, corpus)], best first by cosine similarity; equal scores in
    ascending corpus index. Scores are computed for `query_block` x `chunk_size` at a time, merged into a running
    top-k, so memory does not grow with the corpus."""
    for name, emb in (("query", query_embeddings), ("corpus", corpus_embeddings)):
        if emb.dim() != 2 or not emb.shape[0]:
            raise ValueError(f"{name} embeddings: expected a non-empty [n, dim] tensor, got {tuple(emb.shape)}")
        if not torch.isfinite(emb).all():
            raise ValueError(f"{name} embeddings hold NaN or infinite values")
    if query_embeddings.shape[1] != corpus_embeddings.shape[1]:
        raise ValueError(f"query dim {query_embeddings.shape[1]} != corpus dim {corpus_embeddings.shape[1]}")
    k = min(k, corpus_embeddings.shape[0])
    scores, indices = [], []
    for q_start in range(0, query_embeddings.shape[0], query_block):
        q = torch.nn.functional.normalize(query_embeddings[q_start:q_start + query_block].float(), p=2, dim=-1)
        best_s = q.new_empty(q.shape[0], 0)
        best_i = torch.empty(q.shape[0], 0, dtype=torch.long, device=q.device)
        for start in range(0, corpus_embeddings.shape[0], chunk_size):
            chunk = corpus_embeddings[start:start + chunk_size].to(q.device)
            s = q @ torch.nn.functional.normalize(chunk.float(), p=2, dim=-1).T
            chunk_s, chunk_i = _chunk_top(s, k)
            best_s, best_i = _ranked(torch.cat([best_s, chunk_s], 1), torch.cat([best_i, chunk_i + start], 1))
            best_s, best_i = best_s[:, :k], best_i[:, :k]
        scores.append(best_s)
        indices.append(best_i)
    return torch.cat(scores), torch.cat(indices)


def _ranked(scores: torch.Tensor, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows reordered by (-score, index): a stable sort by score after one by index."""
    order = torch.argsort(indices, dim=1, stable=True)
    scores, indices = scores.gather(1, order), indices.gather(1, order)
    order = torch.argsort(scores, dim=1, descending=True, stable=True)
    return scores.gather(1, order), indices.gather(1, order)


def _chunk_top(s: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k best columns of each row under (-score, column). torch.topk picks among equal scores at the k-th
    place arbitrarily; rows with such boundary ties are redone with a stable full sort."""
    if k >= s.shape[1]:
        return _ranked(s, torch.arange(s.shape[1], device=s.device).expand_as(s))
    values, columns = torch.topk(s, k, dim=1)
    tied = ((s >= values[:, -1:]).sum(1) > k).nonzero().flatten()
    if tied.numel():
        exact_s, exact_i = torch.sort(s[tied], dim=1, descending=True, stable=True)
        values[tied], columns[tied] = exact_s[:, :k], exact_i[:, :k]
    return _ranked(values, columns)


def retrieval_metrics(query_embeddings: torch.Tensor, corpus_embeddings: torch.Tensor, relevant,
                      ks: Sequence[int] = (1, 3, 5, 10), *, mrr_at: int = 10, ndcg_at: int = 10, map_at: int = 100,
                      chunk_size: int = 16384) -> dict[str, float]:
    """accuracy@k, precision@k, recall@k for k in `ks`, mrr@10, ndcg@10 and map@100 as InformationRetrievalEvaluator
    defines them. `relevant` is a [queries, corpus] 0/1 matrix, or per query an iterable of relevant corpus indices;
    every query needs at least one (the evaluator leaves out queries with none; so must the caller)."""
    n_queries, n_corpus = query_embeddings.shape[0], corpus_embeddings.shape[0]
    rows, cols = _relevant_pairs(relevant, n_queries, n_corpus)
    n_relevant = torch.bincount(rows, minlength=n_queries).double()
    if (n_relevant == 0).any():
        first = int((n_relevant == 0).nonzero()[0])
        raise ValueError(f"query {first} has no relevant document; leave such queries out")
    depth = max(max(ks), mrr_at, ndcg_at, map_at)
    with torch.no_grad():
        _, top = top_k_cosine(query_embeddings, corpus_embeddings, depth, chunk_size=chunk_size)
    # hits[q, r]: the document at rank r is relevant to q, found by matching q * n_corpus + doc keys
    keys = (rows * n_corpus + cols).to(top.device)
    hits = torch.isin(torch.arange(n_queries, device=top.device)[:, None] * n_corpus + top, keys).double().cpu()
    found = hits.cumsum(1)  # relevant documents found up to and including each rank
    metrics = {}
    for k in ks:
        at_k = found[:, min(k, hits.shape[1]) - 1]
        metrics[f"accuracy@{k}"] = (at_k > 0).double().mean().item()
        metrics[f"precision@{k}"] = (at_k / k).mean().item()
        metrics[f"recall@{k}"] = (at_k / n_relevant).mean().item()
    head = hits[:, :mrr_at]
    first_rank = head.argmax(1).double() + 1  # argmax returns the first maximal position
    metrics[f"mrr@{mrr_at}"] = torch.where(head.any(1), 1.0 / first_rank, 0.0).mean().item()
    discount = 1.0 / torch.log2(torch.arange(2, ndcg_at + 2, dtype=torch.float64))
    dcg = (hits[:, :ndcg_at] * discount[:hits[:, :ndcg_at].shape[1]]).sum(1)
    ideal = discount.cumsum(0)[n_relevant.clamp(max=ndcg_at).long() - 1]  # all relevant ranked first
    metrics[f"ndcg@{ndcg_at}"] = (dcg / ideal).mean().item()
    head = hits[:, :map_at]
    precision_at_rank = found[:, :map_at] / torch.arange(1, head.shape[1] + 1, dtype=torch.float64)
    metrics[f"map@{map_at}"] = ((precision_at_rank * head).sum(1) / n_relevant.clamp(max=map_at)).mean().item()
    return metrics


def _relevant_pairs(relevant, n_queries: int, n_corpus: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(query rows, corpus columns) of the relevant pairs, from a 0/1 matrix or per-query index lists."""
    if isinstance(relevant, torch.Tensor):
        if tuple(relevant.shape) != (n_queries, n_corpus):
            raise ValueError(f"relevance matrix shape {tuple(relevant.shape)} != (queries, corpus) "
                             f"{(n_queries, n_corpus)}")
        rows, cols = (relevant != 0).nonzero(as_tuple=True)
        return rows.cpu(), cols.cpu()
    if len(relevant) != n_queries:
        raise ValueError(f"{len(relevant)} relevance lists for {n_queries} queries")
    pairs = sorted({(q, int(d)) for q, docs in enumerate(relevant) for d in docs})
    if any(not 0 <= d < n_corpus for _, d in pairs):
        raise ValueError(f"a relevant corpus index is outside 0..{n_corpus - 1}")
    table = torch.tensor(pairs, dtype=torch.long).reshape(-1, 2)
    return table[:, 0], table[:, 1]


def evaluate_retrieval(encode: Callable[[list[str]], torch.Tensor], data: RetrievalSet, batch_size: int = 64,
                       query_prefix: str = "", document_prefix: str = "", *, ks: Sequence[int] = (1, 3, 5, 10),
                       chunk_size: int = 16384) -> dict[str, float | int]:
    """Encode `data`'s queries and corpus with `encode` (list of texts -> [n, dim] tensor, called per batch) and
    return `retrieval_metrics` plus counts. Queries without a relevant document are left out and counted, as
    InformationRetrievalEvaluator leaves them out. The corpus is ordered by id, so equal scores rank by ascending
    corpus id, as in the evaluator."""
    qids = [qid for qid in data.queries if data.relevant.get(qid)]
    if not qids:
        raise ValueError("no query has a relevant document")
    doc_ids = sorted(data.corpus)
    position = {doc_id: i for i, doc_id in enumerate(doc_ids)}
    missing = sorted({d for qid in qids for d in data.relevant[qid]} - position.keys())
    if missing:
        raise ValueError(f"{len(missing)} relevant ids are not in the corpus, e.g. {missing[0]!r}")
    queries = _encode_all(encode, [query_prefix + data.queries[qid] for qid in qids], batch_size)
    corpus = _encode_all(encode, [document_prefix + data.corpus[d] for d in doc_ids], batch_size)
    relevant = [[position[d] for d in data.relevant[qid]] for qid in qids]
    metrics = retrieval_metrics(queries, corpus, relevant, ks, chunk_size=chunk_size)
    return {**metrics, "queries": len(qids), "queries_without_relevant": len(data.queries) - len(qids),
            "corpus": len(doc_ids)}


def _encode_all(encode, texts: list[str], batch_size: int) -> torch.Tensor:
    parts = []
    with torch.no_grad():  # encode is often a plain model call: no autograd graph is needed here
        for start in range(0, len(texts), batch_size):
            out = torch.as_tensor(encode(texts[start:start + batch_size])).detach()
            if out.dim() != 2 or out.shape[0] != len(texts[start:start + batch_size]):
                raise ValueError(f"encode returned shape {tuple(out.shape)} for "
                                 f"{len(texts[start:start + batch_size])} texts; expected [n, dim]")
            parts.append(out)
    return torch.cat(parts)
