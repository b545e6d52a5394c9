"""The Studio's chat-template editor backend: the sandbox renders what transformers renders (byte for byte), errors
name their line and kind, escapes and runaway templates are stopped, the token view is training's own mask, the
template in use is the one chat and serve use, and a saved template is the one loaded next time."""
from __future__ import annotations

import json
import logging
import sys

import pytest
from jinja2.exceptions import TemplateError
from tiny_tokenizer import make_tokenizer

from velotune.data.encode import IGNORE_INDEX, encode
from velotune.data.formats import Sample
from velotune.data.templates import (
    ALPACA,
    BUILTIN_TEMPLATES,
    CHATML,
    LLAMA_3,
    saved_chat_template,
    set_inference_template,
    template_names,
)
from velotune.errors import CheckpointError, ConfigError, DataError
from velotune.studio import template_lab, template_sandbox
from velotune.studio.template_lab import (
    SAMPLE_CONVERSATION,
    render_preview,
    save_template,
    template_error,
    template_in_use,
)


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


def reference(tok, template, messages, add_generation_prompt):
    return tok.apply_chat_template(messages, chat_template=template, tokenize=False,
                                   add_generation_prompt=add_generation_prompt)


NO_SYSTEM = SAMPLE_CONVERSATION[1:]
ONE_QUESTION = [{"role": "user", "content": "  Hello there!  \n"}]

# ---- the text: byte for byte what apply_chat_template renders --------------------------------------------------


def test_sample_conversation_is_system_user_assistant_user_assistant():
    assert [m["role"] for m in SAMPLE_CONVERSATION] == ["system", "user", "assistant", "user", "assistant"]
    assert all(isinstance(m["content"], str) and m["content"] for m in SAMPLE_CONVERSATION)


@pytest.mark.parametrize("add_generation_prompt", [False, True])
@pytest.mark.parametrize("messages", [SAMPLE_CONVERSATION, NO_SYSTEM, ONE_QUESTION], ids=["system", "plain", "one"])
@pytest.mark.parametrize("name", template_names())
def test_every_builtin_template_renders_byte_for_byte(tok, name, messages, add_generation_prompt):
    template = BUILTIN_TEMPLATES[name]
    preview = render_preview(tok, template, messages, add_generation_prompt=add_generation_prompt)
    assert preview.error is None
    assert preview.text == reference(tok, template, messages, add_generation_prompt)


@pytest.mark.parametrize("name", template_names())
def test_builtin_templates_render_alike_for_a_tokenizer_without_bos(name):
    plain = make_tokenizer(bos=None)
    for add_generation_prompt in (False, True):
        preview = render_preview(plain, BUILTIN_TEMPLATES[name], SAMPLE_CONVERSATION,
                                 add_generation_prompt=add_generation_prompt)
        assert preview.text == reference(plain, BUILTIN_TEMPLATES[name], SAMPLE_CONVERSATION, add_generation_prompt)


# Hand-written templates of the kinds found on the Hub: whitespace control, trim_blocks / lstrip_blocks on
# indented blocks, namespace(), loop.last, tojson (with options), dict(), the generation tag, loop controls,
# raise_exception on a role it does not know, trim / capitalize filters.
PLAIN_ROLES = """\
{%- set ns = namespace(system='') -%}
{%- for m in messages if m.role == 'system' -%}
  {%- set ns.system = m.content | trim -%}
{%- endfor -%}
{{ bos_token }}{% if ns.system %}System: {{ ns.system }}

{% endif %}
{%- for m in messages if m.role != 'system' -%}
  {%- if m.role not in ['user', 'assistant'] -%}
    {{ raise_exception('Unsupported role: ' ~ m.role) }}
  {%- endif -%}
{{ m.role | capitalize }}: {{ m.content | trim }}{% if not loop.last %}

{% endif %}
{%- endfor -%}
{%- if add_generation_prompt %}

Assistant:{% endif %}"""

JSON_TURNS = """\
{{- bos_token }}
{%- set meta = dict(turns=messages | length, first=messages[0].role) %}
<|system|>
{{ meta | tojson(sort_keys=True) }}
    {% for message in messages %}
        {% if loop.index0 > 40 %}{% break %}{% endif %}
        {% if message.role == 'assistant' %}
<|assistant|>
{% generation %}{{ message.content }}{{ eos_token }}{% endgeneration %}

        {% else %}
<|{{ message.role }}|>
{{ message | tojson(indent=2) }}
        {% endif %}
    {% endfor %}
{% if add_generation_prompt %}
<|assistant|>
{% endif %}"""

