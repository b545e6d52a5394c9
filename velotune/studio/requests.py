"""What every /api handler does with a request: its JSON body, bounded and checked, and its fields, typed."""
from __future__ import annotations

from ..errors import VelotuneError


async def json_body(request, studio) -> dict:
    """The request's JSON object (a JSON content type and at most the Studio's body limit, as `serve` checks)."""
    import json

    from ..infer.server_guards import read_json_body
    raw = await read_json_body(request, studio.settings.max_body_bytes)
    if raw is None:
        raise VelotuneError("the client went away before sending the whole request")
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise VelotuneError(f"the request body is not valid JSON: {exc}") from None
    except RecursionError:
        raise VelotuneError("the request body is nested too deeply") from None
    if not isinstance(body, dict):
        raise VelotuneError("the request body must be a JSON object")
    return body


def field(body: dict, name: str, kind=str, required: bool = True, default=None):
    """body[name], checked to be of `kind`; a 400 naming the field otherwise."""
    value = body.get(name, default)
    if value is None:
        if required:
            raise VelotuneError(f"'{name}' is required")
        return default
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        names = kind.__name__ if isinstance(kind, type) else "/".join(k.__name__ for k in kind)
        raise VelotuneError(f"'{name}' must be a {names}, got {type(value).__name__}")
    return value
