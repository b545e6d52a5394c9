"""Chat templates: the tokenizer's own by default, or a built-in one by name (or a Jinja file) for tokenizers
that have none. A model or adapter directory keeps the template it was trained with (`saved_chat_template`).

The built-in templates are our own Jinja strings written to produce the published prompt formats of each
model family (turn markers, BOS, end-of-turn tokens, where a system prompt goes). They need the family's
special tokens in the tokenizer; a warning says when a turn marker is not a single token.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from ..errors import CheckpointError, ConfigError, DataError

log = logging.getLogger("velotune")

# Llama 3 / 3.1 instruct: BOS once, a header per turn, content trimmed, <|eot_id|> closes every turn.
LLAMA_3 = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}"
    "{{- message['content'] | trim + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)

# ChatML (OpenAI, many fine-tunes): no BOS; <|im_end|> closes a turn, a newline separates turns.
CHATML = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

# Qwen 2.5 instruct: ChatML with a default system prompt when the conversation has none.
QWEN_2_5 = (
    "{%- if messages and messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if not (loop.first and message['role'] == 'system') %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

# Mistral instruct (v0.2/v0.3 style): [INST] user [/INST] answer</s>; roles alternate; a system prompt is
# put before the first user message (it must stay in place for the masks' prefix rendering to hold).
MISTRAL = (
    "{{- bos_token }}"
    "{%- if messages and messages[0]['role'] == 'system' %}"
    "{%- set system = messages[0]['content'] %}{%- set loop_messages = messages[1:] %}"
    "{%- else %}{%- set system = '' %}{%- set loop_messages = messages %}{%- endif %}"
    "{%- for message in loop_messages %}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{- raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{%- endif %}"
    "{%- if message['role'] == 'user' %}"
    "{%- if loop.first and system %}{{- '[INST] ' + system + '\\n\\n' + message['content'] + '[/INST]' }}"
    "{%- else %}{{- '[INST] ' + message['content'] + '[/INST]' }}{%- endif %}"
    "{%- else %}{{- ' ' + message['content'] + eos_token }}"
    "{%- endif %}"
    "{%- endfor %}"
)

# Gemma (2 and 3): BOS, <start_of_turn>user / model, <end_of_turn>; the system prompt opens the first user turn.
GEMMA = (
    "{{- bos_token }}"
    "{%- if messages and messages[0]['role'] == 'system' %}"
    "{%- set first_user_prefix = messages[0]['content'] + '\\n\\n' %}{%- set loop_messages = messages[1:] %}"
    "{%- else %}{%- set first_user_prefix = '' %}{%- set loop_messages = messages %}{%- endif %}"
    "{%- for message in loop_messages %}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{- raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{%- endif %}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{- '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else '') }}"
    "{{- message['content'] | trim + '<end_of_turn>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<start_of_turn>model\\n' }}{%- endif %}"
)

# Phi-3: <|role|> markers, <|end|> closes a turn, and EOS ends a conversation that asks for no generation.
PHI_3 = (
    "{%- for message in messages %}"
    "{{- '<|' + message['role'] + '|>\\n' + message['content'] + '<|end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|assistant|>\\n' }}{%- else %}{{- eos_token }}{%- endif %}"
)

# Alpaca (Stanford): the instruction prompt of the original data set, EOS after each response.
ALPACA = (
    "{{- bos_token }}"
    "{%- if messages and messages[0]['role'] == 'system' %}"
    "{{- messages[0]['content'] + '\\n\\n' }}{%- set loop_messages = messages[1:] %}"
    "{%- else %}"
    "{{- 'Below is an instruction that describes a task. Write a response that appropriately completes "
    "the request.\\n\\n' }}"
    "{%- set loop_messages = messages %}"
    "{%- endif %}"
    "{%- for message in loop_messages %}"
    "{%- if message['role'] == 'user' %}{{- '### Instruction:\\n' + message['content'] + '\\n\\n' }}"
    "{%- elif message['role'] == 'assistant' %}{{- '### Response:\\n' + message['content'] + eos_token + '\\n\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '### Response:\\n' }}{%- endif %}"
)

BUILTIN_TEMPLATES = {"llama-3": LLAMA_3, "chatml": CHATML, "mistral": MISTRAL, "gemma": GEMMA,
                     "phi-3": PHI_3, "qwen-2.5": QWEN_2_5, "alpaca": ALPACA}
# The token that closes an assistant turn in each built-in template (None: the tokenizer's EOS).
END_OF_TURN = {"llama-3": "<|eot_id|>", "chatml": "<|im_end|>", "qwen-2.5": "<|im_end|>", "gemma": "<end_of_turn>",
               "phi-3": "<|end|>", "mistral": None, "alpaca": None}
ALIASES = {"llama3": "llama-3", "llama-3.1": "llama-3", "llama-3.2": "llama-3", "qwen2.5": "qwen-2.5",
           "qwen-2": "qwen-2.5", "qwen2": "qwen-2.5", "phi3": "phi-3", "gemma-2": "gemma", "gemma-3": "gemma",
           "gemma2": "gemma", "gemma3": "gemma"}
# End-of-turn tokens of common families: any of these (when a single token of the tokenizer) ends a turn.
KNOWN_END_TOKENS = ("<|eot_id|>", "<|eom_id|>", "<|im_end|>", "<end_of_turn>", "<|end|>", "<|endoftext|>",
                    "<|end_of_text|>", "</s>")


def template_names() -> list[str]:
    return list(BUILTIN_TEMPLATES)


def builtin_name(template) -> str | None:
    """The name of the built-in template `template` is, word for word; else None."""
    return next((name for name, text in BUILTIN_TEMPLATES.items() if text == template), None)


def resolve_chat_template(name: str | None, tokenizer) -> str:
    """The Jinja chat template to use: `name` as load_chat_template reads it, else the tokenizer's own."""
    if name:
        return load_chat_template(name, tokenizer, source="data.chat_template")
    own = default_template(getattr(tokenizer, "chat_template", None))
    if not own:
        raise ConfigError("the tokenizer has no chat template and this data set is chat data: set "
                          f"data.chat_template to one of {', '.join(BUILTIN_TEMPLATES)} (the model family's format)")
    return own


