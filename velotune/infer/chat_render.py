"""Chat messages -> the text a chat template writes for them, with the generation prompt (the one rendering step
generation, the server and vision prompts share)."""
from __future__ import annotations

from ..errors import VelotuneError


def chat_text(tokenizer, messages, chat_template: str | None = None) -> str:
    """Chat messages as `chat_template` (default: the tokenizer's own) writes them, with the generation prompt;
    its special tokens are in the text (encode it with add_special_tokens=False)."""
    if chat_template is None and getattr(tokenizer, "chat_template", None) is None:
        raise VelotuneError("the tokenizer has no chat template: pass a plain string prompt, or set "
                            "tokenizer.chat_template")
    return tokenizer.apply_chat_template(list(messages), chat_template=chat_template, add_generation_prompt=True,
                                         tokenize=False)


__all__ = ["chat_text"]
