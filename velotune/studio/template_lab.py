"""The Studio's chat-template editor: which template a model uses and why, a preview of a template on a
conversation (the text, and its tokens with the ones training learns marked), and saving a template into a model
or adapter directory.

The preview renders in template_sandbox (the environment transformers renders with; bounded in time and size by
template_limits), and marks the trained tokens with velotune.data.encode.encode, the code training runs, so the
editor shows what training will do, not an imitation of it.
"""
from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..data.formats import ROLES
from ..data.templates import builtin_name, load_chat_template, saved_chat_template
from ..errors import CheckpointError, ConfigError, DataError
from .template_limits import RENDER_SECONDS, volume
from .template_sandbox import TemplateFault, compile_template, render_template
from .token_view import token_pieces, trained_flags

MAX_TEMPLATE_CHARS = 64 * 1024
MAX_MESSAGES = 64
MAX_MESSAGE_CHARS = 16 * 1024
MAX_CONVERSATION_CHARS = 64 * 1024
DEFAULT_MAX_TOKENS = 4096
MAX_TOKENS = 32768
TEMPLATE_FILE = "chat_template.jinja"

# config.json model_type -> the built-in template of that family, for a model whose tokenizer has none. A guess
# from the family (a "llama" model may be a Llama 2 or an unrelated fine-tune), said as such in the reason.
FAMILY_TEMPLATES = {"llama": "llama-3", "mistral": "mistral", "mixtral": "mistral", "qwen2": "qwen-2.5",
                    "qwen2_moe": "qwen-2.5", "qwen3": "chatml", "qwen3_moe": "chatml", "gemma": "gemma",
                    "gemma2": "gemma", "gemma3": "gemma", "gemma3_text": "gemma", "phi3": "phi-3"}

SAMPLE_CONVERSATION = [
    {"role": "system", "content": "You are a helpful assistant. Answer briefly."},
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "The capital of France is Paris."},
    {"role": "user", "content": "And how many people live there?"},
    {"role": "assistant", "content": "About 2.1 million people live in Paris itself."},
]

# transformers passes a message's reasoning under these names (the first is what templates read); copied alike.
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


@dataclass
class TemplateInfo:
    text: str | None      # the template, None: there is none
    source: str           # "adapter" | "model" | "builtin" | "none"
    name: str | None      # the built-in template's name when `text` is one, word for word
    reason: str           # why this one, in a sentence

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class Preview:
    text: str | None                    # the rendered conversation (None: the template failed)
    tokens: list = field(default_factory=list)   # token_pieces: {"id", "text", "trained", "special"}
    error: dict | None = None           # {"message", "line", "kind"}; kind: syntax | runtime | security | limit
    mode: str = "training"              # "training": tokens as training encodes them; "inference": the prompt
    trained_tokens: int = 0
    truncated: bool = False             # the tokens stop at max_tokens
    note: str | None = None             # something the page should say next to the tokens

    def as_dict(self) -> dict:
        return asdict(self)


def template_in_use(model_dir, adapter_dir=None) -> TemplateInfo:
    """The chat template the model (with the adapter) is used with: the adapter's saved one (the one it was
    trained with) > the model directory's own > the built-in template of the model's family > none. The first
    two are what chat, generate and serve use (set_inference_template); the built-in one is only a suggestion:
    they use it once it is saved into the directory or given as --chat-template."""
    model_dir = _directory(model_dir, "model")
    prefix = ""
    if adapter_dir is not None:
        adapter_dir = _directory(adapter_dir, "adapter")
        text = saved_chat_template(adapter_dir)
        if text:
            return TemplateInfo(text, "adapter", builtin_name(text),
                                f"the adapter in {adapter_dir} saved the template it was trained with "
                                f"({_template_file(adapter_dir)})")
        prefix = f"the adapter in {adapter_dir} saved no chat template; "
    text = saved_chat_template(model_dir)
    if text:
        return TemplateInfo(text, "model", builtin_name(text),
                            f"{prefix}the model's own template ({_template_file(model_dir)})")
    model_type = _model_type(model_dir)
    family = FAMILY_TEMPLATES.get(model_type or "")
    if family:
        return TemplateInfo(load_chat_template(family), "builtin", family,
                            f"{prefix}the tokenizer has no chat template; using the built-in '{family}' for "
                            f"model_type {model_type} (a guess from the family: chat and serve use it once it is "
                            f"saved here or given as --chat-template {family})")
    why = f"model_type {model_type} has no built-in template" if model_type else "config.json names no model_type"
    return TemplateInfo(None, "none", None, f"{prefix}the tokenizer has no chat template and {why}; pick a "
                        "built-in template or write one")


def _directory(path, what: str) -> Path:
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such {what} directory")
    return path


def _template_file(directory: Path) -> str:
    return TEMPLATE_FILE if (directory / TEMPLATE_FILE).is_file() else "tokenizer_config.json"


