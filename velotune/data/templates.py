"""Chat templates: the tokenizer's own by default, or a built-in one by name for tokenizers that have none.

The built-in templates are our own Jinja strings written to produce the published prompt formats of each
model family (turn markers, BOS, end-of-turn tokens, where a system prompt goes). They need the family's
special tokens in the tokenizer; a warning says when a turn marker is not a single token.
"""
from __future__ import annotations

import logging

from ..errors import ConfigError, DataError

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


def resolve_chat_template(name: str | None, tokenizer) -> str:
    """The Jinja chat template to use: a built-in by name, a literal Jinja string, or the tokenizer's own."""
    if name:
        key = ALIASES.get(name.strip().lower().replace("_", "-"), name.strip().lower().replace("_", "-"))
        if key in BUILTIN_TEMPLATES:
            _warn_missing_markers(key, tokenizer)
            return BUILTIN_TEMPLATES[key]
        if "{{" in name or "{%" in name:
            return name
        raise ConfigError(f"data.chat_template: unknown chat template '{name}'; built-in templates: "
                          f"{', '.join(BUILTIN_TEMPLATES)} (or give a Jinja template string)")
    own = getattr(tokenizer, "chat_template", None)
    if isinstance(own, dict):  # older tokenizers keep several named templates
        own = own.get("default") or next(iter(own.values()), None)
    if not own:
        raise ConfigError("the tokenizer has no chat template and this data set is chat data: set "
                          f"data.chat_template to one of {', '.join(BUILTIN_TEMPLATES)} (the model family's format)")
    return own


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