ITEMS_AND_JOIN = """\
{%- macro turn(role, text) -%}
[{{ role | upper }}] {{ text | replace('\\n', ' ') | truncate(60, true, '...', 0) }}
{%- endmacro -%}
{%- for m in messages -%}
{%- if loop.first and m.role != 'system' %}{{ 'no system prompt' | center(24) }}{{ '\\n' }}{% endif -%}
{{ turn(m.role, m.content) }}{{ '\\n' if not loop.last else '' }}
{%- endfor -%}
{% if add_generation_prompt %}
{{ ['[', 'ASSISTANT', ']'] | join }} {{ '%s-%03d' | format('turn', messages | length) }}
{%- endif %}"""

# Reasoning and tool turns: string tests and methods, selectattr, reverse loops, loop.previtem, items().
THINK_AND_TOOLS = """\
{%- set ns = namespace(last_user=-1) %}
{%- for m in messages %}{% if m.role == 'user' %}{% set ns.last_user = loop.index0 %}{% endif %}{% endfor %}
{%- set users = messages | selectattr('role', 'equalto', 'user') | list %}
{{- '<|im_start|>system\\n' ~ (messages[0].content if messages[0].role == 'system' else 'No system.') }}
{{- ' (' ~ users | length ~ ' questions)<|im_end|>\\n' }}
{%- for m in (messages[1:] if messages[0].role == 'system' else messages) %}
    {%- set content = m.content if m.content is string else '' %}
    {%- if m.role == 'assistant' %}
        {%- set answer = content.split('</think>')[-1].lstrip('\\n') %}
        {%- if loop.index0 > ns.last_user and m.reasoning_content is defined %}
            {{- '<|im_start|>assistant\\n<think>\\n' + m.reasoning_content.strip() + '\\n</think>\\n\\n' + answer }}
        {%- else %}
            {{- '<|im_start|>assistant\\n' + answer }}
        {%- endif %}
        {%- for call in m.tool_calls | default([]) %}
            {{- '\\n<tool_call>\\n' }}{{ {'name': call.name, 'arguments': call.arguments} | tojson }}
            {%- for key, value in call.arguments | dictsort %} [{{ key }}={{ value }}]{% endfor %}
        {%- endfor %}
        {{- '<|im_end|>\\n' }}
    {%- elif m.role == 'tool' %}
        {%- if loop.previtem is not defined or loop.previtem.role != 'tool' %}{{- '<|im_start|>user' }}{% endif %}
        {{- '\\n<tool_response>\\n' + content.rstrip() + '\\n</tool_response>' }}
        {%- if loop.last or loop.nextitem.role != 'tool' %}{{- '<|im_end|>\\n' }}{% endif %}
    {%- else %}
        {{- '<|im_start|>' + m.role + '\\n' + content | trim + '<|im_end|>\\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{% endif %}"""

HAND_WRITTEN = {"plain_roles": PLAIN_ROLES, "json_turns": JSON_TURNS, "items_and_join": ITEMS_AND_JOIN,
                "think_and_tools": THINK_AND_TOOLS}

WITH_TOOLS = [{"role": "system", "content": "You can look up the weather."},
              {"role": "user", "content": "Weather in Paris?"},
              {"role": "assistant", "content": "", "reasoning_content": "  I should call the tool.  ",
               "tool_calls": [{"name": "weather", "arguments": {"city": "Paris", "days": 2}}]},
              {"role": "tool", "content": "sunny, 21 C\n"},
              {"role": "tool", "content": "tomorrow: rain"},
              {"role": "assistant", "content": "<think>done</think>\n\nSunny today, rain tomorrow."}]


@pytest.mark.parametrize("add_generation_prompt", [False, True])
@pytest.mark.parametrize("messages", [SAMPLE_CONVERSATION, NO_SYSTEM, ONE_QUESTION, WITH_TOOLS],
                         ids=["system", "plain", "one", "tools"])
@pytest.mark.parametrize("name", list(HAND_WRITTEN))
def test_hand_written_templates_render_byte_for_byte(tok, name, messages, add_generation_prompt):
    template = HAND_WRITTEN[name]
    preview = render_preview(tok, template, messages, add_generation_prompt=add_generation_prompt)
    try:
        expected = reference(tok, template, messages, add_generation_prompt)
    except TemplateError as exc:  # a role the template refuses: refused here too, with the same message
        assert preview.error["kind"] == "runtime" and preview.error["message"] == str(exc)
        return
    assert preview.error is None
    assert preview.text == expected


