"""The data of embedding objectives: pairs, triplets and scored pairs of texts -> the token ids of each text, and
batches in which no text appears twice (a repeated text is a false negative for in-batch negatives).

Records (jsonl / json / csv / tsv / parquet); the first record's columns decide the format (with or without a
negative, say) and every row then needs them; the objective says which kind it reads:
    pairs      {"anchor": "text", "positive": "text"}                         MNRL, cached MNRL
               {"anchor": ..., "positive": ..., "negative": "text"}        with a hard negative per pair
    triplets   {"anchor": ..., "positive": ..., "negative": ...}            triplet loss: the negative is required
    scored     {"sentence1": "text", "sentence2": "text", "score": 0.8}    CoSENT
Aliases (the canonical name wins when a record has both): query, question -> anchor; document, positive_document,
answer -> positive; negative_document -> negative; label -> score.

`query_prefix` goes before each anchor and sentence1, `document_prefix` before each positive, negative and sentence2
(sentence-transformers' prompts, e.g. "query: " / "passage: " for E5). Each text is tokenized alone, with the special
tokens the tokenizer adds to one sequence, and cut to max_seq_length by the tokenizer's own truncation, as
sentence-transformers does; the cut texts are counted and warned about once per split.
Bad rows are dropped, counted by reason and named in the log: a missing column, an empty or non-text side, a
negative equal to its anchor or positive, a score that is not a number, NaN, or outside the score range. Scores are
kept as written (not rescaled to 0..1).
"""
from __future__ import annotations

import hashlib
import logging
import math
from dataclasses import dataclass

import torch

from ..errors import ConfigError, DataError
from .dataset import PreparedData
from .encode import DataStats
from .packing import epoch_order
from .row_sets import BadRow, bad_reasons, check_source, note_rows, read_and_split

log = logging.getLogger("velotune")

ALIASES = {"anchor": ("query", "question"), "positive": ("document", "positive_document", "answer"),
           "negative": ("negative_document",), "sentence1": (), "sentence2": (), "score": ("label",)}
FORMATS = {"pairs": ("anchor", "positive"), "triplets": ("anchor", "positive", "negative"),
           "scored pairs": ("sentence1", "sentence2")}            # format -> its text columns
READS = {"pairs": ("pairs", "triplets"), "triplets": ("triplets",), "scored": ("scored pairs",)}  # kind -> formats
QUERY_SIDE = ("anchor", "sentence1")     # prefixed with query_prefix; the other columns with document_prefix
TOKENIZE_CHUNK = 1024                    # texts per tokenizer call: fast batch calls, bounded memory
OTHER_SCALE_SHARE = 0.1                  # this share of scores out of range: the file uses another scale


@dataclass
class TextRow:
    texts: dict           # column -> raw text
    score: float | None
    origin: str


@dataclass
class TextExample:
    ids: dict             # column -> int32 token ids of its (prefixed) text, special tokens included
    keys: frozenset       # text_key of each raw text: a batch holds each at most once
    score: float | None = None
    origin: str = ""

    def __len__(self) -> int:  # tokens the example puts through the model
        return sum(int(t.shape[0]) for t in self.ids.values())


def text_key(text: str) -> int:
    """A text's fingerprint: 8 bytes instead of the text, the same in every process (unlike hash())."""
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little")


# ---- records -> rows ---------------------------------------------------------------------------------------------

def _field(record: dict, column: str):
    """The key of `column` in the record (itself or an alias), or None."""
    for key in (column, *ALIASES[column]):
        if key in record:
            return key
    return None


def _format_of(record) -> str | None:
    """The format of the columns a record fills (a null, as parquet writes a missing cell, is no column)."""
    if not isinstance(record, dict):
        return None
    has = {column for column in ALIASES if record.get(_field(record, column)) is not None}
    if {"sentence1", "sentence2", "score"} <= has:
        return "scored pairs"
    for fmt in ("triplets", "pairs"):
        if set(FORMATS[fmt]) <= has:
            return fmt
    return None


