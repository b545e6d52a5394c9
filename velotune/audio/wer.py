"""Word and character error rates (WER, CER) of transcripts against their references.

    word_error_rate(["the cat sat"], ["the cat sad"])   # 1/3
    char_error_rate("hello world", "hello word")         # 1/11
    word_errors(refs, hyps)   # ErrorCounts: substitutions, deletions, insertions, reference_length, rate

Both rates are corpus-level: the edits summed over all pairs, divided by the reference words (characters) summed
over all pairs, so a long utterance weighs more than a short one (as jiwer and the usual benchmark scripts count).
The edits are the minimal Levenshtein alignment of the word (character) sequences; among alignments of equal
cost the split into substitutions, deletions and insertions prefers substitutions, then deletions.

The text normaliser (`normalize_text`, applied to references and hypotheses alike unless normalize=False) is a basic
English one, so that a transcript is not charged for casing or punctuation:
  - Unicode NFKC (full-width letters, ligatures and the like become their plain forms), then lower case;
  - apostrophes (' and ’) are removed, so "don't" and "dont" are one word;
  - every other punctuation mark or symbol becomes a space, except . , and : between two digits ("3.5", "1,000",
    "10:30" stay as written);
  - runs of whitespace collapse to one space; leading and trailing spaces go.
Numbers are left as written: "twenty" and "20" stay different words. Spelling variants ("colour"/"color") and
contractions ("do not"/"don't") are not merged.
The character rate counts the characters of the normalised text, the single spaces between words included.
"""
from __future__ import annotations

import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass

APOSTROPHES = ("'", "\u2019")
NUMBER_JOINERS = (".", ",", ":")   # kept between two digits: decimals, thousands, clock times


def normalize_text(text: str) -> str:
    """`text` lower-cased, without punctuation and symbols, its whitespace collapsed (see the module docstring)."""
    if not isinstance(text, str):
        raise TypeError(f"normalize_text takes a str, got {type(text).__name__}")
    text = unicodedata.normalize("NFKC", text).lower()
    out = []
    for i, ch in enumerate(text):
        if ch in APOSTROPHES:
            continue
        if ch in NUMBER_JOINERS and 0 < i < len(text) - 1 and text[i - 1].isdigit() and text[i + 1].isdigit():
            out.append(ch)
        elif unicodedata.category(ch)[0] in "PS":  # punctuation, symbols (math, currency, modifiers, other)
            out.append(" ")
        else:
            out.append(ch)
    return " ".join("".join(out).split())


@dataclass(frozen=True)
class ErrorCounts:
    """Edits of the minimal alignment of hypotheses to references, and the reference length (words or chars)."""
    substitutions: int = 0
    deletions: int = 0
    insertions: int = 0
    reference_length: int = 0

    @property
    def errors(self) -> int:
        return self.substitutions + self.deletions + self.insertions

    @property
    def rate(self) -> float:
        """errors / reference_length; ValueError when the references hold nothing to compare against."""
        if self.reference_length == 0:
            raise ValueError("the references are empty (after normalisation): an error rate needs at least one "
                             "reference word or character")
        return self.errors / self.reference_length

    def __add__(self, other: "ErrorCounts") -> "ErrorCounts":
        return ErrorCounts(self.substitutions + other.substitutions, self.deletions + other.deletions,
                           self.insertions + other.insertions, self.reference_length + other.reference_length)


def edit_counts(reference: Sequence, hypothesis: Sequence) -> ErrorCounts:
    """The minimal Levenshtein alignment of two sequences (of words, characters, ids ...) as its edit counts."""
    # One row of the alignment table at a time; each cell is (cost, substitutions, deletions, insertions) of the
    # best alignment of the prefixes, ties broken towards substitutions, then deletions.
    previous = [(j, 0, 0, j) for j in range(len(hypothesis) + 1)]
    for i, ref_item in enumerate(reference, start=1):
        current = [(i, 0, i, 0)]
        for j, hyp_item in enumerate(hypothesis, start=1):
            cost, s, d, n = previous[j - 1]
            if ref_item == hyp_item:
                best = (cost, s, d, n)
            else:
                best = (cost + 1, s + 1, d, n)
            cost, s, d, n = previous[j]           # the reference item left out
            if cost + 1 < best[0]:
                best = (cost + 1, s, d + 1, n)
            cost, s, d, n = current[j - 1]        # the hypothesis item left over
            if cost + 1 < best[0]:
                best = (cost + 1, s, d, n + 1)
            current.append(best)
        previous = current
    _, s, d, n = previous[-1]
    return ErrorCounts(s, d, n, len(reference))


def _pairs(references, hypotheses) -> list[tuple[str, str]]:
    refs = [references] if isinstance(references, str) else list(references)
    hyps = [hypotheses] if isinstance(hypotheses, str) else list(hypotheses)
    if len(refs) != len(hyps):
        raise ValueError(f"{len(refs)} references but {len(hyps)} hypotheses: give one hypothesis per reference")
    for what, texts in (("reference", refs), ("hypothesis", hyps)):
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise TypeError(f"{what} {i} is a {type(text).__name__}, not a str")
    return list(zip(refs, hyps))


def word_errors(references, hypotheses, *, normalize: bool = True) -> ErrorCounts:
    """Word edits summed over the pairs (a str each, or lists of str of the same length)."""
    total = ErrorCounts()
    for ref, hyp in _pairs(references, hypotheses):
        if normalize:
            ref, hyp = normalize_text(ref), normalize_text(hyp)
        total += edit_counts(ref.split(), hyp.split())
    return total


def char_errors(references, hypotheses, *, normalize: bool = True) -> ErrorCounts:
    """Character edits summed over the pairs; without normalisation the texts count as written (whitespace
    included, but trimmed at both ends)."""
    total = ErrorCounts()
    for ref, hyp in _pairs(references, hypotheses):
        if normalize:
            ref, hyp = normalize_text(ref), normalize_text(hyp)
        total += edit_counts(ref.strip(), hyp.strip())
    return total


def word_error_rate(references, hypotheses, *, normalize: bool = True) -> float:
    """Corpus WER: word edits / reference words, over all pairs."""
    return word_errors(references, hypotheses, normalize=normalize).rate


def char_error_rate(references, hypotheses, *, normalize: bool = True) -> float:
    """Corpus CER: character edits / reference characters, over all pairs."""
    return char_errors(references, hypotheses, normalize=normalize).rate


__all__ = ["ErrorCounts", "char_error_rate", "char_errors", "edit_counts", "normalize_text", "word_error_rate",
           "word_errors"]
