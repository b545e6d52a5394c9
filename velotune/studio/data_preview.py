"""`preview_data`: what the Train page shows of a data set before a run starts: its format, row count, the chat
template, the first samples as tokens with the trained ones marked, the counts of what was kept and dropped, and
the warnings a run would log.

It runs the code a run runs (`velotune train --dry-run`'s: the objective's `prepare`, the tokenizer alone, the
same sequence length) on the first rows only (at most `stats_rows`, and STATS_CHARS characters of text), so that
it answers within about a second for a large file: encoding is what costs, reading is cheap. The whole file is
still read, so its row count is exact and a malformed line anywhere is reported; for SFT data every row is also
normalised, which finds a row missing a field as training would. Only data.path is read: eval data is not
previewed.
Errors are the run's own ConfigError / DataError / CheckpointError, naming the file and line or the field.
"""
from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import fields, is_dataclass, replace
from pathlib import Path

from ..data.encode import Encoded
from ..data.formats import FORMATS, normalise
from ..data.readers import read_records
from ..errors import ConfigError
from .token_view import token_pieces, trained_flags
from .train_forms import validate_form

STATS_ROWS = 500            # rows encoded for the samples and counts at most (0.2 s of short chat rows)...
STATS_CHARS = 300_000       # ...and characters of text: long rows cost by their length (~2 us a character)
TOKENIZERS_KEPT = 4         # tokenizers kept loaded: the page previews again on every change of the form


def preview_data(model_dir, data_path, values: dict | None = None, *, samples: int = 3,
                 stats_rows: int = STATS_ROWS) -> dict:
    """The data set as a run with the form's `values` would see it; `model_dir` and `data_path`, when given, stand
    for model.path and data.path. Returns {"objective", "format", "format_detected", "rows", "rows_used",
    "max_seq_length", "template": {"name", "source", "description"} or None, "samples": [{"origin", "text",
    "marked", "tokens": [{"id", "text", "trained", "special"}], "trained_tokens", "tokens_total"[, "parts"]}],
    "stats": {... DataStats counts, "dropped": {reason: n}, "rows_encoded", "partial"}, "warnings": [str]}."""
    from ..training.objectives import make_objective
    from ..training.plan import _max_seq_length

    config = _config(model_dir, data_path, values)
    objective = make_objective(config.objective)
    model_path = _model_dir(config.model.path)
    tokenizer, in_use = cached_tokenizer(model_path)
    max_len = _max_seq_length(config, None, [model_path], objective)

    records = read_records(config.data.path)   # every line parsed: the count, and a malformed line anywhere
    used = min(len(records), config.data.max_samples or len(records))
    encoded = _rows_to_encode(records, min(used, stats_rows), least=samples)
    head = replace(config, data=replace(config.data, max_samples=encoded, eval_path=None, eval_fraction=0.0))
    with in_use, _logged_warnings() as warnings:
        data = objective.prepare(head, tokenizer, max_seq_length=max_len, seed=config.train.seed)
        if data.format in FORMATS:  # SFT data: a row training would refuse is refused here too, wherever it is
            for record, where in zip(records[encoded:used], records.origins[encoded:used]):
                normalise(record, data.format, system_prompt=config.data.system_prompt, where=where)
        found = [_sample(objective, example, tokenizer) for example in data.train[:samples]]

    stats = data.stats
    if encoded < used:
        warnings.append(f"the counts are of the first {encoded} of {used} rows (the preview encodes no more)")
    if stats.truncated:
        warnings.append(f"{stats.truncated} of {stats.samples} samples are cut to {max_len} tokens "
                        "(data.max_seq_length; data.overflow: drop leaves them out)")
    template = data.template
    return {"objective": objective.name, "format": data.format, "format_detected": data.format_detected,
            "rows": len(records), "rows_used": used, "max_seq_length": max_len,
            "template": {"name": template.name, "source": template.source, "description": template.describe()}
            if template is not None else None,
            "samples": found,
            "stats": {**stats.as_dict(), "dropped": _dropped(stats), "rows_encoded": encoded,
                      "partial": encoded < used},
            "warnings": warnings}


def _rows_to_encode(records, most: int, *, least: int) -> int:
    """How many of the first rows the preview encodes: up to `most`, while their text stays within STATS_CHARS
    (but at least `least`, the samples shown, and one)."""
    chars = 0
    for n, record in enumerate(records[:most], start=1):
        chars += _text_size(record)
        if chars > STATS_CHARS and n >= least:
            return n
    return max(1, min(most, len(records)))