class _RowReader:
    """Parses records into TextRows for `read_and_split`: the format is fixed by the first record of data.path
    (every row then needs its columns), and the finite scores are kept to tell a file on another scale."""

    def __init__(self, kind: str, score_range):
        self.kind, (self.low, self.high) = kind, score_range
        self.format: str | None = None
        self.scores: list[float] = []
        self.out_of_range = f"score outside [{self.low:g}, {self.high:g}]"

    @property
    def columns(self) -> tuple:
        return FORMATS[self.format]

    def check_first(self, record, where: str):
        fmt = _format_of(record)
        if fmt not in READS[self.kind]:
            want = " / ".join(FORMATS[READS[self.kind][0]] + (("score",) if self.kind == "scored" else ()))
            found = sorted(record) if isinstance(record, dict) else type(record).__name__
            held = f"; it holds {fmt}: train those with an objective that reads them" if fmt else ""
            raise DataError(f"{where}: {self.kind} data needs the columns {want} ({_alias_line()}); the first "
                            f"record has {found}{held}")
        if self.format is not None and fmt != self.format:  # the eval file must match data.path
            raise DataError(f"{where}: this file holds {fmt} but data.path holds {self.format}")
        self.format = fmt

    def __call__(self, record, where: str) -> TextRow:
        texts = {column: _text(record, column) for column in self.columns}
        if "negative" in texts:
            for other in ("anchor", "positive"):
                if texts["negative"] == texts[other]:
                    raise BadRow(f"'negative' equals '{other}'")
        return TextRow(texts, self._score(record) if self.format == "scored pairs" else None, where)

    def _score(self, record) -> float:
        value = record.get(_field(record, "score") or "score")
        if value is None or (isinstance(value, str) and not value.strip()):
            raise BadRow("missing 'score'")
        try:  # csv cells are text ("0.8"); a bool is not a score
            score = float(value) if not isinstance(value, bool) else None
        except (TypeError, ValueError):
            score = None
        if score is None:
            raise BadRow("'score' is not a number")
        if math.isnan(score):
            raise BadRow("'score' is NaN")
        if math.isinf(score):
            raise BadRow("'score' is infinite")
        self.scores.append(score)
        if not self.low <= score <= self.high:
            raise BadRow(self.out_of_range)
        return score

    def check_scale(self, *parsed):
        """Many scores out of range mean a file on another scale (STS-B's 0..5): an error, not rows dropped."""
        parsed = [p for p in parsed if p is not None]
        out = sum(len(p.bad.get(self.out_of_range, [])) for p in parsed)
        total = out + sum(len(p.rows) for p in parsed)
        if not out or out < OTHER_SCALE_SHARE * total:
            return
        low, high = min(self.scores), max(self.scores)
        guess_high = next((top for top in (1, 5, 10, 100) if high <= top), math.ceil(high))
        guess = f"{-1 if low < 0 else 0}..{guess_high}"
        raise DataError(f"{parsed[0].name}: {out} of {total} scores lie outside the score range "
                        f"[{self.low:g}, {self.high:g}] (they span {low:g}..{high:g}): the scores look like a "
                        f"{guess} scale; set the score range to it (embedding.score_min / score_max)")


def _alias_line() -> str:
    named = [f"{alias} -> {column}" for column, aliases in ALIASES.items() for alias in aliases]
    return "aliases: " + ", ".join(named)


def _text(record: dict, column: str) -> str:
    key = _field(record, column)
    value = record.get(key) if key is not None else None
    if value is None:
        raise BadRow(f"missing '{column}'")
    if not isinstance(value, str):
        raise BadRow(f"'{column}' is not text")
    if not value.strip():
        raise BadRow(f"empty '{column}'")
    return value


# ---- rows -> examples ----------------------------------------------------------------------------------------------

def prepare_text_pairs(data_cfg, tokenizer, *, kind: str, max_seq_length: int, seed: int, query_prefix: str = "",
                       document_prefix: str = "", score_range=(0.0, 1.0)) -> PreparedData:
    """Reads `data.path` (and the eval split) as `kind` ("pairs", "triplets" or "scored") and tokenizes each text:
    a PreparedData of TextExamples, its format "pairs", "triplets" or "scored pairs", no chat template."""
    if kind not in READS:
        raise ValueError(f"kind={kind!r}: expected one of {', '.join(READS)}")
    if not score_range[0] < score_range[1]:
        raise ConfigError(f"score range [{score_range[0]:g}, {score_range[1]:g}]: score_min must be below score_max")
    want = " / ".join(FORMATS[READS[kind][0]])
    check_source(data_cfg, tokenizer, f"{want} records", "embedding objectives")
    reader = _RowReader(kind, score_range)
    train, held = read_and_split(data_cfg, reader, seed=seed, check_first=reader.check_first)
    if reader.format == "scored pairs":
        reader.check_scale(train, held)
    prefixes = {column: query_prefix if column in QUERY_SIDE else document_prefix for column in reader.columns}
    encode = {"tokenizer": tokenizer, "prefixes": prefixes, "max_len": max_seq_length, "overflow": data_cfg.overflow}
    examples, stats = _encode_rows(train.rows, name=train.name, **encode)
    note_rows(stats, train)
    if not examples:
        too_long = [f"{stats.dropped_too_long} longer than max_seq_length={max_seq_length} (data.overflow is 'drop')"]
        too_long = too_long if stats.dropped_too_long else []
        raise DataError(f"no rows left in {train.name}: {'; '.join(bad_reasons(train) + too_long)}")
    eval_examples = []
    if held is not None:
        eval_examples, stats.eval = _encode_rows(held.rows, name=held.name, **encode)
        note_rows(stats.eval, held)
    return PreparedData(examples, eval_examples, stats, reader.format, True, None)


def _encode_rows(rows: list, *, tokenizer, prefixes: dict, max_len: int, overflow: str, name: str):
    stats, examples, cut_texts = DataStats(), [], 0
    tokens = {column: _tokenize([prefix + row.texts[column] for row in rows], tokenizer, max_len)
              for column, prefix in prefixes.items()}
    for i, row in enumerate(rows):
        cut = sum(tokens[column][1][i] for column in prefixes)
        if cut and overflow == "drop":
            stats.dropped_too_long += 1
            continue
        ids = {column: torch.tensor(tokens[column][0][i], dtype=torch.int32) for column in prefixes}
        example = TextExample(ids, frozenset(text_key(text) for text in row.texts.values()), row.score, row.origin)
        examples.append(example)
        cut_texts += cut
        stats.samples += 1
        stats.truncated += cut > 0
        stats.total_tokens += len(example)
    stats.target_tokens = stats.total_tokens  # every token feeds an embedding the loss trains
    if cut_texts:
        log.warning("%s: %d text%s longer than max_seq_length (%d) %s truncated", name, cut_texts,
                    "" if cut_texts == 1 else "s", max_len, "was" if cut_texts == 1 else "were")
    if stats.dropped_too_long:
        log.warning("%s: dropped %d row%s with a text longer than max_seq_length (%d) (data.overflow is 'drop')",
                    name, stats.dropped_too_long, "" if stats.dropped_too_long == 1 else "s", max_len)
    return examples, stats


def _tokenize(texts: list[str], tokenizer, max_len: int) -> tuple[list, list]:
    """(token ids, whether it was cut) of each text. Tokenized whole first, to know what truncation cuts; the long
    ones again with the tokenizer's truncation, which keeps its closing special token ([SEP])."""
    ids, cut = [], []
    for start in range(0, len(texts), TOKENIZE_CHUNK):
        chunk = texts[start:start + TOKENIZE_CHUNK]
        whole = list(tokenizer(chunk, add_special_tokens=True, verbose=False)["input_ids"])
        long = [i for i, one in enumerate(whole) if len(one) > max_len]
        if long:
            short = tokenizer([chunk[i] for i in long], add_special_tokens=True, truncation=True,
                              max_length=max_len)["input_ids"]
            for i, one in zip(long, short):
                whole[i] = one
        ids += whole
        cut += [False] * len(chunk)
        for i in long:
            cut[start + i] = True
    return ids, cut


# ---- examples -> batches -------------------------------------------------------------------------------------------

