"""The tokenizer in GGUF form (`tokenizer.ggml.*`), read from a `transformers` fast tokenizer's tokenizer.json.

Two vocabulary kinds cover the supported families:

- byte-level BPE (Llama 3, Qwen, Phi-4 style), GGUF model "gpt2": tokens as stored (byte-level characters),
  the merges, and the pre-tokenizer's name, which tells llama.cpp which split regex to use;
- SentencePiece-like BPE with byte fallback (Llama 2, Mistral, Gemma, Phi-3 style), GGUF model "llama": pieces
  with scores, and the 256 byte tokens <0x00>..<0xFF> that llama.cpp needs for characters outside the vocabulary.
"""
from __future__ import annotations

import json
import logging
import re

from ..errors import UnsupportedError

log = logging.getLogger("velotune")

BYTE_TOKEN = re.compile(r"<0x[0-9A-F]{2}>")

# tokenizer.json split regex -> llama.cpp's name for the pre-tokenizer that applies the same regex.
_PRE_TOKENIZER_REGEX = {
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|"
    r"\s+(?!\S)|\s+": "llama-bpe",
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|"
    r"\s+(?!\S)|\s+": "qwen2",
    r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+": "gpt-2",
}
# Known end-of-turn markers, in the order they are looked for in a chat template.
END_OF_TURN_TOKENS = ("<|eot_id|>", "<|im_end|>", "<end_of_turn>", "<|end|>", "<|eom_id|>", "<|endoftext|>")


def tokenizer_json(tokenizer) -> dict:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise UnsupportedError(f"GGUF export needs a fast tokenizer (tokenizer.json); got {type(tokenizer).__name__}")
    return json.loads(backend.to_str())


def vocab_kind(spec: dict) -> str:
    """"gpt2" (byte-level BPE) or "llama" (SentencePiece-like BPE with byte fallback)."""
    model = spec.get("model") or {}
    if model.get("type") != "BPE":
        raise UnsupportedError(f"GGUF export: tokenizer model {model.get('type')!r} is not supported; "
                               "byte-level BPE and SentencePiece-style BPE (byte_fallback) are")
    return "llama" if model.get("byte_fallback") or _uses_metaspace(spec) else "gpt2"


def _uses_metaspace(spec: dict) -> bool:
    text = json.dumps([spec.get("pre_tokenizer"), spec.get("normalizer")])
    return '"Metaspace"' in text or "\u2581" in text or "\\u2581" in text


def write_vocab(writer, tokenizer, vocab_size: int):
    """Tokens, types, scores or merges, special ids, add_bos/add_eos and the chat template."""
    spec = tokenizer_json(tokenizer)
    kind = vocab_kind(spec)
    tokens, types = token_table(tokenizer, spec, vocab_size, kind)
    writer.add_tokenizer_model(kind)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    if kind == "gpt2":
        writer.add_tokenizer_pre(pre_tokenizer_name(spec))
        writer.add_token_merges(merges_of(spec))
    else:
        present = set(tokens)
        missing = [f"<0x{b:02X}>" for b in range(256) if f"<0x{b:02X}>" not in present]
        if missing:
            raise UnsupportedError(f"GGUF export: this SentencePiece-style vocabulary lacks byte token(s) "
                                   f"{', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''}; llama.cpp needs "
                                   "all 256 (<0x00>..<0xFF>) to encode text outside the vocabulary")
        writer.add_token_scores(spm_scores(tokens, types))
        writer.add_add_space_prefix(adds_space_prefix(spec))
    _write_special_ids(writer, tokenizer)
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):
        template = [{"name": k, "template": v} for k, v in template.items()]
    if template:
        writer.add_chat_template(template)


