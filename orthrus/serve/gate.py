"""What an HTTP request passes before the app sees it: the drain gate, the API key and the body size.

:class:`Gate` is a pure ASGI middleware (responses, streamed ones included, pass through it
untouched). For every ``/v1/*`` request, in this order:

1. while the server drains (SIGTERM, see :mod:`orthrus.serve.run`): 503 ``server_shutting_down``;
2. with an API key set: ``Authorization: Bearer KEY`` or 401 ``invalid_api_key`` (compared in
   constant time);
3. a body larger than ``max_body_bytes`` gets 413 ``request_too_large`` before anything parses it:
   a ``Content-Length`` over the limit is refused unread, and a body sent without one (chunked) is
   read only up to the limit.

``GET /health`` and ``GET /metrics`` are outside ``/v1`` and stay open (a load balancer and a
Prometheus scraper need no key). The gate also counts the ``/v1`` requests in flight (from arrival
to the last byte of their response), which the drain waits for.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from typing import Any, Awaitable, Callable, MutableMapping

from orthrus.serve import protocol as P

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

DEFAULT_MAX_BODY_BYTES = 4 * 1024 * 1024  # 4 MiB: far above any prompt the context can hold


def _digest(key: str | bytes) -> bytes:
    # hashing first makes the comparison constant-time in the key's length as well
    return hashlib.sha256(key.encode() if isinstance(key, str) else key).digest()


class GateState:
    """The gate's settings and counters, shared with the app and the server runner.

    Args:
        api_key: the key ``/v1`` requests must send as ``Authorization: Bearer KEY``; None: open.
        max_body_bytes: the largest request body accepted.
    """

    def __init__(self, api_key: str | None = None, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES) -> None:
        if api_key is not None and not api_key.strip():
            raise ValueError("the API key is empty: give a non-empty key, or none to serve without one")
        if max_body_bytes < 1:
            raise ValueError(f"the body size limit must be >= 1 byte, got {max_body_bytes}")
        self._key = _digest(api_key) if api_key is not None else None
        self.max_body_bytes = max_body_bytes
        self.draining = False   # set on SIGTERM: new /v1 requests get 503
        self.in_flight = 0      # /v1 requests admitted and not yet fully answered
        self.rejected = 0       # 401 and 413 replies (4xx, counted with the app's own)

    @property
    def has_key(self) -> bool:
        return self._key is not None

    def authorised(self, header: bytes | None) -> bool:
        """Whether an ``Authorization`` header value carries the key (constant-time comparison)."""
        if self._key is None:
            return True
        if header is None:
            return False
        scheme, _, token = header.strip().partition(b" ")
        ok = hmac.compare_digest(_digest(token.strip()), self._key)
        return ok and scheme.lower() == b"bearer"


async def _reply(send: Send, status: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> None:
    raw = json.dumps(body).encode()
    hdrs = [(b"content-type", b"application/json"), (b"content-length", str(len(raw)).encode())]
    hdrs += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": hdrs})
    await send({"type": "http.response.body", "body": raw})


class Gate:
    """ASGI middleware: see the module docstring. ``state`` is read on every request, so the app
    and the runner change its settings (``draining``) while the server runs."""

    def __init__(self, app: ASGIApp, state: GateState) -> None:
        self.app, self.state = app, state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if scope["type"] != "http" or not (path == "/v1" or path.startswith("/v1/")):
            return await self.app(scope, receive, send)
        st = self.state
        if st.draining:
            return await _reply(send, 503, P.error_body(
                "the server is shutting down and accepts no new requests: retry on another server",
                "server_error", code="server_shutting_down"), {"Connection": "close"})
        st.in_flight += 1  # from here on the drain waits for this request (its body upload included)
        try:
            await self._admit(scope, receive, send)
        finally:
            st.in_flight -= 1

    async def _admit(self, scope: Scope, receive: Receive, send: Send) -> None:
        """The API key and the body size; then the app, with the body read here replayed to it."""
        st = self.state
        headers = dict(scope.get("headers") or [])
        if not st.authorised(headers.get(b"authorization")):
            st.rejected += 1
            given = b"authorization" in headers
            msg = ("incorrect API key provided" if given else
                   "no API key provided: send it in an Authorization header as 'Bearer YOUR_KEY'")
            return await _reply(send, 401, P.error_body(msg, param=None, code="invalid_api_key"),
                                {"WWW-Authenticate": "Bearer"})
        limit = st.max_body_bytes
        declared = headers.get(b"content-length")
        too_large = P.error_body(f"the request body is larger than this server's limit of {limit} bytes "
                                 f"(--max-body-bytes)", code="request_too_large")
        if declared is not None and declared.isdigit() and int(declared) > limit:  # refused unread
            st.rejected += 1
            return await _reply(send, 413, too_large, {"Connection": "close"})
        # read the body here, at most `limit` bytes of it, and hand the app the bytes read
        chunks: list[bytes] = []
        size, more = 0, True
        while more:
            msg = await receive()
            if msg["type"] != "http.request":  # the client left before sending its body
                return
            chunk = msg.get("body", b"")
            size += len(chunk)
            if size > limit:
                st.rejected += 1
                return await _reply(send, 413, too_large, {"Connection": "close"})
            chunks.append(chunk)
            more = msg.get("more_body", False)
        body: bytes | None = b"".join(chunks)

        async def replay() -> Message:
            # the buffered body first; then the real channel (the app polls it for a disconnect)
            nonlocal body
            if body is not None:
                msg, body = {"type": "http.request", "body": body, "more_body": False}, None
                return msg
            return await receive()

        await self.app(scope, replay, send)