def _text_size(value) -> int:
    if isinstance(value, str):
        return len(value)
    if isinstance(value, dict):
        return sum(_text_size(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(_text_size(v) for v in value)
    return 0


def _config(model_dir, data_path, values: dict | None):
    form = dict(values or {})
    if model_dir is not None:
        form["model.path"] = str(model_dir)
    if data_path is not None:
        form["data.path"] = [str(p) for p in data_path] if isinstance(data_path, (list, tuple)) else str(data_path)
    check = validate_form(form, complete=True)
    if not check.ok:
        raise ConfigError("; ".join(error["message"] for error in check.errors))
    return check.config


def _model_dir(name: str) -> Path:
    """model.path as a local directory. A hub id is looked up in the local Hugging Face cache only: a preview
    must not start a download of the weights."""
    from ..models.checkpoint import resolve_model_dir
    path = Path(name).expanduser()
    if path.exists() or name.count("/") != 1 or name.startswith((".", "/", "~")):
        return resolve_model_dir(name)  # a local path: the run's own checks and messages
    try:
        from huggingface_hub import snapshot_download
        return Path(snapshot_download(name, local_files_only=True))
    except Exception:  # not in the cache, or no huggingface_hub: either way there is nothing local to read
        raise ConfigError(f"model.path: '{name}' is not a local directory and not in the local Hugging Face cache; "
                          "the preview does not download models (a run does): give a local directory") from None


# ---- the tokenizer, kept between previews ------------------------------------------------------------------------

_tokenizers: OrderedDict = OrderedDict()
_tokenizers_lock = threading.Lock()


def cached_tokenizer(model_dir: Path):
    """(the model directory's tokenizer, the lock to hold while using it). The tokenizer is a run's (pad token
    set, errors naming the file), loaded again only when its files change. The lock: previews of one model may
    come from several request threads, and a Rust tokenizer refuses to be used while another thread changes its
    settings (transformers sets truncation on some calls)."""
    from ..training.plan import _load_tokenizer
    key = (str(Path(model_dir).resolve()), _files_stamp(Path(model_dir)))
    with _tokenizers_lock:
        if key in _tokenizers:
            _tokenizers.move_to_end(key)
            return _tokenizers[key]
    entry = (_load_tokenizer([Path(model_dir)]), threading.Lock())
    with _tokenizers_lock:
        entry = _tokenizers.setdefault(key, entry)  # another thread may have loaded it meanwhile: keep one
        while len(_tokenizers) > TOKENIZERS_KEPT:
            _tokenizers.popitem(last=False)
    return entry


def _files_stamp(model_dir: Path) -> tuple:
    """Name, size and time of the files a tokenizer is read from (weights excluded: they are large and unread)."""
    kinds = (".json", ".jinja", ".model", ".txt")
    return tuple(sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in model_dir.iterdir()
                        if p.is_file() and p.suffix in kinds))


# ---- what comes back -----------------------------------------------------------------------------------------------

def _sample(objective, example, tokenizer) -> dict:
    """One example: its first sequence's text and tokens (with the trained ones marked), the objective's own
    marked view, and every sequence as a part when it holds several (a preference pair's chosen and rejected)."""
    parts = [_part(name, ids, labels, tokenizer) for name, ids, labels in _sequences(example)]
    first = parts[0] if parts else {"text": "", "tokens": [], "trained_tokens": 0, "tokens_total": 0}
    out = {"origin": getattr(example, "origin", ""), "text": first["text"],
           "marked": objective.sample_view(example, tokenizer), "tokens": first["tokens"],
           "trained_tokens": first["trained_tokens"], "tokens_total": first["tokens_total"]}
    if len(parts) > 1:
        out["parts"] = parts
    return out


def _sequences(example) -> list[tuple[str, list, list | None]]:
    """(name, token ids, labels or None) of each token sequence an example holds: an Encoded is one; other
    objectives' examples hold Encoded fields (chosen / rejected), ids (a prompt) or a dict of ids (text pairs)."""
    if isinstance(example, Encoded):
        return [("sample", example.input_ids.tolist(), example.labels.tolist())]
    found = []
    for f in fields(example) if is_dataclass(example) else ():
        value = getattr(example, f.name)
        if isinstance(value, Encoded):
            found.append((f.name, value.input_ids.tolist(), value.labels.tolist()))
        elif f.name.endswith("ids") and hasattr(value, "tolist"):
            found.append((f.name, value.tolist(), None))
        elif f.name.endswith("ids") and isinstance(value, dict):
            found += [(name, ids.tolist(), None) for name, ids in value.items() if hasattr(ids, "tolist")]
    return found


def _part(name: str, ids: list, labels: list | None, tokenizer) -> dict:
    trained = trained_flags(labels) if labels is not None else None
    return {"name": name, "text": tokenizer.decode(ids, skip_special_tokens=False),
            "tokens": token_pieces(tokenizer, ids, trained), "trained_tokens": sum(trained or ()),
            "tokens_total": len(ids)}


def _dropped(stats) -> dict:
    dropped = {"too long": stats.dropped_too_long, "no trained tokens": stats.dropped_fully_masked,
               **stats.dropped_bad}
    return {reason: n for reason, n in dropped.items() if n}


@contextmanager
def _logged_warnings():
    """The warnings velotune logs in this thread meanwhile (a run's log would show them), as a list of lines."""
    lines: list[str] = []
    this_thread = threading.get_ident()

    class Collect(logging.Handler):
        def emit(self, record):
            if record.thread == this_thread:
                lines.append(record.getMessage())

    handler = Collect(logging.WARNING)
    logger = logging.getLogger("velotune")
    logger.addHandler(handler)
    try:
        yield lines
    finally:
        logger.removeHandler(handler)
