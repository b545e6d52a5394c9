"""What every Studio request passes before a handler sees it.

- Off loopback, a token: `Authorization: Bearer TOKEN` on API calls, or the cookie the page gets by opening the
  URL printed at start (`/?token=TOKEN`, which sets it and redirects). Without it: 401.
- On loopback (no token), the Host header must name this machine, so that a web page elsewhere cannot reach the
  Studio through DNS rebinding.
- Every request that changes something (not GET/HEAD) carries the `X-Velotune-Studio` header. A page on another
  site cannot send a custom header without the browser asking first (and the Studio answers no cross-origin
  question), so such a page cannot start jobs, upload files or vote, even on loopback.
- A request a browser marks as coming from another site (`Sec-Fetch-Site`, or an `Origin` that is not this
  Studio) is refused, except opening the page itself: an <img> or <script> tag elsewhere cannot make it load
  models or read anything.
- Every answer forbids framing (another site cannot lay the page under its own buttons) and type sniffing.
"""
from __future__ import annotations

import hmac
import json
from urllib.parse import parse_qs

COOKIE = "velotune_studio_token"
CHANGE_HEADER = b"x-velotune-studio"
SAFE_METHODS = ("GET", "HEAD")
OTHER_SITES = ("cross-site", "same-site")
SAFE_HEADERS = [(b"x-frame-options", b"DENY"), (b"content-security-policy", b"frame-ancestors 'none'"),
                (b"x-content-type-options", b"nosniff"), (b"referrer-policy", b"no-referrer")]


def _headers(scope) -> dict:
    return {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", ())}


def _cookie(headers: dict, name: str) -> str | None:
    for part in headers.get("cookie", "").split(";"):
        key, _, value = part.strip().partition("=")
        if key == name:
            return value
    return None


async def _send(send, status: int, body: bytes, content_type: str, extra=()):
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", content_type.encode()), *extra]})
    await send({"type": "http.response.body", "body": body})


def _json(message: str) -> bytes:
    return json.dumps({"error": {"message": message}}).encode()


class StudioGuard:
    def __init__(self, app, token: str | None, allowed_hosts: frozenset | None):
        self.app, self.token, self.allowed_hosts = app, token, allowed_hosts

    @staticmethod
    def _from_elsewhere(headers: dict, scope) -> bool:
        site = headers.get("sec-fetch-site")
        opening_page = scope["method"] == "GET" and headers.get("sec-fetch-mode") == "navigate"
        if site in OTHER_SITES and not opening_page:
            return True
        origin = headers.get("origin")
        if origin and origin != "null":
            host = headers.get("host", "")
            return origin.split("://", 1)[-1].lower() != host.lower()
        return origin == "null" and scope["method"] not in SAFE_METHODS

    def _token_ok(self, value: str | None) -> bool:
        return value is not None and hmac.compare_digest(value.encode(), self.token.encode())

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        original_send = send

        async def send(message):   # noqa: F811 (every answer carries the safety headers)
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), *SAFE_HEADERS]}
            await original_send(message)
        headers = _headers(scope)
        path = scope["path"]
        if self._from_elsewhere(headers, scope):
            await _send(send, 403, _json("a request from another site: the Studio answers only its own page"),
                        "application/json")
            return
        if self.token:
            query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
            given = (query.get("token") or [None])[0]
            if path == "/" and given is not None and self._token_ok(given):
                # the URL printed at start: keep the token in a cookie the page's own requests carry
                cookie = f"{COOKIE}={self.token}; HttpOnly; SameSite=Strict; Path=/"
                await _send(send, 303, b"", "text/plain", [(b"location", b"/"), (b"set-cookie", cookie.encode())])
                return
            bearer = headers.get("authorization", "")
            if not (self._token_ok(_cookie(headers, COOKIE))
                    or (bearer.startswith("Bearer ") and self._token_ok(bearer[7:]))):
                await _send(send, 401, _json("this Studio needs its token: open the URL printed when it started "
                                             "(…/?token=…) or send 'Authorization: Bearer TOKEN'"),
                            "application/json")
                return
        elif self.allowed_hosts is not None and headers.get("host", "").strip().lower() not in self.allowed_hosts:
            await _send(send, 403, _json(f"Host {headers.get('host')!r} is not this Studio's address"),
                        "application/json")
            return
        if scope["method"] not in SAFE_METHODS and path.startswith("/api/") and \
                CHANGE_HEADER.decode() not in headers:
            await _send(send, 403, _json("requests that change something carry the X-Velotune-Studio header "
                                         "(the Studio page sends it)"), "application/json")
            return
        await self.app(scope, receive, send)