def _model_type(model_dir: Path) -> str | None:
    path = model_dir / "config.json"
    if not path.is_file():
        return None
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path}: not a readable JSON file ({exc})") from None
    model_type = config.get("model_type") if isinstance(config, dict) else None
    return model_type if isinstance(model_type, str) else None


def template_error(template: str) -> dict | None:
    """The template's syntax error ({"message", "line", "kind"}), or None: a check cheap enough for every edit."""
    if len(template) > MAX_TEMPLATE_CHARS:
        return _too_long(template).as_dict()
    try:
        compile_template(template)
    except TemplateFault as fault:
        return fault.as_dict()
    return None


def _too_long(template: str) -> TemplateFault:
    return TemplateFault(f"the template is {len(template):,} characters long; the editor takes up to "
                         f"{MAX_TEMPLATE_CHARS:,}", None, "limit")


def render_preview(tokenizer, template: str, messages: list[dict], *, add_generation_prompt: bool = False,
                   train_on: str = "assistant", max_tokens: int = DEFAULT_MAX_TOKENS) -> Preview:
    """`messages` rendered by `template` as apply_chat_template renders them, and the tokens: without the
    generation prompt, the tokens training encodes (encode(): BOS/EOS it adds, `train_on` deciding which are
    trained, cut at `max_tokens`); with it, the prompt as chat and serve encode it (nothing trained).

    A template that fails gives a Preview with `error` (and no tokens); malformed `messages` or options raise
    DataError (the request is wrong, not the template). `tokenizer` None: the text only."""
    if train_on not in ("assistant", "all"):
        raise DataError(f"train_on: expected 'assistant' or 'all', got {train_on!r}")
    if not isinstance(max_tokens, int) or not 1 <= max_tokens <= MAX_TOKENS:
        raise DataError(f"max_tokens: expected a whole number from 1 to {MAX_TOKENS}, got {max_tokens!r}")
    messages = check_messages(messages)
    if not isinstance(template, str):
        raise DataError(f"template: expected text, got {type(template).__name__}")
    if len(template) > MAX_TEMPLATE_CHARS:
        return Preview(None, error=_too_long(template).as_dict())
    deadline = time.monotonic() + RENDER_SECONDS
    specials = _special_tokens(tokenizer)
    try:
        text = render_template(template, _context(messages, specials, add_generation_prompt), deadline=deadline)
    except TemplateFault as fault:
        return Preview(None, error=fault.as_dict())
    if tokenizer is None:
        return Preview(text, mode="inference" if add_generation_prompt else "training",
                       note="no tokenizer: the tokens cannot be shown")
    if add_generation_prompt:
        ids = list(tokenizer(text, add_special_tokens=False).input_ids)
        return Preview(text, token_pieces(tokenizer, ids[:max_tokens]), mode="inference",
                       truncated=len(ids) > max_tokens,
                       note="the prompt chat and serve send the model; training renders without the generation "
                            "prompt (turn it off to see which tokens are trained)")
    if train_on == "assistant":
        fault = _check_training_prefixes(template, messages, specials, deadline)
        if fault is not None:
            return Preview(text, error=fault.as_dict())
    return _training_tokens(tokenizer, template, messages, text, train_on, max_tokens)


def check_messages(messages) -> list[dict]:
    """A copy of the conversation, checked: 1 to MAX_MESSAGES messages of a role in ROLES and text content
    (other keys kept when they hold JSON values), within the size limits. DataError names the message."""
    if not isinstance(messages, list) or not messages:
        raise DataError("messages: expected a non-empty list of {role, content} messages")
    if len(messages) > MAX_MESSAGES:
        raise DataError(f"messages: {len(messages)} messages; the preview takes up to {MAX_MESSAGES}")
    checked = []
    for i, message in enumerate(messages):
        at = f"messages[{i}]"
        if not isinstance(message, dict):
            raise DataError(f"{at}: expected an object with 'role' and 'content', got {type(message).__name__}")
        if message.get("role") not in ROLES:
            raise DataError(f"{at}.role: expected one of {', '.join(ROLES)}, got {message.get('role')!r}")
        content = message.get("content")
        if not isinstance(content, str):
            raise DataError(f"{at}.content: expected text, got {type(content).__name__}")
        if len(content) > MAX_MESSAGE_CHARS:
            raise DataError(f"{at}.content: {len(content):,} characters; a message may hold {MAX_MESSAGE_CHARS:,}")
        for key, value in message.items():
            if not _plain_json(value):
                raise DataError(f"{at}.{key}: expected a JSON value (text, number, list, object)")
        checked.append(json.loads(json.dumps(message)))  # a deep copy of plain data, nothing shared with the caller
    if volume(checked, MAX_CONVERSATION_CHARS + 1) > MAX_CONVERSATION_CHARS:
        raise DataError(f"messages: the conversation is longer than {MAX_CONVERSATION_CHARS:,} characters")
    return checked