def load_chat_template(spec: str, tokenizer=None, *, source: str = "chat template") -> str:
    """A built-in template by name or alias ('alpaca', 'chatml', 'llama3'), else `spec` itself when it is Jinja
    text, else the Jinja template in the file `spec` names. With `tokenizer`, warns when a built-in template's
    end-of-turn marker is not one of its tokens. `source` (the key or option) starts every error message."""
    key = ALIASES.get(spec.strip().lower().replace("_", "-"), spec.strip().lower().replace("_", "-"))
    if key in BUILTIN_TEMPLATES:
        if tokenizer is not None:
            _warn_missing_markers(key, tokenizer)
        return BUILTIN_TEMPLATES[key]
    if "{{" in spec or "{%" in spec:
        return spec
    path = Path(spec).expanduser()
    if _is_file(path):
        return _read_template_file(path, source)
    if path.suffix in (".jinja", ".j2", ".txt") or "/" in spec or os.sep in spec:
        raise ConfigError(f"{source}: {path}: no such chat template file")
    raise ConfigError(f"{source}: unknown chat template '{spec}'; built-in templates: "
                      f"{', '.join(BUILTIN_TEMPLATES)} (or a file holding a Jinja template, or Jinja text)")


def _is_file(path: Path) -> bool:
    try:
        return path.is_file()
    except OSError:  # a name too long to be a path
        return False