def test_extra_message_fields_reach_the_template_as_transformers_passes_them(tok):
    messages = [{"role": "user", "content": "2+2?", "name": None},
                {"role": "assistant", "content": "4", "reasoning_content": "two and two"}]
    template = "{% for m in messages %}{{ m | tojson }}\n{% endfor %}{{ strftime_now('%Y') }}"
    assert render_preview(tok, template, messages).text == reference(tok, template, messages, False)


def test_raise_exception_on_a_bad_role_is_a_runtime_error_with_its_message_and_line(tok):
    messages = [{"role": "tool", "content": "42"}]
    with pytest.raises(TemplateError, match="Unsupported role: tool"):
        reference(tok, PLAIN_ROLES, messages, False)  # transformers refuses it too
    preview = render_preview(tok, PLAIN_ROLES, messages)
    assert preview.error == {"message": "Unsupported role: tool", "line": 10, "kind": "runtime"}
    assert preview.text is None and preview.tokens == []


# ---- errors: syntax and runtime, with the template line ---------------------------------------------------------

@pytest.mark.parametrize("template, line, words", [
    ("{% for m in messages %}\n{{ m.content }}\n{% endif %}", 3, "endif"),
    ("line one\nline two\n{{ messages[0] | no_such_filter }}", 3, "no_such_filter"),
    ("{% if add_generation_prompt %}\nAssistant:", 2, "end of template"),
    ("ok\n{{ 'unclosed }}", 2, "unexpected"),
])
def test_syntax_errors_name_their_line(tok, template, line, words):
    error = render_preview(tok, template, SAMPLE_CONVERSATION).error
    assert error["kind"] == "syntax" and error["line"] == line and words in error["message"]
    assert template_error(template) == error


def test_a_good_template_has_no_syntax_error():
    assert template_error(CHATML) is None


@pytest.mark.parametrize("template, line, words", [
    ("{% for m in messages %}\n{{ m.role }}\n{{ m.content.missing.deeper }}\n{% endfor %}", 3, "has no attribute"),
    (("{% macro check(m) %}\n{{ raise_exception('no ' ~ m.role) if m.role == 'assistant' }}\n{% endmacro %}"
      "\n\n{% for m in messages %}{{ check(m) }}{% endfor %}"), 2, "no assistant"),
    ("a\nb\n{{ 'text' + 1 }}", 3, "TypeError"),
])
def test_runtime_errors_name_the_template_line(tok, template, line, words):
    error = render_preview(tok, template, SAMPLE_CONVERSATION).error
    assert error["kind"] == "runtime" and error["line"] == line and words in error["message"]


def test_a_template_that_fails_on_the_prefixes_training_renders_says_so(tok):
    template = "{% if messages | length < 5 %}{{ raise_exception('needs five messages') }}{% endif %}x"
    preview = render_preview(tok, template, SAMPLE_CONVERSATION)
    assert preview.text == "x"  # the whole conversation renders...
    assert preview.error["kind"] == "runtime" and preview.error["line"] == 1
    assert preview.error["message"].startswith("training renders the first 2 messages with the generation prompt "
                                               "to find the assistant turn messages[2]")
    with pytest.raises(DataError, match="needs five messages"):  # ...and training would indeed fail on it
        encode(Sample(messages=SAMPLE_CONVERSATION), tok, template, max_len=512)


# ---- the sandbox: no escape, never executed ---------------------------------------------------------------------

@pytest.mark.parametrize("template", [
    "{{ ''.__class__.__mro__ }}",
    "{{ cycler.__init__.__globals__ }}",
    "{{ messages.append(1) }}",
    "{% set x = ''.__class__ %}quiet",               # refused even when the value is never printed
    "{{ ''['__class__'] }}",
    "{{ messages[0].update({'role': 'x'}) }}",
    "{{ namespace(_secret=1) }}",
    "{{ (lipsum | attr('__globals__')) }}",
    "{{ 'abc'.translate({97: 'zzz'}) }}",
])
def test_attribute_escapes_are_security_errors(tok, template):
    messages = [dict(m) for m in SAMPLE_CONVERSATION]
    preview = render_preview(tok, template, messages)
    assert preview.error["kind"] == "security" and preview.error["line"] == 1, preview.error
    assert preview.text is None and preview.tokens == []
    assert messages == SAMPLE_CONVERSATION  # nothing was changed


