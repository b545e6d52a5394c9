"""Record formats -> `Sample`: alpaca, sharegpt, messages, prompt_completion, text.

A Sample is either a conversation (`messages`, rendered later by a chat template) or raw text (`text`, with an
optional untrained `prompt` before it). Missing or mistyped fields are errors that name the record and field.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..errors import DataError

FORMATS = ("alpaca", "sharegpt", "messages", "prompt_completion", "text")
ROLES = ("system", "user", "assistant", "tool")
# ShareGPT speaker names -> chat roles.
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "model": "assistant", "chatgpt": "assistant", "bard": "assistant", "bing": "assistant",
                  "system": "system", "tool": "tool", "observation": "tool", "function_response": "tool"}


@dataclass
class Sample:
    messages: list[dict] | None = None   # [{"role": ..., "content": ...}]: chat data
    text: str | None = None              # raw text, trained (after `prompt`, the completion)
    prompt: str | None = None            # raw text before `text`, trained only with train_on="all"
    origin: str = ""                     # where the record came from, for messages

    @property
    def is_chat(self) -> bool:
        return self.messages is not None


def detect_format(records, origin: str | None = None) -> str:
    """The format of a data set, from the fields of its first record."""
    origin = origin or _first_origin(records)
    if not records:
        raise DataError(f"no samples in {origin}")
    keys = set(records[0])
    if "messages" in keys:
        return "messages"
    if "conversations" in keys:
        return "sharegpt"
    if {"instruction", "output"} <= keys:
        return "alpaca"
    if {"prompt", "completion"} <= keys:
        return "prompt_completion"
    if "text" in keys:
        return "text"
    raise DataError(f"{origin}: cannot tell the data format from the fields {sorted(keys)}: expected 'messages', "
                    "'conversations' (sharegpt), 'instruction' + 'output' (alpaca), 'prompt' + 'completion' "
                    "or 'text'; or set data.format")


def _first_origin(records) -> str:
    origins = getattr(records, "origins", None)
    if origins:
        return origins[0].rsplit(":", 1)[0].split("[")[0]
    return "<records>"


def normalise(record: dict, fmt: str, *, system_prompt: str | None = None, where: str = "<record>") -> Sample:
    """One record of format `fmt` as a Sample; `system_prompt` is added to conversations that have none."""
    if fmt not in _NORMALISERS:
        raise DataError(f"unknown data format '{fmt}'; expected one of {', '.join(FORMATS)}")
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a record (dict), got {type(record).__name__}")
    sample = _NORMALISERS[fmt](record, where)
    sample.origin = where
    if sample.messages is not None:
        if not sample.messages:
            raise DataError(f"{where}: the conversation is empty")
        if system_prompt and sample.messages[0]["role"] != "system":
            sample.messages.insert(0, {"role": "system", "content": system_prompt})
    return sample


def _text_field(record, name, where, fmt, *, required=True):
    value = record.get(name)
    if value is None:
        if required:
            raise DataError(f"{where}: missing field '{name}' ({fmt} format)")
        return ""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, str):
        raise DataError(f"{where}: field '{name}' must be text, got {type(value).__name__} ({fmt} format)")
    return value


def _alpaca(record, where):
    instruction = _text_field(record, "instruction", where, "alpaca")
    extra_input = _text_field(record, "input", where, "alpaca", required=False)
    output = _text_field(record, "output", where, "alpaca")
    messages = []
    system = _text_field(record, "system", where, "alpaca", required=False)
    if system:
        messages.append({"role": "system", "content": system})
    user = f"{instruction}\n\n{extra_input}" if extra_input.strip() else instruction
    messages += [{"role": "user", "content": user}, {"role": "assistant", "content": output}]
    return Sample(messages=messages)


def _sharegpt(record, where):
    turns = _turn_list(record, "conversations", where, "sharegpt")
    messages = []
    system = _text_field(record, "system", where, "sharegpt", required=False)
    if system:
        messages.append({"role": "system", "content": system})
    for i, turn in enumerate(turns):
        at = f"{where}: conversations[{i}]"
        speaker = turn.get("from", turn.get("role"))
        if speaker is None:
            raise DataError(f"{at} has no 'from' field (sharegpt format)")
        role = SHAREGPT_ROLES.get(str(speaker).lower())
        if role is None:
            raise DataError(f"{at}: unknown speaker '{speaker}'; expected one of {', '.join(SHAREGPT_ROLES)}")
        content = turn.get("value", turn.get("content"))
        messages.append({"role": role, "content": _content(content, at, "value", "sharegpt")})
    return Sample(messages=messages)


def _messages(record, where, key="messages", fmt="messages"):
    turns = _turn_list(record, key, where, fmt)
    messages = []
    for i, turn in enumerate(turns):
        at = f"{where}: {key}[{i}]"
        role = turn.get("role")
        if role is None:
            raise DataError(f"{at} has no 'role' field ({fmt} format)")
        if role not in ROLES:
            raise DataError(f"{at}: unknown role '{role}'; expected one of {', '.join(ROLES)}")
        messages.append({"role": role, "content": _content(turn.get("content"), at, "content", fmt)})
    return Sample(messages=messages)


def _prompt_completion(record, where):
    prompt, completion = record.get("prompt"), record.get("completion")
    for name, value in (("prompt", prompt), ("completion", completion)):
        if value is None:
            raise DataError(f"{where}: missing field '{name}' (prompt_completion format)")
    if isinstance(prompt, list) and isinstance(completion, list):  # conversational: lists of messages
        first = _messages({"prompt": prompt}, where, "prompt", "prompt_completion").messages
        rest = _messages({"completion": completion}, where, "completion", "prompt_completion").messages
        return Sample(messages=first + rest)
    return Sample(prompt=_text_field(record, "prompt", where, "prompt_completion"),
                  text=_text_field(record, "completion", where, "prompt_completion"))


def _text(record, where):
    return Sample(text=_text_field(record, "text", where, "text"))


def _turn_list(record, key, where, fmt):
    turns = record.get(key)
    if turns is None:
        raise DataError(f"{where}: missing field '{key}' ({fmt} format)")
    if not isinstance(turns, list):
        raise DataError(f"{where}: field '{key}' must be a list of turns, got {type(turns).__name__}")
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise DataError(f"{where}: {key}[{i}] must be an object, got {type(turn).__name__}")
    return turns


def _content(content, at, name, fmt):
    if content is None:
        raise DataError(f"{at} has no '{name}' field ({fmt} format)")
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # OpenAI-style parts: keep the text parts
        kinds = {p.get("type") for p in content if isinstance(p, dict)} & {"image", "image_url", "video"}
        if kinds:
            what = "a video" if kinds == {"video"} else "an image"
            raise DataError(f"{at}: holds {what}; images and videos train a vision-language model (model.path of a "
                            "LLaVA, Qwen2-VL, Idefics3 / SmolVLM or Gemma 3 checkpoint; videos: Qwen2-VL), and this "
                            "model reads text only")
        texts = [p.get("text") for p in content if isinstance(p, dict) and p.get("type", "text") == "text"]
        if len(texts) == len(content) and all(isinstance(t, str) for t in texts):
            return "".join(texts)
    raise DataError(f"{at}: '{name}' must be text (or a list of text parts), got {type(content).__name__}")


_NORMALISERS = {"alpaca": _alpaca, "sharegpt": _sharegpt, "messages": _messages,
                "prompt_completion": _prompt_completion, "text": _text}
