"""Requests of the OpenAI-compatible server: the JSON bodies, their validation, and OpenAI's error shape.

Unknown fields are ignored, as clients send many optional ones (`user`, `metadata`, ...); fields that would
change the answer in a way velotune does not implement (n > 1, logprobs, tools, logit_bias, ...) are refused
with a 400 naming the field, never silently dropped.
"""
from __future__ import annotations

import json
from typing import Annotated, Any, Union

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr, ValidationError

from ..data.vision_media import VIDEO_FAMILIES
from .sampling import REPETITION_PENALTY_RANGE, SEED_MAX

# Stop strings are searched for after every token, and the text's end checked against their starts: many or
# long ones would stall the worker.
MAX_STOP_STRINGS, MAX_STOP_LENGTH = 16, 1024
StopString = Annotated[StrictStr, Field(max_length=MAX_STOP_LENGTH)]


class APIError(Exception):
    """An error answered as OpenAI does: HTTP `status` and {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, "invalid_request_error", param, code)


Number = Union[StrictFloat, StrictInt]


class _Sampling(BaseModel):
    """Fields shared by /v1/completions and /v1/chat/completions (OpenAI's, then velotune's extras)."""
    model_config = ConfigDict(extra="allow")

    model: StrictStr
    max_tokens: Annotated[StrictInt, Field(ge=0)] | None = None
    temperature: Annotated[Number, Field(ge=0)] | None = None
    top_p: Annotated[Number, Field(gt=0, le=1)] | None = None
    stop: Annotated[list[StopString], Field(max_length=MAX_STOP_STRINGS)] | StopString | None = None
    seed: Annotated[StrictInt, Field(ge=0, le=SEED_MAX)] | None = None
    presence_penalty: Annotated[Number, Field(ge=-2, le=2)] | None = None
    frequency_penalty: Annotated[Number, Field(ge=-2, le=2)] | None = None
    n: Annotated[StrictInt, Field(ge=1)] | None = None
    stream: StrictBool | None = False
    stream_options: dict | None = None
    # extras (not in OpenAI's API; other open servers take them under the same names)
    top_k: Annotated[StrictInt, Field(ge=-1)] | None = None       # -1 or 0: off
    min_p: Annotated[Number, Field(ge=0, le=1)] | None = None
    repetition_penalty: Annotated[Number, Field(ge=REPETITION_PENALTY_RANGE[0], le=REPETITION_PENALTY_RANGE[1])] \
        | None = None
    ignore_eos: StrictBool | None = None
    stop_token_ids: list[StrictInt] | None = None

    def response_format_type(self) -> str | None:
        fmt = (self.model_extra or {}).get("response_format")
        return fmt.get("type") if isinstance(fmt, dict) else (None if fmt is None else repr(fmt))


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: StrictStr
    text: StrictStr | None = None


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: StrictStr
    content: StrictStr | list[ContentPart] | None = None


class ChatRequest(_Sampling):
    messages: Annotated[list[Message], Field(min_length=1)]
    max_completion_tokens: Annotated[StrictInt, Field(ge=0)] | None = None


class CompletionRequest(_Sampling):
    prompt: StrictStr | list[StrictInt] | list[StrictStr] | list[list[StrictInt]]


# loc entries that name a field (pydantic also puts the branch of a union in `loc`, e.g. 'float')
_FIELD_NAMES = {name for cls in (ChatRequest, CompletionRequest, Message, ContentPart) for name in cls.model_fields}

# field -> the values that mean "not used"; anything else is refused (velotune does not implement it)
_UNSUPPORTED = {
    "logprobs": (None, False, 0), "top_logprobs": (None, 0), "logit_bias": (None, {}), "tools": (None, []),
    "functions": (None, []), "tool_choice": (None, "none", "auto"), "function_call": (None, "none", "auto"),
    "best_of": (None, 1), "echo": (None, False), "suffix": (None, ""), "audio": (None,),
    "modalities": (None, ["text"]), "prediction": (None,),
}


def _not_json(name: str):
    # Python's json module reads NaN and Infinity, which JSON does not have (and no setting can use)
    raise bad_request(f"the request body is not valid JSON: {name} is not a JSON value", code="invalid_json")


def parse_body(raw: bytes) -> dict:
    """The request body as a JSON object, or a 400 that says what is wrong with it."""
    try:
        data = json.loads(raw, parse_constant=_not_json)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        where = f" (line {exc.lineno}, column {exc.colno})" if isinstance(exc, json.JSONDecodeError) else ""
        raise bad_request(f"the request body is not valid JSON{where}: {exc}", code="invalid_json") from None
    if not isinstance(data, dict):
        raise bad_request("the request body must be a JSON object", code="invalid_json")
    return data


def validate(model_cls, data: dict):
    """A ChatRequest / CompletionRequest, or a 400 naming the first bad field."""
    try:
        request = model_cls.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        param = ".".join(str(p) for p in first["loc"] if isinstance(p, int) or p in _FIELD_NAMES) or None
        raise bad_request(f"'{param}': {first['msg']}" if param else first["msg"], param=param) from None
    for name, allowed in _UNSUPPORTED.items():
        if data.get(name, None) not in allowed:
            raise bad_request(f"'{name}' is not supported by this server", param=name, code="unsupported_parameter")
    if request.n not in (None, 1):
        raise bad_request("only n=1 is supported", param="n", code="unsupported_parameter")
    if request.response_format_type() not in (None, "text"):
        raise bad_request("only response_format {'type': 'text'} is supported", param="response_format",
                          code="unsupported_parameter")
    return request


def sampling_fields(request) -> dict:
    """The request's generation settings under SamplingParams' names (only those it gives)."""
    out: dict[str, Any] = {}
    max_tokens = getattr(request, "max_completion_tokens", None)
    if max_tokens is None:
        max_tokens = request.max_tokens
    if max_tokens is not None:
        out["max_new_tokens"] = max_tokens
    for name in ("temperature", "top_p", "seed", "presence_penalty", "frequency_penalty", "min_p",
                 "repetition_penalty", "ignore_eos", "stop_token_ids"):
        value = getattr(request, name)
        if value is not None:
            out[name] = value
    if request.top_k is not None:
        out["top_k"] = max(0, request.top_k)
    if request.stop is not None:
        out["stop"] = [request.stop] if isinstance(request.stop, str) else list(request.stop)
    return out


MAX_IMAGES_PER_REQUEST = 8   # each image costs its processor's tokens and a vision-tower pass
# Each video costs decoding (vision/video.py bounds the frames and pixels) and up to thousands of tokens.
MAX_VIDEOS_PER_REQUEST = 2
# A video's data: URI, refused above this many bytes before anything is decoded (base64: ~3/4 of it is the file).
MAX_VIDEO_URI_BYTES = 16 * 1024 * 1024
_MEDIA = {"image_url": ("image", MAX_IMAGES_PER_REQUEST), "video_url": ("video", MAX_VIDEOS_PER_REQUEST)}


def _media_url(part: ContentPart, kind: str, where: str, param: str) -> str:
    """The data: URI of an image_url / video_url part, or a 400: the server fetches no URLs and reads no files."""
    url = (part.model_extra or {}).get(part.type)
    url = url.get("url") if isinstance(url, dict) else url
    if not isinstance(url, str) or url[:5].lower() != "data:":
        raise bad_request(f"{where}: {part.type}.url must be a data: URI (base64 {kind} bytes); this server fetches "
                          "no URLs", param=param)
    if kind == "video" and len(url) > MAX_VIDEO_URI_BYTES:
        raise bad_request(f"{where}: the video's data URI is {len(url)} bytes, over the {MAX_VIDEO_URI_BYTES} a "
                          "video may have here; send a shorter or smaller clip", param=param,
                          code="video_too_large")
    return url


def chat_messages(request: ChatRequest, images: bool = False) -> list[dict]:
    """The messages as the chat template takes them: text content (parts joined), extra keys dropped. With
    `images` (a vision-language model), image_url and video_url parts with a data: URI are kept as parts, up to
    MAX_IMAGES_PER_REQUEST images and MAX_VIDEOS_PER_REQUEST videos (each video's URI at most
    MAX_VIDEO_URI_BYTES); remote URLs are refused (the server fetches nothing). Whether the model reads videos is
    checked before (check_video_parts); the videos are decoded with the prompt (vision_prompt.py)."""
    messages, seen = [], {"image": 0, "video": 0}
    for i, message in enumerate(request.messages):
        content = message.content
        if isinstance(content, list):
            parts, has_media = [], False
            for j, part in enumerate(content):
                where, param = f"messages[{i}].content[{j}]", f"messages.{i}.content.{j}"
                if part.type in _MEDIA and images:
                    kind, most = _MEDIA[part.type]
                    url = _media_url(part, kind, where, param)
                    seen[kind] += 1
                    if seen[kind] > most:
                        raise bad_request(f"{where}: at most {most} {kind}s per request", param=param)
                    parts.append({"type": part.type, part.type: {"url": url}})
                    has_media = True
                elif part.type != "text" or part.text is None:
                    raise bad_request(f"{where}: only text parts are supported{_hint(part.type, images)} (got type "
                                      f"{part.type!r})", param=param)
                else:
                    parts.append({"type": "text", "text": part.text})
            content = parts if has_media else "".join(p["text"] for p in parts)
        messages.append({"role": message.role, "content": content or ""})
    return messages


def _hint(kind: str, images: bool) -> str:
    if kind == "video_url":
        return f" (this model reads text only; videos need a {VIDEO_FAMILIES} model)"
    if kind == "video":
        return " (send a video as a video_url part with a data:video/...;base64 URI)" if images else ""
    return " (this model reads text only)" if kind == "image_url" and not images else ""


def check_video_parts(request: ChatRequest, reads: str) -> None:
    """A 400 naming the first video_url part when the served model does not read videos; `reads` says what it
    reads instead ("text" or "images"). Runs before the prompt is built, so the refusal names the part."""
    for i, message in enumerate(request.messages):
        if not isinstance(message.content, list):
            continue
        for j, part in enumerate(message.content):
            if part.type == "video_url":
                raise bad_request(f"messages[{i}].content[{j}]: a video part, but this model reads {reads} only; "
                                  f"videos need a {VIDEO_FAMILIES} model", param=f"messages.{i}.content.{j}",
                                  code="unsupported_content")


def include_usage(request) -> bool:
    """stream_options.include_usage: a last chunk with the token counts before [DONE]."""
    options = request.stream_options or {}
    return bool(options.get("include_usage"))