# ---- bounds: nothing hangs or grows without end -----------------------------------------------------------------

@pytest.mark.parametrize("template, words", [
    ("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}", "range()"),
    ("{{ 'x' * 10 ** 9 }}", "repeated value"),
    ("{% set ns = namespace(s='ab') %}{% for i in range(40) %}{% set ns.s = ns.s + ns.s %}{% endfor %}", "joined"),
    ("{% set ns = namespace(s='ab') %}{% for i in range(40) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}", "~"),
    ("{{ '%999999999d' % 1 }}", "%-formatted"),
    ("{{ '{:>999999999}'.format(1) }}", "formatted"),
    ("{{ 'abc'.replace('', 'x' * 200000) }}", "replaced"),
    ("{{ 'a'.center(10 ** 9) }}", "width"),
    ("{{ ('x' * 200000) | indent(8, true, true) }}{{ ('a\\n' * 100000) | indent(8) }}", "indented"),
    ("{% set l = ['y' * 100000] * 2 %}{{ (l + l) | join }}", "joined"),
    ("{{ 7 ** 100000 }}", "bits"),
    ("{% for i in range(60000) %}0123456789{% endfor %}", "rendered text is longer"),
    ("{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}", "calls itself"),
    ("{{ lipsum(100000) }}", "lipsum"),
])
def test_runaway_templates_stop_at_a_limit(tok, template, words):
    previous = sys.gettrace()
    error = render_preview(tok, template, SAMPLE_CONVERSATION).error
    assert error["kind"] == "limit" and words in error["message"], error
    assert sys.gettrace() is previous


def test_a_long_running_loop_stops_at_the_deadline_on_its_line(tok, monkeypatch):
    monkeypatch.setattr(template_lab, "RENDER_SECONDS", 0.3)
    template = ("{% set big = messages * 40 %}\n{% for a in big %}{% for b in big %}\n"
                "{% for c in big %}{% for d in big %}{% endfor %}{% endfor %}{% endfor %}{% endfor %}")
    error = render_preview(tok, template, SAMPLE_CONVERSATION).error
    assert error["kind"] == "limit" and "ran for more than" in error["message"] and error["line"] == 3


def test_request_sizes_are_bounded(tok):
    long_template = "{{ 'x' }}" + " " * template_lab.MAX_TEMPLATE_CHARS
    assert render_preview(tok, long_template, SAMPLE_CONVERSATION).error["kind"] == "limit"
    assert template_error(long_template)["kind"] == "limit"
    with pytest.raises(DataError, match=r"messages: 65 messages; the preview takes up to 64"):
        render_preview(tok, CHATML, [{"role": "user", "content": "hi"}] * 65)
    with pytest.raises(DataError, match=r"messages\[0\]\.content: 16,385 characters"):
        render_preview(tok, CHATML, [{"role": "user", "content": "x" * (16 * 1024 + 1)}])
    with pytest.raises(DataError, match=r"messages\[1\]\.role: expected one of system, user, assistant, tool"):
        render_preview(tok, CHATML, [{"role": "user", "content": "a"}, {"role": "robot", "content": "b"}])
    with pytest.raises(DataError, match=r"messages\[0\]\.content: expected text, got int"):
        render_preview(tok, CHATML, [{"role": "user", "content": 3}])
    with pytest.raises(DataError, match="non-empty list"):
        render_preview(tok, CHATML, [])
    with pytest.raises(DataError, match="max_tokens"):
        render_preview(tok, CHATML, SAMPLE_CONVERSATION, max_tokens=10 ** 9)


# ---- the token view: training's own mask ------------------------------------------------------------------------

@pytest.mark.parametrize("train_on", ["assistant", "all"])
@pytest.mark.parametrize("name", template_names())
def test_the_marked_tokens_are_the_ones_training_learns(tok, name, train_on):
    template = BUILTIN_TEMPLATES[name]
    preview = render_preview(tok, template, SAMPLE_CONVERSATION, train_on=train_on)
    encoded = encode(Sample(messages=SAMPLE_CONVERSATION), tok, template, train_on=train_on, max_len=4096)
    assert [t["id"] for t in preview.tokens] == encoded.input_ids.tolist()
    assert [t["trained"] for t in preview.tokens] == (encoded.labels != IGNORE_INDEX).tolist()
    assert preview.trained_tokens == encoded.num_targets and preview.mode == "training" and not preview.truncated


