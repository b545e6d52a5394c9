"""What a request must pass before the server does any work for it.

- `RequestGuard` (ASGI middleware, every path but /health): with an API key, the key; without one, the
  `Host` header must name this server (the local names, the bound address, or an `--allow-host`), so that a
  web page cannot reach a local server through DNS rebinding.
- `read_json_body` (JSON endpoints): a JSON content type (a browser page can POST `text/plain` to any
  address without asking first, but not `application/json`), and a body no larger than the server's limit,
  checked from `Content-Length` before reading and counted while receiving, so an oversized body is never
  held whole.
"""
from __future__ import annotations

import hmac
import logging

from .server_schema import APIError

log = logging.getLogger("velotune")

DEFAULT_MAX_BODY_BYTES = 4 * 1024 * 1024
OPEN_PATHS = ("/health",)                       # answered without the API key
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")
ANY_ADDRESS = ("0.0.0.0", "::", "")             # bind addresses that no client writes in its Host header


def _host_value(name: str, port: int) -> set:
    """`name` as a Host header gives it for `port` (IPv6 in brackets; port 80 may be left out)."""
    shown = f"[{name}]" if ":" in name and not name.startswith("[") else name
    values = {f"{shown}:{port}".lower()}
    if port == 80:
        values.add(shown.lower())
    return values


def allowed_hosts(bind_host: str, port: int, extra=()) -> frozenset:
    """The Host header values accepted when no API key is set: the local names and the bound address with the
    port, and each of `extra` (NAME, which gets the port, or NAME:PORT / [IPv6]:PORT as written)."""
    values = set()
    for name in {*LOCAL_HOSTS, bind_host} - set(ANY_ADDRESS):
        values |= _host_value(name, port)
    for item in extra:
        item = item.strip()
        name, _, maybe_port = item.rpartition(":")
        has_port = maybe_port.isdigit() and (item.startswith("[") or ":" not in name)
        values |= {item.lower()} if has_port else _host_value(item, port)
    return frozenset(values)


def _header(scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key.lower() == name:
            return value.decode("latin-1")
    return None


class RequestGuard:
    """Answers 401 (missing API key) or 403 (unknown Host) before the app sees the request. A plain ASGI
    middleware: one built on BaseHTTPMiddleware would hide a client's disconnect from the handlers (they poll
    for it). `allowed_hosts` None: any Host (a proxy in front checks it)."""

    def __init__(self, app, api_key: str | None, allowed_hosts: frozenset | None, respond):
        self.app, self.api_key, self.allowed_hosts, self.respond = app, api_key, allowed_hosts, respond

    async def __call__(self, scope, receive, send):
        error = self.check(scope) if scope["type"] == "http" else None
        if error is not None:
            await self.respond(error)(scope, receive, send)
            return
        await self.app(scope, receive, send)

    def check(self, scope) -> APIError | None:
        if scope["path"] in OPEN_PATHS:   # shows nothing private: probes may call it by any address
            return None
        if self.api_key:
            if self.authorized(_header(scope, b"authorization")):
                return None
            return APIError(401, "Incorrect or missing API key: send 'Authorization: Bearer KEY'.",
                            "invalid_request_error", None, "invalid_api_key")
        host = (_header(scope, b"host") or "").strip().lower()
        if self.allowed_hosts is None or host in self.allowed_hosts:
            return None
        return APIError(403, f"Host {host!r} is not this server's: without an API key the server answers only "
                             f"requests addressed to {', '.join(sorted(self.allowed_hosts))} (add others with "
                             "--allow-host, or set --api-key)", "invalid_request_error", None, "host_not_allowed")

    def authorized(self, header: str | None) -> bool:
        expected = f"Bearer {self.api_key}"
        return header is not None and hmac.compare_digest(header.encode(), expected.encode())


def _too_large(limit: int, size: int | None = None) -> APIError:
    got = f" ({size} bytes)" if size is not None else ""
    return APIError(413, f"the request body{got} is larger than this server's limit of {limit} bytes "
                         "(--max-body-bytes)", "invalid_request_error", None, "request_too_large")


def require_json(content_type: str | None):
    """A 415 unless the content type is application/json (any parameters, e.g. charset, allowed)."""
    media = (content_type or "").split(";")[0].strip().lower()
    if media != "application/json":
        raise APIError(415, f"the request body must be sent as 'Content-Type: application/json' (got "
                            f"{content_type!r})", "invalid_request_error", None, "unsupported_media_type")


async def read_json_body(request, limit: int) -> bytes | None:
    """The body of a JSON request, at most `limit` bytes (else a 413); None when the client went away before
    sending all of it."""
    require_json(request.headers.get("content-type"))
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise _too_large(limit, int(declared))
    from starlette.requests import ClientDisconnect
    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise _too_large(limit)
            chunks.append(chunk)
    except ClientDisconnect:   # nobody to answer: one line in the log, not a traceback
        log.info("client disconnected while sending the request body (%d bytes received)", size)
        return None
    return b"".join(chunks)
