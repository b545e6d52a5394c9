"""A real, offline retrieval data set: the docstrings of Python's own standard library.

Each function's or method's summary (the first sentence of its docstring) is a query; the rest of its docstring is
the one relevant document. The text was written by CPython's authors, not by us, is installed wherever Python is,
and is fixed within a Python version, so the set is the same on every machine with that version (written to
manifest.json). The source files are parsed with `ast`, never imported: no import side effects, no dependence on the
platform (both branches of `if sys.platform == ...` are read), on C accelerators or on `python -OO`.

Output (`build_docstring_corpus`):
  train.jsonl            {"anchor": summary, "positive": body} per line: velotune's embedding-training format
  train_functions.txt    the function behind each train.jsonl line ("module:Class.method"), same order
  eval/queries.jsonl     {"_id", "text"} (BEIR);  eval/corpus.jsonl {"_id", "text"};  eval/qrels.tsv
  manifest.json          Python version, modules read, seed, filters and counts

The held-out corpus holds the bodies of the held-out queries' functions plus `distractors` bodies of further
held-out functions whose summaries are not used; no train document is in it. So no function is in both splits,
and the eval set (and its scores) does not change with `train_pairs`.
"""
from __future__ import annotations

import argparse
import ast
import json
import random
import re
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

# Pure-Python standard-library modules with usable docstrings in CPython 3.11. Left out: modules removed in
# 3.12/3.13 (asyncore, cgi, nntplib, telnetlib, ...), those Debian ships apart (tkinter, turtle, idlelib, lib2to3)
# and those it patches (site, sysconfig).
# A module missing from another Python version is skipped and named in manifest.json. The list is the data set:
# append to it, never reorder.
MODULES = (
    "_collections_abc", "_py_abc", "_pydecimal", "_pyio", "_strptime", "abc", "argparse", "ast",
    "asyncio.base_events", "asyncio.events", "asyncio.futures", "asyncio.locks", "asyncio.protocols",
    "asyncio.queues", "asyncio.runners", "asyncio.selector_events", "asyncio.sslproto", "asyncio.streams",
    "asyncio.tasks", "asyncio.timeouts", "asyncio.transports", "asyncio.unix_events", "asyncio.windows_events",
    "base64", "bdb", "bisect", "bz2", "calendar", "cmd", "code", "codecs", "codeop", "collections", "compileall",
    "concurrent.futures._base", "concurrent.futures.process", "configparser", "contextlib", "csv", "ctypes",
    "dataclasses", "datetime", "dbm", "difflib", "dis", "email._encoded_words", "email._header_value_parser",
    "email._parseaddr", "email._policybase", "email.base64mime", "email.charset", "email.feedparser",
    "email.generator", "email.header", "email.headerregistry", "email.message", "email.parser", "email.policy",
    "email.quoprimime", "email.utils", "enum", "filecmp", "fileinput", "fractions", "ftplib", "functools",
    "genericpath", "getopt", "getpass", "glob", "graphlib", "gzip", "heapq", "hmac", "html", "html.parser", "http",
    "http.client", "http.cookiejar", "http.cookies", "http.server", "imaplib", "importlib._abc",
    "importlib._bootstrap", "importlib._bootstrap_external", "importlib.abc", "importlib.metadata",
    "importlib.resources._legacy", "importlib.resources.abc", "importlib.util", "inspect", "ipaddress", "json",
    "json.decoder", "json.encoder", "linecache", "locale", "logging", "logging.config", "logging.handlers", "lzma",
    "mimetypes", "modulefinder", "multiprocessing.forkserver", "multiprocessing.managers",
    "multiprocessing.shared_memory", "numbers", "operator", "optparse", "os", "pathlib", "pdb", "pickle",
    "pickletools", "pkgutil", "platform", "poplib", "pprint", "pstats", "py_compile", "pyclbr", "pydoc", "queue",
    "quopri", "random", "re", "rlcompleter", "runpy", "sched", "secrets", "selectors", "shelve", "shutil",
    "smtplib", "socket", "socketserver", "ssl", "statistics", "subprocess", "symtable", "tarfile",
    "tempfile", "textwrap", "threading", "timeit", "tokenize", "trace", "traceback", "tracemalloc", "types",
    "typing", "unittest.case", "unittest.loader", "unittest.mock", "unittest.result", "unittest.suite",
    "urllib.parse", "urllib.request", "urllib.robotparser", "uuid", "warnings", "wave", "weakref", "webbrowser",
    "wsgiref.handlers", "wsgiref.headers", "wsgiref.util", "xml.dom.minidom", "xml.etree.ElementTree",
    "xml.sax._exceptions", "xml.sax.handler", "xml.sax.saxutils", "xml.sax.xmlreader", "xmlrpc.client",
    "xmlrpc.server", "zipapp", "zipfile", "zipimport",
)


