"""Chat templates and loss masks, token by token: what is trained is exactly the assistant answers and
their end-of-turn tokens; one BOS; an end token after every assistant turn."""
import functools
import logging

import pytest

from tiny_tokenizer import EOS, make_tokenizer
from velotune.data import BUILTIN_TEMPLATES, IGNORE_INDEX, DataStats, Sample, encode, resolve_chat_template
from velotune.errors import ConfigError, DataError

CONVERSATION = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": "What is the capital of France?"},
                {"role": "assistant", "content": "Paris."},
                {"role": "user", "content": "And of Germany?"},
                {"role": "assistant", "content": "Berlin, since 1990."}]

# template -> (the trained text of each assistant turn). Mistral puts a space before the answer;
# Phi-3 closes the conversation with EOS after the last <|end|>.
EXPECTED = {
    "llama-3": ["Paris.<|eot_id|>", "Berlin, since 1990.<|eot_id|>"],
    "chatml": ["Paris.<|im_end|>", "Berlin, since 1990.<|im_end|>"],
    "qwen-2.5": ["Paris.<|im_end|>", "Berlin, since 1990.<|im_end|>"],
    "gemma": ["Paris.<end_of_turn>", "Berlin, since 1990.<end_of_turn>"],
    "phi-3": ["Paris.<|end|>", f"Berlin, since 1990.<|end|>\n{EOS}"],
    "mistral": [f" Paris.{EOS}", f" Berlin, since 1990.{EOS}"],
    "alpaca": [f"Paris.{EOS}", f"Berlin, since 1990.{EOS}"],
}


@functools.lru_cache(maxsize=None)
def tokenizer(**kwargs):
    return make_tokenizer(**kwargs)


def chat(messages=CONVERSATION):
    return Sample(messages=[dict(m) for m in messages], origin="test[0]")


def trained_runs(tok, example):
    """Decoded runs of consecutive trained tokens."""
    runs, current = [], []
    for token, label in zip(example.input_ids.tolist(), example.labels.tolist()):
        if label != IGNORE_INDEX:
            assert label == token
            current.append(token)
        elif current:
            runs.append(tok.decode(current))
            current = []
    if current:
        runs.append(tok.decode(current))
    return runs


def test_builtin_templates_are_the_listed_ones():
    assert set(BUILTIN_TEMPLATES) == set(EXPECTED)


@pytest.mark.parametrize("name", list(EXPECTED))
def test_trained_tokens_are_exactly_the_answers_and_end_tokens(name):
    tok = tokenizer()
    template = resolve_chat_template(name, tok)
    example = encode(chat(), tok, template, max_len=1024)
    assert trained_runs(tok, example) == EXPECTED[name]
    # Everything else is the rendered template, untouched (plus the tokenizer's BOS where it adds one).
    rendered = tok.apply_chat_template(CONVERSATION, chat_template=template, tokenize=False)
    expected_text = rendered if rendered.startswith(tok.bos_token) else tok.bos_token + rendered
    assert tok.decode(example.input_ids.tolist()) == expected_text


@pytest.mark.parametrize("name", list(EXPECTED))
def test_exactly_one_bos(name):
    tok = tokenizer()
    ids = encode(chat(), tok, resolve_chat_template(name, tok), max_len=1024).input_ids.tolist()
    assert ids[0] == tok.bos_token_id
    assert ids.count(tok.bos_token_id) == 1


def test_no_bos_for_a_tokenizer_without_one():
    tok = tokenizer(bos=None)
    assert tok.bos_token_id is None
    example = encode(chat(), tok, resolve_chat_template("chatml", tok), max_len=1024)
    assert tok.convert_ids_to_tokens(example.input_ids[0].item()) == "<|im_start|>"


# untrained: how many other turns close with the same token (Gemma folds the system prompt into a user turn).
@pytest.mark.parametrize("name, end, untrained", [("llama-3", "<|eot_id|>", 3), ("chatml", "<|im_end|>", 3),
                                                  ("gemma", "<end_of_turn>", 2), ("mistral", EOS, 0)])
def test_end_token_trained_after_every_assistant_turn(name, end, untrained):
    tok = tokenizer()
    example = encode(chat(), tok, resolve_chat_template(name, tok), max_len=1024)
    end_id = tok.convert_tokens_to_ids(end)
    ids, labels = example.input_ids.tolist(), example.labels.tolist()
    trained_ends = [i for i, (t, lab) in enumerate(zip(ids, labels)) if t == end_id and lab == end_id]
    assert len(trained_ends) == 2  # one per assistant turn
    untrained_ends = [i for i, (t, lab) in enumerate(zip(ids, labels)) if t == end_id and lab == IGNORE_INDEX]
    assert len(untrained_ends) == untrained


