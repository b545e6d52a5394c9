"""The checkpoint's tokenizer and chat template, through `transformers` (tokenizer.json, tokenizer_config.json,
chat_template.jinja). A checkpoint without tokenizer files still loads, with a warning."""
from __future__ import annotations

import logging
from pathlib import Path

from ..errors import CheckpointError

log = logging.getLogger("velotune")

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")


def load_tokenizer(model_dir: Path):
    model_dir = Path(model_dir)
    if not any((model_dir / f).is_file() for f in TOKENIZER_FILES):
        log.warning("%s: no tokenizer files (%s); the tokenizer is None", model_dir, ", ".join(TOKENIZER_FILES))
        return None
    try:
        tokenizer = _load_plain_fast_tokenizer(model_dir)
        if tokenizer is None:
            from transformers import AutoTokenizer
            tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    except Exception as exc:  # tokenizers / transformers raise many kinds; each becomes one line naming a file
        raise CheckpointError(_why_not_loadable(model_dir, exc)) from None
    if tokenizer.pad_token_id is None and tokenizer.eos_token is not None:
        # Padding is masked out everywhere; reusing EOS as the pad id keeps batches well-formed.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _why_not_loadable(model_dir: Path, exc: Exception) -> str:
    """The tokenizer file at fault (invalid JSON, or a tokenizer.json the tokenizers library refuses), else the
    library's own reason."""
    from tokenizers import Tokenizer

    from .checkpoint import read_json
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        path = model_dir / name
        if not path.is_file():
            continue
        try:
            read_json(path)
        except CheckpointError as bad_json:
            return str(bad_json)
        except UnicodeDecodeError:
            return f"{path}: not UTF-8 text"
        if name == "tokenizer.json":
            try:
                Tokenizer.from_file(str(path))
            except Exception as refused:
                return f"{path}: not a valid tokenizer file: {_first_line(refused)}"
    return f"{model_dir}: cannot load the tokenizer: {_first_line(exc)}"


def _first_line(exc: Exception) -> str:
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


# Declared classes for which AutoTokenizer itself ends in TokenizersBackend.from_pretrained (transformers 5).
_PLAIN_CLASSES = ("PreTrainedTokenizerFast", "TokenizersBackend")


def _load_plain_fast_tokenizer(model_dir: Path):
    """The tokenizer of a checkpoint that declares the plain tokenizer.json class (the Llama 3 family does), loaded
    as AutoTokenizer would load it, without AutoTokenizer's class resolution: that imports transformers' modelling
    and generation stack (torch._dynamo included), ~170 MB of RSS and seconds of start-up on a CPU. None whenever
    AutoTokenizer could choose another class: remote code, or a model type transformers maps to its own class
    despite the declaration (its MODELS_WITH_INCORRECT_HUB_TOKENIZER_CLASS, Mistral's own backend)."""
    from .checkpoint import read_json
    try:
        from transformers.models.auto.tokenization_auto import (MODELS_WITH_INCORRECT_HUB_TOKENIZER_CLASS,
                                                                TOKENIZER_MAPPING_NAMES)
        config = read_json(model_dir / "tokenizer_config.json")
        model_type = read_json(model_dir / "config.json").get("model_type")
    except Exception:  # another transformers layout, or files missing: AutoTokenizer decides (and explains)
        return None
    if (not isinstance(config, dict) or config.get("tokenizer_class") not in _PLAIN_CLASSES or "auto_map" in config
            or not (model_dir / "tokenizer.json").is_file()
            or (model_type in MODELS_WITH_INCORRECT_HUB_TOKENIZER_CLASS  # its registered class wins: plain too?
                and TOKENIZER_MAPPING_NAMES.get(model_type) not in _PLAIN_CLASSES)
            or TOKENIZER_MAPPING_NAMES.get(model_type) == "MistralCommonBackend"):
        return None
    from transformers import PreTrainedTokenizerFast
    return PreTrainedTokenizerFast.from_pretrained(str(model_dir))
