"""What the data sets of the objectives beyond SFT share (preference pairs, KTO rows, RL prompts): records parsed
one by one, a bad row dropped, counted by reason and named in the log, never lost silently; the held-out split
(data.eval_path, else data.eval_fraction); and the checks made before anything is read."""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable

from ..errors import ConfigError, DataError
from .dataset import _source_name, _split
from .readers import read_records

log = logging.getLogger("velotune")

NAMED_IN_LOG = 5  # bad rows named per reason (all are counted)


class BadRow(Exception):
    """A record that cannot make an example; its reason is what the log counts it under."""


@dataclass
class ParsedRows:
    rows: list                  # what `parse` made of each good record
    records: int                # records read for this split
    name: str                   # the file(s), or "the eval split", for messages
    bad: dict = field(default_factory=dict)   # reason -> the origins (file:line) of the rows dropped for it


def check_source(data_cfg, tokenizer, reads: str, objective: str):
    """The errors that need no reading: no data.path, an SFT data.format, no tokenizer."""
    if not data_cfg.path:
        raise ConfigError(f"data.path is not set: give a jsonl, json, csv or parquet file of {reads}")
    if data_cfg.format != "auto":
        raise ConfigError(f"data.format: {data_cfg.format!r} is an SFT format; {objective} read(s) {reads} (leave "
                          "data.format auto)")
    if tokenizer is None:
        raise ConfigError("the model has no tokenizer files: velotune needs a tokenizer to encode data.path")


def parse_rows(path, parse: Callable, *, max_samples=None, check_first: Callable | None = None) -> ParsedRows:
    """`parse(record, origin)` for every record of `path`; BadRow drops and counts one. `check_first(record,
    origin)` may refuse the whole file from its first record (another objective's format)."""
    name = _source_name(path)
    records = read_records(path)
    if max_samples:
        records = records.head(max_samples)
    if not records:
        raise DataError(f"no records in {name}")
    if check_first is not None:
        check_first(records[0], records.origins[0])
    parsed = ParsedRows([], len(records), name)
    for record, where in zip(records, records.origins):
        try:
            parsed.rows.append(parse(record, where))
        except BadRow as exc:
            parsed.bad.setdefault(str(exc), []).append(where)
    return parsed


def read_and_split(data_cfg, parse: Callable, *, seed: int, check_first: Callable | None = None):
    """(train rows, held-out rows or None): data.eval_path parsed the same way, else a seeded data.eval_fraction of
    data.path's good rows."""
    train = parse_rows(data_cfg.path, parse, max_samples=data_cfg.max_samples, check_first=check_first)
    if data_cfg.eval_path:
        return train, parse_rows(data_cfg.eval_path, parse, check_first=check_first)
    train.rows, held = _split(train.rows, data_cfg.eval_fraction, seed)
    train.records -= len(held)
    return train, (ParsedRows(held, len(held), "the eval split") if held else None)


def note_rows(stats, parsed: ParsedRows):
    """Puts the split's record and bad-row counts in its DataStats and names the bad rows in the log."""
    stats.records = parsed.records
    stats.dropped_bad = {reason: len(rows) for reason, rows in parsed.bad.items()}
    for reason, rows in parsed.bad.items():
        named = ", ".join(rows[:NAMED_IN_LOG]) + (f" and {len(rows) - NAMED_IN_LOG} more"
                                                  if len(rows) > NAMED_IN_LOG else "")
        log.warning("%s: dropped %d row%s (%s): %s", parsed.name, len(rows), "" if len(rows) == 1 else "s", reason,
                    named)


def bad_reasons(parsed: ParsedRows) -> list[str]:
    return [f"{len(rows)} bad ({reason})" for reason, rows in parsed.bad.items()]