def test_tokenizers_own_template_is_the_default():
    own = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
           "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    tok = make_tokenizer(chat_template=own)
    assert resolve_chat_template(None, tok) == own
    example = encode(chat(), tok, resolve_chat_template(None, tok), max_len=1024)
    assert trained_runs(tok, example) == EXPECTED["chatml"]


def test_template_without_end_token_gets_eos_after_each_answer():
    bare = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}assistant: {% endif %}")
    tok = make_tokenizer(chat_template=bare)
    example = encode(chat(), tok, resolve_chat_template(None, tok), max_len=1024)
    assert trained_runs(tok, example) == [f"Paris.\n{EOS}", f"Berlin, since 1990.\n{EOS}"]


def test_train_on_all_trains_every_token_but_the_first():
    tok = tokenizer()
    example = encode(chat(), tok, resolve_chat_template("llama-3", tok), max_len=1024, train_on="all")
    assert example.labels[0].item() == IGNORE_INDEX
    assert example.labels[1:].tolist() == example.input_ids[1:].tolist()


def test_plain_text_is_bos_text_eos_all_trained():
    tok = tokenizer()
    example = encode(Sample(text="The quick brown fox."), tok, None, max_len=64)
    ids = example.input_ids.tolist()
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id and ids.count(tok.bos_token_id) == 1
    assert tok.decode(ids[1:-1]) == "The quick brown fox."
    assert example.labels[1:].tolist() == ids[1:]


def test_prompt_completion_trains_only_the_completion():
    tok = tokenizer()
    example = encode(Sample(prompt="Question: 1 + 1 = ?\nAnswer:", text=" 2"), tok, None, max_len=64)
    assert trained_runs(tok, example) == [f" 2{EOS}"]


def test_leading_assistant_message_is_context_only():
    tok = tokenizer()
    messages = [{"role": "assistant", "content": "Hi, how can I help?"}] + CONVERSATION[1:3]
    example = encode(chat(messages), tok, resolve_chat_template("chatml", tok), max_len=1024)
    assert trained_runs(tok, example) == ["Paris.<|im_end|>"]


def test_truncate_keeps_the_start_and_counts():
    tok = tokenizer()
    stats = DataStats()
    full = encode(chat(), tok, resolve_chat_template("llama-3", tok), max_len=1024)
    cut = encode(chat(), tok, resolve_chat_template("llama-3", tok), max_len=len(full) - 3, stats=stats)
    assert cut.input_ids.tolist() == full.input_ids[:len(full) - 3].tolist()
    assert cut.labels.tolist() == full.labels[:len(full) - 3].tolist()
    assert (stats.truncated, stats.dropped_too_long, stats.samples) == (1, 0, 1)


def test_drop_returns_none_and_counts():
    tok = tokenizer()
    stats = DataStats()
    assert encode(chat(), tok, resolve_chat_template("llama-3", tok), max_len=8, overflow="drop", stats=stats) is None
    assert (stats.truncated, stats.dropped_too_long, stats.samples) == (0, 1, 0)


def test_truncation_that_leaves_no_trained_token_drops_as_fully_masked():
    tok = tokenizer()
    stats = DataStats()
    assert encode(chat(), tok, resolve_chat_template("llama-3", tok), max_len=10, stats=stats) is None
    assert (stats.truncated, stats.dropped_fully_masked, stats.samples) == (0, 1, 0)  # truncated counts kept ones


def test_conversation_without_assistant_turn_is_fully_masked():
    tok = tokenizer()
    stats = DataStats()
    assert encode(chat(CONVERSATION[:2]), tok, resolve_chat_template("chatml", tok), max_len=512, stats=stats) is None
    assert stats.dropped_fully_masked == 1


def test_unknown_template_name_lists_the_names():
    with pytest.raises(ConfigError, match=r"unknown chat template 'vicuna'; built-in templates: llama-3, chatml, "
                                          r"mistral, gemma, phi-3, qwen-2\.5, alpaca"):
        resolve_chat_template("vicuna", tokenizer())


def test_tokenizer_without_template_and_none_given():
    tok = tokenizer()
    assert not tok.chat_template
    with pytest.raises(ConfigError, match=r"the tokenizer has no chat template.*set data\.chat_template to one "
                                          r"of llama-3, chatml"):
        resolve_chat_template(None, tok)


def test_template_aliases_and_literal_jinja():
    tok = tokenizer()
    assert resolve_chat_template("Llama3", tok) == BUILTIN_TEMPLATES["llama-3"]
    assert resolve_chat_template("{{ messages[0]['content'] }}", tok) == "{{ messages[0]['content'] }}"


def test_warns_when_turn_marker_is_not_a_single_token(caplog):
    base = make_tokenizer(chat_tokens=False)
    with caplog.at_level(logging.WARNING, logger="velotune"):
        resolve_chat_template("chatml", base)
    assert "closes turns with <|im_end|>, which is not a single token" in caplog.text