def token_table(tokenizer, spec: dict, vocab_size: int, kind: str) -> tuple[list[str], list[int]]:
    """Token strings and GGUF token types by id; ids the tokenizer leaves empty (a padded embedding) become
    unused `[PAD<id>]` tokens, as llama.cpp's own converter writes them."""
    import gguf
    vocab = tokenizer.backend_tokenizer.get_vocab(with_added_tokens=True)
    if max(vocab.values()) >= vocab_size:
        raise UnsupportedError(f"GGUF export: the tokenizer has token id {max(vocab.values())} but the model's "
                               f"embedding has only {vocab_size} rows")
    added = {t["id"]: t for t in spec.get("added_tokens", [])}
    unk = (spec.get("model") or {}).get("unk_token")
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    types = [gguf.TokenType.UNUSED] * vocab_size
    for text, i in vocab.items():
        tokens[i] = text
        if i in added:
            types[i] = gguf.TokenType.CONTROL if added[i].get("special") else gguf.TokenType.USER_DEFINED
        elif kind == "llama" and BYTE_TOKEN.fullmatch(text):
            types[i] = gguf.TokenType.BYTE
        elif text == unk:
            types[i] = gguf.TokenType.UNKNOWN
        else:
            types[i] = gguf.TokenType.NORMAL
    if kind == "llama" and unk in vocab:
        types[vocab[unk]] = gguf.TokenType.UNKNOWN
    return tokens, [int(t) for t in types]


def spm_scores(tokens: list[str], types: list[int]) -> list[float]:
    """SentencePiece scores: llama.cpp merges the highest-scoring pair first. A tokenizer.json keeps no scores,
    but a SentencePiece BPE vocabulary lists its pieces in merge order, so -id ranks them the same way."""
    import gguf
    return [-float(i) if t == gguf.TokenType.NORMAL else 0.0 for i, t in enumerate(types)]


def adds_space_prefix(spec: dict) -> bool:
    """Whether text gets a leading "▁" (Llama 2 / Mistral style) before splitting; Gemma's does not."""
    pre, norm = spec.get("pre_tokenizer") or {}, spec.get("normalizer") or {}
    for node in _walk(pre):
        if node.get("type") == "Metaspace":
            return node.get("prepend_scheme", "always" if node.get("add_prefix_space", True) else "never") != "never"
    return any(node.get("type") == "Prepend" for node in _walk(norm))


def _walk(node: dict):
    yield node
    for child in node.get("pretokenizers", []) + node.get("normalizers", []):
        yield from _walk(child)


def pre_tokenizer_name(spec: dict) -> str:
    """llama.cpp's name for the pre-tokenizer; "default" (with a warning) for a regex it does not know."""
    pre = spec.get("pre_tokenizer") or {}
    for node in _walk(pre):
        if node.get("type") == "ByteLevel" and node.get("use_regex", True):
            return "gpt-2"
        if node.get("type") == "Split":
            regex = (node.get("pattern") or {}).get("Regex")
            if regex in _PRE_TOKENIZER_REGEX:
                return _PRE_TOKENIZER_REGEX[regex]
    log.warning("GGUF export: the tokenizer's pre-tokenizer is not one llama.cpp knows; it will split text with "
                "its 'default' rules, which may tokenize some text differently")
    return "default"


def merges_of(spec: dict) -> list[str]:
    merges = (spec.get("model") or {}).get("merges") or []
    return [m if isinstance(m, str) else " ".join(m) for m in merges]


def _write_special_ids(writer, tokenizer):
    for attr, add in (("bos_token_id", writer.add_bos_token_id), ("eos_token_id", writer.add_eos_token_id),
                      ("unk_token_id", writer.add_unk_token_id), ("pad_token_id", writer.add_pad_token_id)):
        value = getattr(tokenizer, attr, None)
        if isinstance(value, int):
            add(value)
    eot = end_of_turn_id(tokenizer)
    if eot is not None:
        writer.add_eot_token_id(eot)
    ids = tokenizer("a")["input_ids"]
    writer.add_add_bos_token(bool(ids) and ids[0] == tokenizer.bos_token_id)
    writer.add_add_eos_token(bool(ids) and ids[-1] == tokenizer.eos_token_id)


def end_of_turn_id(tokenizer) -> int | None:
    """The token that closes a turn in the chat template, when it is a single token other than EOS."""
    text = end_of_turn_text(tokenizer)
    if text is None:
        return None
    ids = tokenizer.encode(text, add_special_tokens=False)
    return ids[0] if len(ids) == 1 and ids[0] != tokenizer.eos_token_id else None


def end_of_turn_text(tokenizer) -> str | None:
    template = getattr(tokenizer, "chat_template", None) or ""
    template = template if isinstance(template, str) else " ".join(template.values())
    return next((t for t in END_OF_TURN_TOKENS if t in template), None)