def _plain_json(value, depth: int = 0) -> bool:
    if value is None or type(value) in (str, int, float, bool):
        return True
    if depth > 8:
        return False
    if type(value) is list:
        return all(_plain_json(v, depth + 1) for v in value)
    if type(value) is dict:
        return all(type(k) is str and _plain_json(v, depth + 1) for k, v in value.items())
    return False


def _special_tokens(tokenizer) -> dict:
    """The names apply_chat_template hands every template (bos_token, eos_token, ...), as plain data."""
    if tokenizer is None:
        return {}
    return json.loads(json.dumps(dict(getattr(tokenizer, "special_tokens_map", None) or {}), default=str))


def _context(messages: list[dict], specials: dict, add_generation_prompt: bool) -> dict:
    """What apply_chat_template passes a template: the messages (keys holding None dropped, reasoning copied
    under each name templates read), tools and documents (none), the special tokens, add_generation_prompt."""
    chat = []
    for message in messages:
        message = {k: v for k, v in message.items() if v is not None}
        reasoning = next((message[k] for k in _REASONING_FIELDS if message.get(k) is not None), None)
        if reasoning is not None:
            message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
        chat.append(message)
    return {**specials, "messages": chat, "tools": None, "documents": None,
            "add_generation_prompt": add_generation_prompt}


def _check_training_prefixes(template, messages, specials, deadline) -> TemplateFault | None:
    """Renders in the sandbox every prefix encode() renders to find the assistant turns (the history with the
    generation prompt, and the history with the turn), so encode's own renders run only on what is known to
    render in bounds; a prefix that fails is the error training would meet."""
    for i, message in enumerate(messages):
        if message["role"] != "assistant" or i == 0:
            continue
        for upto, prompt in ((i, True), (i + 1, False)):
            if upto == len(messages):
                continue  # the whole conversation: already rendered
            try:
                render_template(template, _context(messages[:upto], specials, prompt), deadline=deadline)
            except TemplateFault as fault:
                how = " with the generation prompt" if prompt else ""
                fault.message = (f"training renders the first {upto} messages{how} to find the assistant turn "
                                 f"messages[{i}], and that fails: {fault.message}")
                return fault
    return None


def _training_tokens(tokenizer, template, messages, text, train_on, max_tokens) -> Preview:
    from ..data.encode import DataStats, encode
    from ..data.formats import Sample

    stats, note = DataStats(), None
    try:
        encoded = encode(Sample(messages=messages, origin="the preview"), tokenizer, template, train_on=train_on,
                         max_len=max_tokens, stats=stats)
        if encoded is None:  # nothing trained: training drops it; its tokens are still worth showing
            stats = DataStats()
            encoded = encode(Sample(messages=messages, origin="the preview"), tokenizer, template, train_on="all",
                             max_len=max_tokens, stats=stats)
            if encoded is None:
                return Preview(text, note="the template renders this conversation as no tokens at all")
            why = (f"its assistant turns come after the first {max_tokens} tokens" if stats.truncated
                   else "it has no assistant turn after the first message")
            note = f"training learns nothing from this conversation and drops it: {why}"
    except DataError as exc:  # the template renders in the sandbox but not in transformers: say so plainly
        return Preview(text, error={"message": str(exc), "line": None, "kind": "runtime"})
    flags = [False] * len(encoded) if note else trained_flags(encoded.labels.tolist())
    return Preview(text, token_pieces(tokenizer, encoded.input_ids.tolist(), flags), trained_tokens=sum(flags),
                   truncated=bool(stats.truncated), note=note)


def save_template(directory, template: str) -> Path:
    """Writes `template` to DIRECTORY/chat_template.jinja, atomically (a temporary file renamed over it), after
    checking it compiles; returns the file's path. chat_template.jinja is read before tokenizer_config.json's
    chat_template, by velotune and by transformers. Checking that `directory` may be written is the caller's."""
    directory = Path(directory)
    target = directory / TEMPLATE_FILE
    if not directory.is_dir():
        raise ConfigError(f"{directory}: no such directory to save the chat template in")
    if not isinstance(template, str) or ("{{" not in template and "{%" not in template):
        raise ConfigError(f"{target}: the template holds no Jinja ({{{{ ... }}}} or {{% ... %}}); not saved")
    problem = template_error(template)
    if problem is not None:
        where = f"line {problem['line']}: " if problem["line"] else ""
        raise ConfigError(f"{target}: {where}{problem['message']}; not saved")
    mode = (target.stat().st_mode & 0o777) if target.exists() else 0o644
    fd, temp = tempfile.mkstemp(dir=directory, prefix=".chat_template.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as out:
            out.write(template)
            out.flush()
            os.fsync(out.fileno())
        os.chmod(temp, mode)
        os.replace(temp, target)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise
    return target