def test_only_the_assistant_turns_are_trained(tok):
    preview = render_preview(tok, CHATML, SAMPLE_CONVERSATION)
    runs, current = [], ""
    for piece in preview.tokens + [{"text": "", "trained": False}]:
        if piece["trained"]:
            current += piece["text"]
        elif current:
            runs, current = runs + [current], ""
    assert runs == ["The capital of France is Paris.<|im_end|>",
                    "About 2.1 million people live in Paris itself.<|im_end|>"]
    assert preview.tokens[0]["special"] and preview.tokens[0]["text"] == "<|bos|>"  # the BOS training adds


def test_a_conversation_training_drops_still_shows_its_tokens(tok):
    preview = render_preview(tok, CHATML, ONE_QUESTION)
    assert preview.trained_tokens == 0 and "drops it" in preview.note
    assert "".join(t["text"] for t in preview.tokens) == "<|bos|>" + reference(tok, CHATML, ONE_QUESTION, False)


def test_the_generation_prompt_shows_the_prompt_chat_sends(tok):
    preview = render_preview(tok, LLAMA_3, NO_SYSTEM[:1], add_generation_prompt=True)
    text = reference(tok, LLAMA_3, NO_SYSTEM[:1], True)
    assert preview.mode == "inference" and preview.trained_tokens == 0
    assert [t["id"] for t in preview.tokens] == tok(text, add_special_tokens=False).input_ids


def test_max_tokens_cuts_the_view_as_training_cuts_the_example(tok):
    preview = render_preview(tok, CHATML, SAMPLE_CONVERSATION, max_tokens=80)
    encoded = encode(Sample(messages=SAMPLE_CONVERSATION), tok, CHATML, max_len=80)
    assert [t["id"] for t in preview.tokens] == encoded.input_ids.tolist() and len(preview.tokens) == 80
    assert preview.truncated and 0 < preview.trained_tokens == encoded.num_targets
    assert preview.as_dict()["truncated"] is True and json.dumps(preview.as_dict())
    cut_early = render_preview(tok, CHATML, SAMPLE_CONVERSATION, max_tokens=20)
    assert len(cut_early.tokens) == 20 and cut_early.truncated and cut_early.trained_tokens == 0
    assert "its assistant turns come after the first 20 tokens" in cut_early.note


def test_without_a_tokenizer_the_text_still_renders():
    preview = render_preview(None, CHATML, NO_SYSTEM)
    assert preview.text.startswith("<|im_start|>user\n") and preview.tokens == [] and "no tokenizer" in preview.note


# ---- which template is in use, and why --------------------------------------------------------------------------

def _model_dir(path, model_type="llama", template=None):
    path.mkdir()
    make_tokenizer(chat_template=template).save_pretrained(str(path))
    (path / "config.json").write_text(json.dumps({"model_type": model_type}))
    return path


def test_the_adapters_template_comes_first(tmp_path):
    from velotune.models.tokenizer import load_tokenizer
    model = _model_dir(tmp_path / "model", template=CHATML)
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    save_template(adapter, ALPACA)
    info = template_in_use(model, adapter)
    assert (info.text, info.source, info.name) == (ALPACA, "adapter", "alpaca")
    assert info.reason == f"the adapter in {adapter} saved the template it was trained with (chat_template.jinja)"
    assert set_inference_template(load_tokenizer(model), adapter=adapter) == info.text  # what chat/serve use


def test_the_models_own_template_comes_next(tmp_path):
    from velotune.models.tokenizer import load_tokenizer
    model = _model_dir(tmp_path / "model", template=CHATML)
    bare_adapter = tmp_path / "adapter"
    bare_adapter.mkdir()
    info = template_in_use(model, bare_adapter)
    assert (info.text, info.source, info.name) == (CHATML, "model", "chatml")
    assert info.reason == (f"the adapter in {bare_adapter} saved no chat template; the model's own template "
                           "(chat_template.jinja)")
    assert set_inference_template(load_tokenizer(model), adapter=bare_adapter) == info.text
    assert template_in_use(model).reason == "the model's own template (chat_template.jinja)"


