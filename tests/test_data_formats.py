"""detect_format and normalise: each format, and each missing or wrong field as its own error."""
import pytest

from velotune.data import Records, Sample, detect_format, normalise
from velotune.errors import DataError

CHAT = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]


@pytest.mark.parametrize("record, fmt", [
    ({"messages": CHAT}, "messages"),
    ({"conversations": [{"from": "human", "value": "Hi"}]}, "sharegpt"),
    ({"instruction": "Do", "input": "", "output": "Done"}, "alpaca"),
    ({"prompt": "Q", "completion": "A"}, "prompt_completion"),
    ({"text": "plain"}, "text"),
])
def test_detect_format(record, fmt):
    assert detect_format([record], "x.jsonl") == fmt


def test_detect_format_unknown_fields_names_origin_and_fields():
    records = Records([{"question": "q", "answer": "a"}], ["qa.jsonl:1"])
    with pytest.raises(DataError, match=r"qa\.jsonl: cannot tell the data format from the fields \['answer', "
                                        r"'question'\].*set data\.format"):
        detect_format(records)


def test_alpaca_with_input_and_system():
    s = normalise({"instruction": "Translate", "input": "bonjour", "output": "hello", "system": "Be exact."},
                  "alpaca")
    assert s.messages == [{"role": "system", "content": "Be exact."},
                          {"role": "user", "content": "Translate\n\nbonjour"},
                          {"role": "assistant", "content": "hello"}]


def test_alpaca_without_input():
    s = normalise({"instruction": "Say hi", "output": "hi"}, "alpaca")
    assert s.messages == [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "hi"}]


def test_sharegpt_roles_and_record_system():
    rec = {"system": "sys", "conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"},
                                              {"from": "user", "value": "c"}, {"from": "assistant", "value": "d"}]}
    s = normalise(rec, "sharegpt")
    assert [m["role"] for m in s.messages] == ["system", "user", "assistant", "user", "assistant"]
    assert [m["content"] for m in s.messages] == ["sys", "a", "b", "c", "d"]


def test_messages_with_text_parts():
    rec = {"messages": [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
                        {"role": "assistant", "content": "c"}]}
    assert normalise(rec, "messages").messages[0] == {"role": "user", "content": "ab"}


def test_prompt_completion_text_and_conversational():
    s = normalise({"prompt": "Q: ", "completion": "A"}, "prompt_completion")
    assert (s.prompt, s.text, s.messages) == ("Q: ", "A", None)
    s = normalise({"prompt": CHAT[:1], "completion": CHAT[1:]}, "prompt_completion")
    assert s.messages == CHAT


def test_text():
    s = normalise({"text": "hello"}, "text")
    assert s == Sample(text="hello", origin="<record>")


def test_system_prompt_added_only_when_missing():
    s = normalise({"messages": [dict(m) for m in CHAT]}, "messages", system_prompt="Be kind.")
    assert s.messages[0] == {"role": "system", "content": "Be kind."}
    rec = {"messages": [{"role": "system", "content": "own"}] + CHAT}
    assert normalise(rec, "messages", system_prompt="Be kind.").messages[0]["content"] == "own"


def test_numbers_become_text():
    assert normalise({"instruction": "2+2", "output": 4}, "alpaca").messages[1]["content"] == "4"


# ---- each bad input its own test ------------------------------------------------------------------------

def test_alpaca_missing_output():
    with pytest.raises(DataError, match=r"d\.jsonl:7: missing field 'output' \(alpaca format\)"):
        normalise({"instruction": "x"}, "alpaca", where="d.jsonl:7")


def test_alpaca_missing_instruction():
    with pytest.raises(DataError, match=r"d\.jsonl:2: missing field 'instruction'"):
        normalise({"output": "x"}, "alpaca", where="d.jsonl:2")


def test_alpaca_field_of_wrong_type():
    with pytest.raises(DataError, match=r"d\.json\[3\]: field 'instruction' must be text, got list"):
        normalise({"instruction": ["x"], "output": "y"}, "alpaca", where="d.json[3]")


def test_sharegpt_missing_conversations():
    with pytest.raises(DataError, match=r"s\.jsonl:4: missing field 'conversations' \(sharegpt format\)"):
        normalise({"text": "x"}, "sharegpt", where="s.jsonl:4")


def test_sharegpt_turn_missing_value():
    rec = {"conversations": [{"from": "human", "value": "a"}, {"from": "gpt"}]}
    with pytest.raises(DataError, match=r"s\.jsonl:1: conversations\[1\] has no 'value' field"):
        normalise(rec, "sharegpt", where="s.jsonl:1")


def test_sharegpt_turn_missing_from():
    with pytest.raises(DataError, match=r"s\.jsonl:1: conversations\[0\] has no 'from' field"):
        normalise({"conversations": [{"value": "a"}]}, "sharegpt", where="s.jsonl:1")


def test_sharegpt_unknown_speaker():
    with pytest.raises(DataError, match=r"conversations\[0\]: unknown speaker 'narrator'"):
        normalise({"conversations": [{"from": "narrator", "value": "a"}]}, "sharegpt")


def test_messages_missing_role():
    with pytest.raises(DataError, match=r"m\.jsonl:9: messages\[1\] has no 'role' field"):
        normalise({"messages": [CHAT[0], {"content": "x"}]}, "messages", where="m.jsonl:9")


def test_messages_missing_content():
    with pytest.raises(DataError, match=r"m\.jsonl:9: messages\[0\] has no 'content' field"):
        normalise({"messages": [{"role": "user"}]}, "messages", where="m.jsonl:9")


def test_messages_unknown_role():
    with pytest.raises(DataError, match=r"messages\[0\]: unknown role 'bot'"):
        normalise({"messages": [{"role": "bot", "content": "x"}]}, "messages")


def test_messages_not_a_list():
    with pytest.raises(DataError, match=r"field 'messages' must be a list of turns, got str"):
        normalise({"messages": "hello"}, "messages")


def test_messages_empty_conversation():
    with pytest.raises(DataError, match=r"m\.jsonl:1: the conversation is empty"):
        normalise({"messages": []}, "messages", where="m.jsonl:1")


def test_prompt_completion_missing_completion():
    with pytest.raises(DataError, match=r"p\.csv:3: missing field 'completion' \(prompt_completion format\)"):
        normalise({"prompt": "Q"}, "prompt_completion", where="p.csv:3")


def test_text_missing_text():
    with pytest.raises(DataError, match=r"t\.jsonl:5: missing field 'text' \(text format\)"):
        normalise({"body": "x"}, "text", where="t.jsonl:5")


def test_unknown_format_name():
    with pytest.raises(DataError, match=r"unknown data format 'dolly'; expected one of alpaca, sharegpt"):
        normalise({"text": "x"}, "dolly")