def distinct_text_batches(examples: list, *, batch_size: int, seed: int, epoch: int, shuffle: bool = True,
                          rank: int = 0, world_size: int = 1) -> list[list[list[int]]]:
    """This process's batches of `epoch`, each a list of rows of one example index ([[i], [j], ...]), the shape of
    data.plan_for. Global batches of up to batch_size * world_size examples hold no text twice (in any column: an
    anchor equal to another row's positive counts); an example that would repeat one goes to a later batch, so
    none is dropped. Rank r gets the r-th of world_size near-equal slices of every global batch.

    In-batch negatives need two examples per rank: a batch left smaller than that (the last one, or one made by
    conflicts) borrows examples that do not conflict with it from batches above that size, so batches are never
    larger than batch_size. Only data with one text in most rows leaves a smaller batch (of one on one process:
    its loss then has no in-batch negative). Under several processes a global batch of fewer examples than
    processes cannot give each one an example: its examples join earlier batches that hold none of their texts
    (those then exceed batch_size by one on some ranks); only an example whose text is in every batch is left out."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in a world of {world_size} processes")
    keys = [example.keys for example in examples]
    order = epoch_order(len(examples), seed=seed, epoch=epoch, shuffle=shuffle)
    batches = _fill(order, keys, batch_size * world_size)
    _top_up(batches, keys, world_size * min(2, batch_size))
    kept = [batch for batch in batches if len(batch) >= world_size]
    left_out = _place_elsewhere([i for batch in batches if len(batch) < world_size for i in batch], kept, keys)
    share = []
    for batch in kept:
        part = batch[rank * len(batch) // world_size:(rank + 1) * len(batch) // world_size]
        share.append([[i] for i in part])
    if left_out:
        log.warning("epoch %d: %d of %d examples left out: each shares a text with some example of every batch "
                    "(%d processes)", epoch, left_out, len(examples), world_size)
    return share


def _place_elsewhere(homeless: list[int], batches: list[list[int]], keys: list) -> int:
    """Puts each example into the latest batch that shares none of its texts; returns how many found none."""
    lost = 0
    for i in homeless:
        for batch in reversed(batches):
            if all(keys[i].isdisjoint(keys[j]) for j in batch):
                batch.append(i)
                break
        else:
            lost += 1
    return lost


def _fill(order: list[int], keys: list, size: int) -> list[list[int]]:
    """Each example, in `order`, into the first batch with room after the last batch holding any of its texts.

    `after[key]`: the first batch after the last one holding `key` (no batch from there on holds it), so the
    choice is conflict-free without looking into batches; `skip` (union-find) finds the first batch with room."""
    batches: list[list[int]] = []
    skip: list[int] = []          # skip[b] == b: batch b has room; else a batch to look at next
    after: dict[int, int] = {}
    for i in order:
        b = _first_with_room(skip, max((after.get(key, 0) for key in keys[i]), default=0))
        if b == len(batches):
            batches.append([])
            skip.append(b)
        batches[b].append(i)
        if len(batches[b]) == size:
            skip[b] = b + 1
        for key in keys[i]:
            after[key] = b + 1
    return batches


def _first_with_room(skip: list[int], b: int) -> int:
    """The first batch >= b with room; len(skip) (a new batch) when none. Compresses the path it followed."""
    root = b
    while root < len(skip) and skip[root] != root:
        root = skip[root]
    while b < len(skip) and skip[b] != b:
        skip[b], b = root, skip[b]
    return root


def _top_up(batches: list[list[int]], keys: list, least: int):
    """Brings batches under `least` examples up to it with examples of batches above it that share no text with
    them; donors never go under `least`."""
    donors = [batch for batch in reversed(batches) if len(batch) > least]  # the latest first: the tail's neighbours
    first = 0
    for short in (batch for batch in batches if len(batch) < least):
        taken = set().union(*(keys[i] for i in short))
        for donor in donors[first:]:
            for j in range(len(donor) - 1, -1, -1):
                if len(short) == least or len(donor) == least:
                    break
                if taken.isdisjoint(keys[donor[j]]):
                    taken |= keys[donor[j]]
                    short.append(donor.pop(j))
            if len(short) == least:
                break
        while first < len(donors) and len(donors[first]) == least:  # spent donors are not scanned again
            first += 1


# ---- batches -> tensors --------------------------------------------------------------------------------------------

def collate_text_pairs(examples: list, *, pad_id: int, columns=None) -> dict:
    """For each text column c (all the examples', by default): f"{c}_input_ids" and f"{c}_attention_mask", long
    [batch, longest of that column], right-padded with `pad_id`; "scores" float32 [batch] for scored pairs; "size":
    the number of examples."""
    if not examples:
        raise ValueError("an empty batch")
    if pad_id is None:
        raise ValueError("pad_id is None: the tokenizer has no pad token")
    columns = tuple(columns) if columns is not None else tuple(examples[0].ids)
    batch = {}
    for column in columns:
        if any(column not in example.ids for example in examples):
            raise ValueError(f"column {column!r} is not in every example (they have {tuple(examples[0].ids)})")
        width = max(int(example.ids[column].shape[0]) for example in examples)
        ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(examples), width), dtype=torch.long)
        for b, example in enumerate(examples):
            n = int(example.ids[column].shape[0])
            ids[b, :n] = example.ids[column]
            mask[b, :n] = 1
        batch[f"{column}_input_ids"], batch[f"{column}_attention_mask"] = ids, mask
    if examples[0].score is not None:
        batch["scores"] = torch.tensor([example.score for example in examples], dtype=torch.float32)
    batch["size"] = len(examples)
    return batch