def test_a_model_without_a_template_gets_its_familys_builtin(tmp_path, caplog):
    from velotune.models.tokenizer import load_tokenizer
    info = template_in_use(_model_dir(tmp_path / "model"))
    assert (info.text, info.source, info.name) == (LLAMA_3, "builtin", "llama-3")
    assert info.reason.startswith("the tokenizer has no chat template; using the built-in 'llama-3' for "
                                  "model_type llama")
    # A suggestion only: chat and serve have no template until it is saved (or given as --chat-template).
    with caplog.at_level(logging.INFO, logger="velotune"):
        assert set_inference_template(load_tokenizer(tmp_path / "model")) is None
    assert template_in_use(_model_dir(tmp_path / "qwen", "qwen2")).name == "qwen-2.5"


def test_an_unknown_family_has_none(tmp_path):
    info = template_in_use(_model_dir(tmp_path / "model", model_type="gpt_neox"))
    assert (info.text, info.source, info.name) == (None, "none", None)
    assert info.reason == ("the tokenizer has no chat template and model_type gpt_neox has no built-in template; "
                           "pick a built-in template or write one")
    assert info.as_dict()["source"] == "none"


def test_missing_directories_are_named(tmp_path):
    with pytest.raises(CheckpointError, match=r"nowhere: no such model directory"):
        template_in_use(tmp_path / "nowhere")
    model = _model_dir(tmp_path / "model")
    with pytest.raises(CheckpointError, match=r"gone: no such adapter directory"):
        template_in_use(model, tmp_path / "gone")


# ---- saving -----------------------------------------------------------------------------------------------------

def test_a_saved_template_is_the_one_loaded_next(tmp_path):
    from velotune.models.tokenizer import load_tokenizer
    model = _model_dir(tmp_path / "model", template=ALPACA)
    config = json.loads((model / "tokenizer_config.json").read_text())
    config["chat_template"] = ALPACA  # an older checkpoint keeps its template here as well
    (model / "tokenizer_config.json").write_text(json.dumps(config))
    custom = "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}"
    path = save_template(model, custom)
    assert path == model / "chat_template.jinja" and path.read_text(encoding="utf-8") == custom
    assert saved_chat_template(model) == custom
    assert load_tokenizer(model).chat_template == custom  # velotune's loader (what vt.load uses) picks it up
    assert template_in_use(model).text == custom and template_in_use(model).source == "model"
    assert sorted(p.name for p in model.iterdir()) == ["chat_template.jinja", "config.json", "tokenizer.json",
                                                      "tokenizer_config.json"]  # no temporary file left


def test_a_template_saved_with_an_adapter_is_what_chat_uses(tmp_path, tok):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    save_template(adapter, CHATML)
    save_template(adapter, ALPACA)  # replaces the file
    assert set_inference_template(make_tokenizer(chat_template=CHATML), adapter=adapter) == ALPACA


def test_a_broken_template_is_not_saved(tmp_path):
    target = tmp_path / "chat_template.jinja"
    target.write_text(CHATML)
    with pytest.raises(ConfigError, match=r"chat_template\.jinja: line 2: .*endfor.*; not saved"):
        save_template(tmp_path, "{% for m in messages %}\n{{ m.content }}")
    with pytest.raises(ConfigError, match=r"holds no Jinja"):
        save_template(tmp_path, "just text")
    with pytest.raises(ConfigError, match=r"no such directory"):
        save_template(tmp_path / "missing", CHATML)
    assert target.read_text() == CHATML and sorted(p.name for p in tmp_path.iterdir()) == ["chat_template.jinja"]


def test_the_sandbox_is_configured_as_transformers_environment():
    """A drift check: when transformers changes its chat-template environment, this says what to follow."""
    utils = pytest.importorskip("transformers.utils.chat_template_utils")
    compile_theirs = getattr(utils, "_compile_jinja_template", None)
    if compile_theirs is None:
        pytest.skip("transformers no longer exposes _compile_jinja_template")
    theirs, ours = compile_theirs("{{ 1 }}").environment, template_sandbox.ChatTemplateSandbox()
    for option in ("trim_blocks", "lstrip_blocks", "keep_trailing_newline", "autoescape", "undefined",
                   "block_start_string", "variable_start_string", "comment_start_string", "newline_sequence"):
        assert getattr(ours, option) == getattr(theirs, option), option
    assert isinstance(ours, type(theirs)) and set(theirs.globals) <= set(ours.globals)
    assert set(theirs.filters) == set(ours.filters) and set(theirs.tests) == set(ours.tests)
    assert {type(e).__name__ for e in theirs.extensions.values()} == {"AssistantTracker", "LoopControlExtension"}
    assert {type(e).__name__ for e in ours.extensions.values()} == {"GenerationBlock", "LoopControlExtension"}