@dataclass(frozen=True)
class DocPair:
    function: str  # "module:Class.method"
    summary: str
    body: str


SUMMARY_WORDS = (4, 30)
MIN_BODY_WORDS = 15
MAX_BODY_WORDS = 200  # encoders like MiniLM read 256 tokens: longer bodies would only cost encoding time
# A summary ends at the first sentence end: . ! or ? then space and a capital, quote or bracket ("e.g. x" does not)
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z`'\"(])")
_SIGNATURE = re.compile(r"^[\w.]+\(.*\)\s*(->.*)?$")  # "f(a, b) -> c" is a call signature, not a summary


def stdlib_file(module: str) -> Path | None:
    """The source file of a standard-library module (a package's __init__.py), or None where this Python lacks it."""
    base = Path(sysconfig.get_paths()["stdlib"]).joinpath(*module.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def _definitions(node: ast.AST, prefix: str = ""):
    """(qualified name, docstring) of functions, classes and methods in source order, including those under
    module-level if/try (platform branches); functions nested in functions are private detail and skipped."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            doc = ast.get_docstring(child, clean=True)
            if doc:
                yield prefix + child.name, doc
            if isinstance(child, ast.ClassDef):
                yield from _definitions(child, f"{prefix}{child.name}.")
        elif isinstance(child, (ast.If, ast.Try)):
            yield from _definitions(child, prefix)


def _without_doctests(doc: str) -> str:
    """Drop doctest examples: each '>>>' line and the lines after it up to the next blank line (their output)."""
    kept, in_example = [], False
    for line in doc.splitlines():
        stripped = line.strip()
        in_example = stripped.startswith(">>>") or (in_example and bool(stripped))
        if not in_example:
            kept.append(line)
    return "\n".join(kept)


def _words(text: str) -> str:
    """Lower-case words, for comparing texts regardless of case, punctuation and spacing."""
    return " ".join(re.findall(r"\w+", text.lower()))


def split_docstring(doc: str) -> tuple[str, str] | None:
    """(summary, body) of a docstring, each on one line, or None when it fails the filters: the summary is the first
    sentence (4-30 words, not a call signature), the body all that follows without doctest examples (>= 15 words,
    cut to 200, not repeating the summary)."""
    first, _, rest = _without_doctests(doc).strip().partition("\n\n")
    first = " ".join(first.split())
    summary, *more = _SENTENCE_END.split(first, maxsplit=1)
    body = " ".join(" ".join(more + [rest]).split())
    if not SUMMARY_WORDS[0] <= len(summary.split()) <= SUMMARY_WORDS[1] or _SIGNATURE.match(summary):
        return None
    if len(body.split()) < MIN_BODY_WORDS or f" {_words(summary)} " in f" {_words(body)} ":
        return None
    return summary, " ".join(body.split()[:MAX_BODY_WORDS])


def docstring_pairs(modules=MODULES) -> tuple[list[DocPair], list[str]]:
    """(pairs in module-list and source order, modules this Python lacks). A name defined twice (platform branches)
    keeps its first definition; a summary or body seen before (an inherited or copied docstring) is dropped, so no
    text answers two ways."""
    pairs, missing, names, summaries, bodies = [], [], set(), set(), set()
    for module in modules:
        path = stdlib_file(module)
        if path is None:
            missing.append(module)
            continue
        for name, doc in _definitions(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
            function, split = f"{module}:{name}", split_docstring(doc)
            if function in names or split is None:
                continue
            names.add(function)
            summary_key, body_key = _words(split[0]), _words(split[1])
            if summary_key in summaries or body_key in bodies:
                continue
            summaries.add(summary_key)
            bodies.add(body_key)
            pairs.append(DocPair(function, *split))
    return pairs, missing


def build_docstring_corpus(out_dir, *, eval_queries: int = 200, train_pairs: int | None = None,
                           distractors: int = 300, seed: int = 0) -> dict:
    """Write the train pairs and the held-out retrieval set (layout in the module docstring) under `out_dir`.
    The pairs are shuffled with `seed`; the first `eval_queries` are held-out queries, the next `distractors` add only
    their bodies to the held-out corpus, and the rest (or the first `train_pairs` of it) are train pairs.
    Returns the paths and counts."""
    from .retrieval import RetrievalSet  # imports torch: only needed when building

    pairs, missing = docstring_pairs()
    random.Random(seed).shuffle(pairs)
    held_out = eval_queries + distractors
    if held_out > len(pairs):
        raise ValueError(f"eval_queries + distractors = {held_out}, but this Python's standard library gives "
                         f"{len(pairs)} pairs")
    rest = pairs[held_out:]
    if train_pairs is not None and train_pairs > len(rest):
        raise ValueError(f"train_pairs={train_pairs}, but only {len(rest)} pairs are left after the "
                         f"{held_out} held out (of {len(pairs)} from this Python's standard library)")
    train = rest if train_pairs is None else rest[:train_pairs]

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # q:/d: prefixes keep query and document ids apart: BEIR-style tools skip a hit whose id equals the query's
    queries = {f"q:{p.function}": p.summary for p in pairs[:eval_queries]}
    corpus = {f"d:{p.function}": p.body for p in sorted(pairs[:held_out], key=lambda p: p.function)}
    relevant = {f"q:{p.function}": {f"d:{p.function}"} for p in pairs[:eval_queries]}
    RetrievalSet(queries, corpus, relevant).write(out / "eval")
    _write_lines(out / "train.jsonl", (json.dumps({"anchor": p.summary, "positive": p.body}, ensure_ascii=False)
                                       for p in train))
    _write_lines(out / "train_functions.txt", (p.function for p in train))
    counts = {"available_pairs": len(pairs), "eval_queries": len(queries), "eval_corpus": len(corpus),
              "distractors": distractors, "train_pairs": len(train)}
    manifest = {"source": "docstrings of the Python standard library", "python": platform_version(),
                "modules": len(MODULES) - len(missing), "modules_missing": missing, "seed": seed,
                "filters": {"summary_words": list(SUMMARY_WORDS), "min_body_words": MIN_BODY_WORDS,
                            "max_body_words": MAX_BODY_WORDS},
                "counts": counts}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
    return {"train": out / "train.jsonl", "train_functions": out / "train_functions.txt", "eval": out / "eval",
            "manifest": out / "manifest.json", **counts, "python": manifest["python"]}


def platform_version() -> str:
    """The interpreter the text came from, e.g. 'CPython 3.11.7': the data set is fixed per version."""
    import platform
    return f"{platform.python_implementation()} {platform.python_version()}"


def _write_lines(path: Path, lines) -> None:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m velotune.embeddings.docstring_corpus",
                                     description="Build a retrieval data set from the standard library's docstrings.")
    parser.add_argument("out_dir")
    parser.add_argument("--eval-queries", type=int, default=200)
    parser.add_argument("--distractors", type=int, default=300)
    parser.add_argument("--train-pairs", type=int, default=None, help="default: all pairs not held out")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        result = build_docstring_corpus(args.out_dir, eval_queries=args.eval_queries, train_pairs=args.train_pairs,
                                        distractors=args.distractors, seed=args.seed)
    except ValueError as exc:
        parser.exit(2, f"error: {exc}\n")
    print(f"{result['python']}: {result['available_pairs']} docstring pairs")
    print(f"held out: {result['eval_queries']} queries, {result['eval_corpus']} documents -> {result['eval']}")
    print(f"train:    {result['train_pairs']} pairs -> {result['train']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
