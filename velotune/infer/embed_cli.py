"""`velotune embed MODEL --input FILE [--output OUT]`: embeddings of a file's texts with a sentence-transformers model.

Input: a text file, one text per line, or a .jsonl file whose records hold the text under --text-field ("text").
Empty lines (and empty texts) are skipped and counted. Output, by its suffix: .jsonl, one record per embedded
text {"index": the text's 0-based line in the input, "text", "embedding"}, or .npy, a float32 array [texts,
dimension] whose rows follow the embedded texts in order. Default output: INPUT's name with `.embeddings.jsonl`
beside it. An existing output is kept unless --overwrite; the file appears whole or not at all.

Everything that can be checked before the model loads (input readable and non-empty, output free) is."""
from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

from ..errors import ConfigError, DataError

log = logging.getLogger("velotune")

DESCRIPTION = ("Embeds each text of FILE (one per line; .jsonl: each record's --text-field) and writes OUT: .jsonl "
               "records {index: the text's 0-based line in FILE, text, embedding}, or a .npy float32 array [texts, "
               "dimension]. Empty lines are skipped and counted; texts over the model's max_seq_length are "
               "truncated and counted. An existing OUT is kept unless --overwrite; OUT appears whole or not at all.")
OUTPUT_SUFFIXES = (".jsonl", ".npy")


def add_embed_parser(subparsers):
    """Adds the `embed` subcommand to the `velotune` command's subparsers."""
    p = subparsers.add_parser("embed", help="embed the texts of a file (one per line, or .jsonl) with a "
                                            "sentence-transformers model; writes .jsonl or .npy",
                              description=DESCRIPTION)
    p.add_argument("model", help="a sentence-transformers (or Hugging Face encoder) directory or hub id")
    p.add_argument("--input", required=True, metavar="FILE",
                   help="one text per line; a .jsonl file gives each record's --text-field")
    p.add_argument("--output", metavar="OUT", help="a .jsonl or .npy file (default: INPUT's name + "
                                                   ".embeddings.jsonl, beside it)")
    p.add_argument("--text-field", dest="text_field", default="text", help=".jsonl input: the field holding the "
                                                                           "text (default: text)")
    p.add_argument("--no-text", dest="with_text", action="store_false",
                   help=".jsonl output: leave the text out of each record")
    p.add_argument("--batch-size", dest="batch_size", type=_positive, default=32, help="texts per batch "
                                                                                       "(default: 32)")
    prompt = p.add_mutually_exclusive_group()
    prompt.add_argument("--prompt", help="a prefix put before every text, e.g. 'query: '")
    prompt.add_argument("--prompt-name", dest="prompt_name",
                        help="one of the model's named prompts (e.g. query, document); default: its default prompt")
    p.add_argument("--adapter", metavar="DIR", help="a LoRA adapter directory (PEFT format) to apply")
    p.add_argument("--max-seq-length", dest="max_seq_length", type=_positive,
                   help="tokens per text; longer texts are truncated (default: the model's)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                   help="default: bf16 on a GPU, fp32 on most CPUs")
    p.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    p.add_argument("--threads", type=_positive, help="torch CPU threads")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    p.set_defaults(func=run_embed)
    return p


def _positive(text: str) -> int:
    import argparse
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value}")
    return value


# ---- files in and out ----------------------------------------------------------------------------------------

def output_path(input_path: Path, output: str | None, overwrite: bool) -> Path:
    """The output file, checked before any work: a known suffix, not the input, free unless `overwrite`."""
    out = Path(output) if output else input_path.with_name(input_path.stem + ".embeddings.jsonl")
    if out.suffix.lower() not in OUTPUT_SUFFIXES:
        raise ConfigError(f"--output {out}: expected a file ending in {' or '.join(OUTPUT_SUFFIXES)}")
    if out.resolve() == input_path.resolve():
        raise ConfigError(f"--output {out} is the input file")
    if out.is_dir():
        raise ConfigError(f"--output {out}: is a directory; name a .jsonl or .npy file")
    if out.exists() and not overwrite:
        raise ConfigError(f"{out}: already exists (pass --overwrite to replace it)")
    return out


def read_texts(path: Path, text_field: str = "text") -> tuple[list[int], list[str], int]:
    """(line indexes, texts, empty lines skipped) of a text file (one text per line) or a .jsonl file."""
    if not path.is_file():
        raise DataError(f"{path}: no such file" if not path.exists() else f"{path}: not a file")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as exc:
        line = path.read_bytes()[:exc.start].count(b"\n") + 1
        raise DataError(f"{path}, line {line}: not UTF-8 text ({exc.reason})") from None
    is_jsonl = path.suffix.lower() == ".jsonl"
    indexes, texts, skipped = [], [], 0
    for i, line in enumerate(lines):
        text = _jsonl_text(path, i + 1, line, text_field) if is_jsonl and line.strip() else line
        if not text.strip():
            skipped += 1
            continue
        indexes.append(i)
        texts.append(text)
    if not texts:
        what = "is empty" if not lines else f"has only empty {'texts' if is_jsonl else 'lines'} ({len(lines)})"
        raise DataError(f"{path}: nothing to embed: the file {what}")
    return indexes, texts, skipped


