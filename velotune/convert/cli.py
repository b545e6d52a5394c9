"""`velotune convert ct2-whisper SRC OUT [--dtype float32]`: models in other formats -> Hugging Face directories."""
from __future__ import annotations


def add_convert_parser(subparsers):
    p = subparsers.add_parser("convert", help="convert a model from another format into a Hugging Face directory")
    kinds = p.add_subparsers(dest="kind", required=True)
    from .ctranslate2_whisper import OUTPUT_DTYPES
    w = kinds.add_parser("ct2-whisper", help="a CTranslate2 (faster-whisper) Whisper model: model.bin + "
                                             "tokenizer.json")
    w.add_argument("src", help="directory with model.bin and tokenizer.json")
    w.add_argument("out", help="output directory (new, empty, or one velotune wrote)")
    w.add_argument("--dtype", choices=OUTPUT_DTYPES, default="float32")
    w.set_defaults(func=_ct2_whisper)
    return p


def _ct2_whisper(ns):
    from .ctranslate2_whisper import convert_ct2_whisper
    print(f"wrote {convert_ct2_whisper(ns.src, ns.out, dtype=ns.dtype)}")