def _read_template_file(path: Path, source: str) -> str:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{source}: {path}: cannot read the chat template file ({exc})") from None
    if "{{" not in text and "{%" not in text:
        raise ConfigError(f"{source}: {path}: holds no Jinja template (no {{{{ ... }}}} or {{% ... %}})")
    return text


def saved_chat_template(directory) -> str | None:
    """The chat template saved in a model or adapter directory: chat_template.jinja, else tokenizer_config.json's
    chat_template (of several named ones, "default", else the first); None when there is none."""
    directory = Path(directory)
    jinja = directory / "chat_template.jinja"
    if jinja.is_file():
        try:
            return jinja.read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            raise CheckpointError(f"{jinja}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    config_path = directory / "tokenizer_config.json"
    if not config_path.is_file():
        return None
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{config_path}: invalid JSON at line {exc.lineno}, column {exc.colno}: "
                              f"{exc.msg}") from None
    template = config.get("chat_template") if isinstance(config, dict) else None
    if isinstance(template, list):  # transformers' form of named templates: [{"name": ..., "template": ...}]
        template = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
    template = default_template(template)
    return template if isinstance(template, str) and template else None


def set_inference_template(tokenizer, chat_template: str | None = None, adapter=None,
                           source: str = "--chat-template") -> str | None:
    """Sets `tokenizer.chat_template` for chat, generation or export, by this order: `chat_template` (a name, a
    file or Jinja text) > the template saved in the `adapter` directory (the one it was trained with) > the
    base tokenizer's own. Logs which one and why, in one line; returns the template (None: there is none)."""
    if chat_template:
        tokenizer.chat_template = load_chat_template(chat_template, tokenizer, source=source)
        why = "as asked"
    elif adapter is not None and (saved := saved_chat_template(adapter)):
        tokenizer.chat_template = saved
        why = f"saved with the adapter in {adapter} (the one it was trained with)"
    else:
        why = "the base model's own" + (f"; the adapter in {adapter} saved none" if adapter is not None else "")
    template = default_template(getattr(tokenizer, "chat_template", None))
    if not template:
        log.info("no chat template: messages cannot be formatted (%s NAME|FILE sets one)", source)
        return None
    name = builtin_name(template)
    log.info("chat template: %s, %s", name or f"a custom template ({len(template)} characters)", why)
    return template


def default_template(template):
    """Of several named templates (a dict), "default", else the first; a single template as it is."""
    if isinstance(template, dict):
        return template.get("default") or next(iter(template.values()), None)
    return template


def _warn_missing_markers(key: str, tokenizer):
    end = END_OF_TURN[key]
    if end is not None and single_token_id(tokenizer, end) is None:
        log.warning("chat template '%s' closes turns with %s, which is not a single token of this tokenizer: "
                    "generation will not stop at it; use the model family's template", key, end)


def single_token_id(tokenizer, text: str):
    """The id of `text` when the tokenizer encodes it as exactly one token, else None."""
    ids = tokenizer.encode(text, add_special_tokens=False)
    return ids[0] if len(ids) == 1 else None


def stop_token_ids(tokenizer) -> set[int]:
    """Ids that close an assistant turn: EOS and the known end-of-turn tokens this tokenizer has."""
    ids = set()
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    vocab = tokenizer.get_vocab()
    for token in KNOWN_END_TOKENS:
        if token in vocab:
            single = single_token_id(tokenizer, token)
            if single is not None:
                ids.add(single)
    return ids


def render(tokenizer, template: str, messages: list[dict], *, add_generation_prompt: bool, where: str) -> str:
    """The conversation as text, through `transformers`' own Jinja rendering (bos_token etc. provided)."""
    try:
        text = tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                             add_generation_prompt=add_generation_prompt)
    except Exception as exc:  # jinja TemplateError, raise_exception(...), a template bug
        raise DataError(f"{where}: the chat template failed on this conversation: {exc}") from None
    if not isinstance(text, str):  # some versions wrap single results in a list
        text = text[0]
    return text