def _jsonl_text(path: Path, line_no: int, line: str, field: str) -> str:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}, line {line_no}: not valid JSON ({exc.msg}, column {exc.colno})") from None
    if not isinstance(record, dict) or field not in record:
        keys = ", ".join(map(str, record)) if isinstance(record, dict) else type(record).__name__
        raise DataError(f"{path}, line {line_no}: no field {field!r} (found: {keys}); name it with --text-field")
    if not isinstance(record[field], str):
        raise DataError(f"{path}, line {line_no}: field {field!r} is {type(record[field]).__name__}, not text")
    return record[field]


def write_embeddings(out: Path, vectors, indexes, texts, with_text: bool = True, overwrite: bool = False):
    """Writes .jsonl or .npy to a temporary file beside `out`, then renames it into place (never half a file)."""
    import numpy as np

    from ..models.checkpoint import publish_file, temporary_file_beside
    if out.exists() and not overwrite:   # checked at the start too; a file may have appeared since
        raise ConfigError(f"{out}: already exists (pass --overwrite to replace it)")
    out.parent.mkdir(parents=True, exist_ok=True)
    array = vectors.numpy().astype(np.float32, copy=False)
    tmp = temporary_file_beside(out)
    try:
        with open(tmp, "wb") as f:
            if out.suffix.lower() == ".npy":
                np.save(f, array)   # a file object: np.save would add ".npy" to a temporary name
            else:
                for index, text, row in zip(indexes, texts, array, strict=True):
                    record = {"index": index, **({"text": text} if with_text else {}), "embedding": row.tolist()}
                    f.write((json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8"))
        publish_file(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


# ---- tokens ------------------------------------------------------------------------------------------------

def load_embedder(model, adapter=None, dtype=None, device=None, max_seq_length=None):
    """(SentenceEncoder, tokenizer) ready to encode, with the adapter applied (not merged)."""
    from ..embeddings.st_format import load_sentence_model
    encoder, tokenizer = load_sentence_model(model, dtype=dtype, device=device, max_seq_length=max_seq_length)
    if tokenizer is None:
        raise ConfigError(f"{model}: no tokenizer files; embedding texts needs a tokenizer")
    if adapter:
        from ..lora import load_adapter
        load_adapter(encoder, adapter, trainable=False)
    return encoder.eval(), tokenizer


# ---- the command -------------------------------------------------------------------------------------------

def run_embed(ns):
    input_path = Path(ns.input)
    out = output_path(input_path, ns.output, ns.overwrite)
    indexes, texts, skipped = read_texts(input_path, ns.text_field)
    if skipped:
        log.warning("%s: %d empty line(s) skipped%s", input_path, skipped,
                    "; the .npy rows follow the embedded texts" if out.suffix.lower() == ".npy" else "")
    if ns.threads:
        import torch
        torch.set_num_threads(ns.threads)
    encoder, tokenizer = load_embedder(ns.model, ns.adapter, ns.dtype, ns.device, ns.max_seq_length)
    prefix = encoder.prompt_text(ns.prompt, ns.prompt_name)   # an unknown prompt name fails before the work
    limit = encoder.max_seq_length
    if limit:
        long = [indexes[i] + 1 for i, n in enumerate(encoder.token_lengths(tokenizer, texts, prefix)) if n > limit]
        if long:
            shown = ", ".join(map(str, long[:10])) + (", ..." if len(long) > 10 else "")
            log.warning("%s: %d text(s) longer than the model's %d tokens were truncated (line %s)", input_path,
                        len(long), limit, shown)
    with _ProgressBar(len(texts), ns.progress) as bar:
        vectors = encoder.encode(tokenizer, texts, batch_size=ns.batch_size, prompt=prefix, progress=bar.update)
    write_embeddings(out, vectors, indexes, texts, ns.with_text, ns.overwrite)
    print(f"wrote {len(texts)} embeddings of dimension {encoder.dimension} to {out}")
    return 0


class _ProgressBar:
    """A tqdm bar over texts (texts/s and ETA); `update(done, total)` is encode's progress callback. Hidden when
    stderr is not a terminal (logs stay clean) or with --no-progress."""

    def __init__(self, total: int, enabled: bool = True):
        from tqdm.auto import tqdm
        self.bar = tqdm(total=total, unit="text", desc="embed", dynamic_ncols=True, file=sys.stderr,
                        disable=None if enabled else True)
        self.done = 0

    def update(self, done: int, total: int):
        self.bar.update(done - self.done)
        self.done = done

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.bar.close()
