"""velotune.audio.wer: word and character error rates equal to jiwer's (corpus-level, on the same texts), the edit
breakdown, and the basic English normaliser (case, punctuation, apostrophes, numbers as written)."""
import pytest

from velotune.audio.wer import (ErrorCounts, char_error_rate, char_errors, edit_counts, normalize_text,
                                word_error_rate, word_errors)

jiwer = pytest.importorskip("jiwer")

PAIRS = [
    ("the cat sat on the mat", "the cat sat on mat"),                 # a deletion
    ("hello world", "hello there world"),                             # an insertion
    ("a b c d", "x b c"),                                             # substitution and deletion
    ("one two three", "three two one"),                               # reordering
    ("speech recognition is hard", "speech wreck a nice beach is hard"),
    ("it is twenty past ten", "it is 20 past 10"),                    # numbers are not rewritten
    ("same words here", "same words here"),
    ("abc", "abd abd abd"),                                           # more errors than words: above 1
]


@pytest.mark.parametrize("reference, hypothesis", PAIRS)
def test_each_pair_has_jiwers_rates_and_edits(reference, hypothesis):
    assert word_error_rate(reference, hypothesis) == pytest.approx(jiwer.wer(reference, hypothesis), abs=1e-12)
    assert char_error_rate(reference, hypothesis) == pytest.approx(jiwer.cer(reference, hypothesis), abs=1e-12)
    theirs = jiwer.process_words(reference, hypothesis)
    ours = word_errors(reference, hypothesis)
    assert ours.errors == theirs.substitutions + theirs.deletions + theirs.insertions
    assert ours.reference_length == theirs.hits + theirs.substitutions + theirs.deletions


def test_corpus_rates_pool_the_edits_as_jiwer_does():
    references, hypotheses = [r for r, _ in PAIRS], [h for _, h in PAIRS]
    assert word_error_rate(references, hypotheses) == pytest.approx(jiwer.wer(references, hypotheses), abs=1e-12)
    assert char_error_rate(references, hypotheses) == pytest.approx(jiwer.cer(references, hypotheses), abs=1e-12)
    # pooled, not averaged: the long sentence weighs more than the short one
    assert word_error_rate(["a b c d e f g h i j", "k"], ["a b c d e f g h i j", "x"]) == pytest.approx(1 / 11)


def test_normalised_texts_score_as_jiwer_scores_the_normalised_texts():
    references = ["Hello, World!", "It's 3.5 km to the café.", "Don't STOP   me now"]
    hypotheses = ["hello world", "its 3.5 km to the cafe", "dont stop me, now!"]
    plain = [normalize_text(t) for t in references], [normalize_text(t) for t in hypotheses]
    assert word_error_rate(references, hypotheses) == pytest.approx(jiwer.wer(*plain), abs=1e-12)
    assert word_error_rate(references, hypotheses) == pytest.approx(1 / 12)  # café / cafe: accents are kept
    assert char_error_rate(references, hypotheses) == pytest.approx(jiwer.cer(*plain), abs=1e-12)
    assert word_error_rate(references, hypotheses, normalize=False) == pytest.approx(
        jiwer.wer(references, hypotheses), abs=1e-12)


def test_the_edit_breakdown_of_unambiguous_alignments():
    assert edit_counts("the cat sat".split(), "the bat sat".split()) == ErrorCounts(1, 0, 0, 3)
    assert edit_counts("the cat sat".split(), "the sat".split()) == ErrorCounts(0, 1, 0, 3)
    assert edit_counts("the cat sat".split(), "the fat cat sat".split()) == ErrorCounts(0, 0, 1, 3)
    assert edit_counts([], "a b".split()) == ErrorCounts(0, 0, 2, 0)
    assert edit_counts("kitten", "sitting") == ErrorCounts(2, 0, 1, 6)  # the textbook distance of 3
    assert char_errors("ab cd", "ab ce") == ErrorCounts(1, 0, 0, 5)     # the space is a character


@pytest.mark.parametrize("text, expected", [
    ("Hello, World!", "hello world"),
    ("  many\tspaces \n here ", "many spaces here"),
    ("don't won’t rock'n'roll", "dont wont rocknroll"),               # apostrophes, straight and curly, go
    ("well-known (sort of) [noise]", "well known sort of noise"),
    ("3.5 km, 1,000 people at 10:30.", "3.5 km 1,000 people at 10:30"),  # numbers stay as written
    ("twenty 20 XX", "twenty 20 xx"),
    ("end. Next, one: two", "end next one two"),                      # . , : elsewhere are punctuation
    ("$5 + 5% = ~", "5 5"),                                           # symbols go
    ("ＦＵＬＬ width ﬁne", "full width fine"),                         # NFKC
    ("Ünïcödé ÇA", "ünïcödé ça"),                                     # letters with accents are kept
    ("...", ""),
])
def test_the_normaliser(text, expected):
    assert normalize_text(text) == expected


def test_bad_input_is_refused_by_name():
    with pytest.raises(ValueError, match="2 references but 1 hypotheses"):
        word_error_rate(["a", "b"], ["a"])
    with pytest.raises(ValueError, match="references are empty"):
        word_error_rate(["...", ""], ["a", "b"])
    with pytest.raises(TypeError, match="hypothesis 0 is a NoneType"):
        char_error_rate(["a"], [None])
    assert word_errors(["", "a"], ["", "a"]).rate == 0.0  # an empty pair among others is fine