def test_masks_agree_with_transformers_generation_tags():
    """An independent oracle: transformers' assistant mask from a copy of ChatML with {% generation %} tags
    around each answer and its <|im_end|> marks the same tokens as our prefix rendering of plain ChatML."""
    tagged = ("{%- for message in messages %}{%- if message['role'] == 'assistant' %}"
              "{{- '<|im_start|>assistant\\n' }}{% generation %}{{- message['content'] + '<|im_end|>' }}"
              "{% endgeneration %}{{- '\\n' }}"
              "{%- else %}{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
              "{%- endif %}{%- endfor %}"
              "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")
    tok = tokenizer(bos=None)
    reference = tok.apply_chat_template(CONVERSATION, chat_template=tagged, tokenize=True, return_dict=True,
                                        return_assistant_tokens_mask=True, add_special_tokens=False)
    ours = encode(chat(), tok, resolve_chat_template("chatml", tok), max_len=1024)
    assert ours.input_ids.tolist() == list(reference["input_ids"])
    assert [int(label != IGNORE_INDEX) for label in ours.labels.tolist()] == list(reference["assistant_masks"])


def test_template_error_names_the_record():
    tok = tokenizer()
    messages = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"},
                {"role": "assistant", "content": "c"}]
    with pytest.raises(DataError, match=r"test\[0\]: the chat template failed on this conversation: "
                                        r"Conversation roles must alternate"):
        encode(chat(messages), tok, resolve_chat_template("mistral", tok), max_len=1024)


def test_tokenizer_that_does_not_add_bos():
    tok = tokenizer(add_bos=False)
    text = encode(Sample(text="hello"), tok, None, max_len=16).input_ids.tolist()
    assert tok.bos_token_id not in text and text[-1] == tok.eos_token_id
    conv = encode(chat(), tok, resolve_chat_template("llama-3", tok), max_len=1024).input_ids.tolist()
    assert conv[0] == tok.bos_token_id and conv.count(tok.bos_token_id) == 1  # the template's own BOS


S, U, A = ({"role": "system", "content": "S"}, {"role": "user", "content": "U"}, {"role": "assistant", "content": "A"})
GOLDEN = {  # the published prompt formats, written out by hand (BOS/EOS are the test tokenizer's)
    "llama-3": ([S, U, A], "<|bos|><|start_header_id|>system<|end_header_id|>\n\nS<|eot_id|>"
                           "<|start_header_id|>user<|end_header_id|>\n\nU<|eot_id|>"
                           "<|start_header_id|>assistant<|end_header_id|>\n\nA<|eot_id|>"),
    "chatml": ([S, U, A], "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU<|im_end|>\n"
                          "<|im_start|>assistant\nA<|im_end|>\n"),
    "qwen-2.5": ([U, A], "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant."
                         "<|im_end|>\n<|im_start|>user\nU<|im_end|>\n<|im_start|>assistant\nA<|im_end|>\n"),
    "gemma": ([S, U, A], "<|bos|><start_of_turn>user\nS\n\nU<end_of_turn>\n<start_of_turn>model\nA<end_of_turn>\n"),
    "mistral": ([S, U, A], f"<|bos|>[INST] S\n\nU[/INST] A{EOS}"),
    "phi-3": ([S, U, A], f"<|system|>\nS<|end|>\n<|user|>\nU<|end|>\n<|assistant|>\nA<|end|>\n{EOS}"),
    "alpaca": ([U, A], "<|bos|>Below is an instruction that describes a task. Write a response that appropriately "
                       f"completes the request.\n\n### Instruction:\nU\n\n### Response:\nA{EOS}\n\n"),
}
GENERATION_PROMPT = {"llama-3": "<|start_header_id|>assistant<|end_header_id|>\n\n",
                     "chatml": "<|im_start|>assistant\n",
                     "qwen-2.5": "<|im_start|>assistant\n", "gemma": "<start_of_turn>model\n", "mistral": "",
                     "phi-3": "<|assistant|>\n", "alpaca": "### Response:\n"}


@pytest.mark.parametrize("name", list(GOLDEN))
def test_builtin_template_renders_the_published_format(name):
    tok = tokenizer()
    messages, expected = GOLDEN[name]
    template = resolve_chat_template(name, tok)
    assert tok.apply_chat_template(messages, chat_template=template, tokenize=False) == expected
    prompt = tok.apply_chat_template(messages[:-1], chat_template=template, tokenize=False,
                                     add_generation_prompt=True)
    assert prompt.endswith(GENERATION_PROMPT[name])
    assert expected.startswith(prompt)  # the answer continues the generation prompt
