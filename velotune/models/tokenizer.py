"""The checkpoint's tokenizer and chat template, through `transformers` (tokenizer.json, tokenizer_config.json,
chat_template.jinja). A checkpoint without tokenizer files still loads, with a warning."""
from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger("velotune")

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")


def load_tokenizer(model_dir: Path):
    model_dir = Path(model_dir)
    if not any((model_dir / f).is_file() for f in TOKENIZER_FILES):
        log.warning("%s: no tokenizer files (%s); the tokenizer is None", model_dir, ", ".join(TOKENIZER_FILES))
        return None
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    if tokenizer.pad_token_id is None and tokenizer.eos_token is not None:
        # Padding is masked out everywhere; reusing EOS as the pad id keeps batches well-formed.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer
