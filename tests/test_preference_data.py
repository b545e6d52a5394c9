"""Preference records -> pairs: every accepted shape, the completion alone trained (token by token), bad rows counted
and named, malformed rows refused with their place."""
import logging

import pytest

from train_fixtures import base_config, make_model_dir, write_jsonl
from velotune.config import load_config
from velotune.data.encode import IGNORE_INDEX
from velotune.data.preference import prepare_pairs
from velotune.errors import ConfigError, DataError
from velotune.models.tokenizer import load_tokenizer
from velotune.training.plan import plan_run

PROMPT = [{"role": "user", "content": "Who rules Vell?"}]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("prefdata")
    model_dir = make_model_dir(tmp)
    return model_dir, load_tokenizer(model_dir), tmp


def pairs_of(setup, records, name="p.jsonl", **data):
    model_dir, tok, tmp = setup
    cfg = load_config(base_config(model_dir, write_jsonl(tmp / name, records), tmp / "out",
                                  data={"max_seq_length": 256, **data}))
    return prepare_pairs(cfg.data, tok, max_seq_length=cfg.data.max_seq_length)


def trained_text(example, tok):
    ids = [int(i) for i, l in zip(example.input_ids, example.labels) if l != IGNORE_INDEX]
    return tok.decode(ids)


def test_plain_text_pairs_train_the_completion_and_eos(setup):
    _, tok, _ = setup
    data = pairs_of(setup, [{"prompt": "Who rules Vell?", "chosen": " Queen Ossa.", "rejected": " King Tam."}])
    pair = data.train[0]
    # Plain text is not rendered with a chat template (as TRL does): the prompt is the text itself.
    assert trained_text(pair.chosen, tok) == " Queen Ossa." + tok.eos_token
    assert trained_text(pair.rejected, tok) == " King Tam." + tok.eos_token
    assert tok.decode(pair.chosen.input_ids, skip_special_tokens=True) == "Who rules Vell? Queen Ossa."
    assert pair.chosen.origin.endswith("p.jsonl:1")


def test_conversation_pairs_train_only_the_final_completion(setup):
    """A prompt holding an earlier assistant turn: that turn is context, only chosen / rejected are trained."""
    _, tok, _ = setup
    history = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there."}] + PROMPT
    data = pairs_of(setup, [{"prompt": history, "chosen": [{"role": "assistant", "content": "Queen Ossa."}],
                             "rejected": [{"role": "assistant", "content": "King Tam."}]}])
    pair = data.train[0]
    assert trained_text(pair.chosen, tok) == "Queen Ossa.<|im_end|>"
    assert trained_text(pair.rejected, tok) == "King Tam.<|im_end|>"
    assert "Hello there." in tok.decode(pair.chosen.input_ids)  # in the input, not trained


@pytest.mark.parametrize("record", [
    {"prompt": PROMPT, "chosen": "Queen Ossa.", "rejected": "King Tam."},          # text completions, chat prompt
    {"prompt": "Who rules Vell?", "chosen": [{"role": "assistant", "content": "Queen Ossa."}],
     "rejected": [{"role": "assistant", "content": "King Tam."}]},                  # text prompt, chat completions
    {"chosen": PROMPT + [{"role": "assistant", "content": "Queen Ossa."}],
     "rejected": PROMPT + [{"role": "assistant", "content": "King Tam."}]},         # whole conversations
], ids=["chat-prompt", "text-prompt", "implicit-prompt"])
def test_every_shape_makes_the_same_pair(setup, record):
    _, tok, _ = setup
    want = pairs_of(setup, [{"prompt": PROMPT, "chosen": [{"role": "assistant", "content": "Queen Ossa."}],
                             "rejected": [{"role": "assistant", "content": "King Tam."}]}], "want.jsonl").train[0]
    got = pairs_of(setup, [record], "got.jsonl").train[0]
    for side in ("chosen", "rejected"):
        assert getattr(got, side).input_ids.tolist() == getattr(want, side).input_ids.tolist()
        assert getattr(got, side).labels.tolist() == getattr(want, side).labels.tolist()


def test_bad_rows_are_counted_and_named(setup, caplog):
    good = {"prompt": "q", "chosen": " a", "rejected": " b"}
    records = [good, {"prompt": "q", "chosen": " same", "rejected": " same"}, {"prompt": "q", "chosen": " a"},
               {"prompt": "q", "chosen": "  ", "rejected": " b"}, good]
    with caplog.at_level(logging.WARNING, logger="velotune"):
        data = pairs_of(setup, records, "bad.jsonl")
    assert data.stats.samples == 2 and data.stats.records == 5
    assert data.stats.dropped_bad == {"'chosen' equals 'rejected'": 1, "missing field 'rejected'": 1,
                                      "empty 'chosen' completion": 1}
    assert "bad.jsonl:2" in caplog.text and "bad.jsonl:3" in caplog.text and "bad.jsonl:4" in caplog.text


def test_no_good_row_is_an_error_with_the_reasons(setup):
    with pytest.raises(DataError, match=r"no pairs left .*2 bad \('chosen' equals 'rejected'\)"):
        pairs_of(setup, [{"prompt": "q", "chosen": "x", "rejected": "x"}] * 2, "allbad.jsonl")


def test_malformed_rows_and_other_formats_are_refused(setup):
    with pytest.raises(DataError, match=r"num.jsonl:1: field 'chosen' must be text"):
        pairs_of(setup, [{"prompt": "q", "chosen": 3, "rejected": "b"}], "num.jsonl")
    with pytest.raises(DataError, match=r"sft.jsonl:1: a preference objective reads 'prompt', 'chosen' and "
                                        r"'rejected' fields; this record has \['messages'\]"):
        pairs_of(setup, [{"messages": PROMPT}], "sft.jsonl")
    with pytest.raises(ConfigError, match="data.format: 'alpaca' is an SFT format"):
        pairs_of(setup, [{"prompt": "q", "chosen": "a", "rejected": "b"}], "fmt.jsonl", format="alpaca")


def test_the_dry_run_shows_both_sides_of_a_pair(setup):
    model_dir, _, tmp = setup
    data = write_jsonl(tmp / "dry.jsonl", [{"prompt": PROMPT, "chosen": "Queen Ossa.", "rejected": "King Tam."}] * 4)
    cfg = base_config(model_dir, data, tmp / "dry")
    cfg["objective"] = "dpo"
    text = plan_run(cfg).describe()
    assert "objective: dpo" in text and "4 records -> 4 pairs" in text and "up to 2 pairs" in text
    assert "chosen:\n" in text and "[[Queen Ossa.<|im_end|>]]" in text and "[[King Tam.<|im_end|>]]" in text
